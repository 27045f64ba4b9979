//! Each tiny test guest under the real `ftvmm` on real /dev/kvm; its serial output is the oracle.

use ftvmm_tests::{scratch, test_guest, Ftvmm};
use std::time::Duration;

#[test]
fn hello_prints_and_exits_zero() {
    let run = Ftvmm::standalone(&test_guest("hello")).run();
    run.assert_code(0);
    assert_eq!(run.stdout, "hello from ftvmm\n");
    assert!(
        run.digest_line().is_some(),
        "no digest line: {}",
        run.stderr
    );
    assert!(run.exits().unwrap() > 10, "{}", run.stderr);
}

#[test]
fn ticks_counts_a_hundred_timer_interrupts() {
    let run = Ftvmm::standalone(&test_guest("ticks")).run();
    run.assert_code(0);
    let want: String = (1..=10).map(|i| format!("tick {}\n", i * 10)).collect();
    assert_eq!(run.stdout, want);
    // 100 ticks at 100 Hz follow the host clock: about a second.
    assert!(
        run.elapsed >= Duration::from_millis(900),
        "100 ticks at 100 Hz took only {:?}",
        run.elapsed
    );
}

#[test]
fn echo_upper_cases_its_input_until_q() {
    let run = Ftvmm::standalone(&test_guest("echo"))
        .input(b"Hello, ftvmm 42!\rq", Duration::from_millis(200))
        .run();
    run.assert_code(0);
    assert_eq!(run.stdout, "HELLO, FTVMM 42!\r\nbye\n");
}

/// An image whose sector 0 starts with a known pattern, 1 MiB long.
pub fn disk_image(name: &str) -> std::path::PathBuf {
    let dir = scratch(name);
    let path = dir.join("disk.img");
    let mut data = vec![0u8; 1 << 20];
    data[..8].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef, 0x01, 0x02, 0x03, 0x04]);
    std::fs::write(&path, &data).unwrap();
    path
}

#[test]
fn disk_writes_reach_the_image_and_read_back() {
    let img = disk_image("disk-guest");
    let run = Ftvmm::standalone(&test_guest("disk"))
        .args(["--disk", img.to_str().unwrap()])
        .run();
    run.assert_code(0);
    assert!(
        run.stdout.contains("disk first-bytes=deadbeef01020304"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("disk write ok\n"), "{}", run.stdout);
    assert!(run.stdout.contains("disk read ok\n"), "{}", run.stdout);
    // The guest's pattern is on the host's file: sectors 8..15, byte i = (i*7+3) & 0xff.
    let data = std::fs::read(&img).unwrap();
    let written = &data[8 * 512..16 * 512];
    let want: Vec<u8> = (0..4096u32).map(|i| ((i * 7 + 3) & 0xff) as u8).collect();
    assert_eq!(
        written,
        &want[..],
        "the image does not hold the guest's pattern"
    );
}

#[test]
fn spin_is_interrupted_by_timer_ticks_while_it_computes() {
    let run = Ftvmm::standalone(&test_guest("spin")).run();
    run.assert_code(0);
    let line = run
        .stdout
        .lines()
        .find(|l| l.starts_with("spin checksum="))
        .unwrap_or_else(|| panic!("no result line:\n{}", run.stdout));
    let ticks: u64 = line
        .split("ticks=")
        .nth(1)
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(|| panic!("bad line {line}"));
    // The computation runs in user mode with no exits; ticks arrive only because the VMM kicks
    // the vCPU and injects.
    assert!(
        ticks >= 5,
        "only {ticks} ticks during the computation: {line}"
    );
}

#[test]
fn devices_power_on_as_firmware_leaves_them() {
    // docs/PLATFORM.md, "Power-on state": PIT channels in mode 3 (lobyte/hibyte, no NULL
    // COUNT), channels 0 and 1 counting, channel 2 waiting for its gate; the PIC pair
    // initialised with vectors 0x08 and 0x70, all masked but the cascade; the RTC running
    // (divider on, 1024 Hz selected, BCD, 24 hours) with a valid time.
    //
    // On the virtual clock (100 us per exit) the guest reads the PIT within channel 0's first
    // half-period (27 ms): OUT is high and IRQ 0 has had no edge yet, and two runs take the
    // same exits. On the host clock a slow start can land past it: channels 0 and 1 may show
    // OUT low (0x36) and IRR IRQ 0 pending, as on a PC.
    let want = "pit status 0=b6 1=b6 2=b6 counting=110\n\
                pic imr=fb,ff irr=00,00 isr=00,00 vectors=08,70\n\
                rtc a=26 b=02 d=80 time=valid\n\
                firmware done\n";
    let mut digests = Vec::new();
    for _ in 0..2 {
        let run = Ftvmm::standalone(&test_guest("firmware"))
            .args(["--clock", "virtual"])
            .run();
        run.assert_code(0);
        assert_eq!(run.stdout, want);
        digests.push(run.digest_line().map(str::to_string));
    }
    assert_eq!(
        digests[0], digests[1],
        "two runs on the virtual clock differ"
    );
    let run = Ftvmm::standalone(&test_guest("firmware")).run();
    run.assert_code(0);
    let timeless = run
        .stdout
        .replace("0=36 1=36", "0=b6 1=b6")
        .replace("irr=01,00", "irr=00,00");
    assert_eq!(timeless, want, "--clock host: {}", run.stdout);
}
