//! The output rule in one process, without KVM: a primary's link and a backup's receiver on a
//! loopback logging channel. An output is handed to the link under the number the log gave
//! the record that produced it, waits for the backup's acknowledgement of that record, and
//! leaves once the backup holds the log up to it.

use ft_core::exit::ExitKind;
use ft_core::log::{Header, LogReader, Record, RecordSink, VERSION};
use ft_core::output::{Output, OutputGate};
use ft_core::replay::{KeptWrites, Progress};
use ft_pair::link::{AckMode, BatchPolicy, Link, Releaser, StreamSink};
use ft_pair::receiver::BackupLink;
use logging_channel::{connect, ChannelConfig, Connection, Listener, Msg, Psk};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A serial line the test can read.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn get(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }

    fn wait_for(&self, want: &[u8], limit: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.get() == want {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }
}

fn channel() -> ChannelConfig {
    ChannelConfig::new(Psk::from_bytes(&[7u8; 32]).unwrap())
}

/// A primary's link (`--max-lag` `max_lag`) with its releaser writing to a captured serial
/// line, and the recorder's sink on it.
fn primary(max_lag: Duration) -> (Arc<Link>, Releaser, StreamSink, Captured) {
    let header = Header {
        version: VERSION,
        config_hash: 42,
        config_summary: "test".into(),
        rtc_epoch: 0,
        mechanisms: None,
    };
    let link = Link::new(header, AckMode::Received, max_lag, None);
    let serial = Captured::default();
    let releaser = link
        .start_releaser(Box::new(serial.clone()), None, None)
        .unwrap();
    let sink = StreamSink::new(link.clone());
    (link, releaser, sink, serial)
}

/// A backup connected to `link` (its end returned: nobody reads it or acknowledges yet), and
/// the stream's first record, its base.
fn attach_backup(link: &Link, sink: &mut StreamSink) -> Connection {
    attach_backup_with(link, sink, channel())
}

fn attach_backup_with(link: &Link, sink: &mut StreamSink, cfg: ChannelConfig) -> Connection {
    let listener = Listener::bind("127.0.0.1:0", cfg.clone()).unwrap();
    let addr = listener.local_addr().to_string();
    let backup_end = std::thread::spawn(move || connect(&addr, cfg).unwrap());
    let primary_end = listener
        .accept_timeout(Duration::from_secs(10))
        .expect("the backup connects");
    let backup_end = backup_end.join().unwrap();
    link.attach(primary_end);
    assert!(link.protected());
    sink.record(&Record::Base {
        rip: 0x1000,
        time_ns: 0,
        exits: 0,
    })
    .unwrap();
    backup_end
}

/// The guest writes `bytes` on its serial line: the output's record, then the output handed to
/// the gate under the record's number, which is returned.
fn serial_output(sink: &mut StreamSink, link: &Link, bytes: &[u8]) -> u64 {
    let seq = sink
        .record_output(&Record::Output {
            kind: 0,
            len: bytes.len() as u32,
            crc: crc32c::crc32c(bytes),
        })
        .unwrap();
    link.hold(seq, Output::Serial(bytes.to_vec()));
    seq
}

#[test]
fn an_output_leaves_once_the_backup_holds_its_record() {
    let (link, releaser, mut sink, serial) = primary(Duration::from_secs(1));

    // Unprotected, the log goes nowhere (number 0) and an output leaves at once.
    let seq = serial_output(&mut sink, &link, b"a");
    assert_eq!(seq, 0);
    assert!(serial.wait_for(b"a", Duration::from_secs(5)));

    // A backup attaches (its receiver not started yet: it acknowledges nothing).
    let backup_end = attach_backup(&link, &mut sink);
    let seq = serial_output(&mut sink, &link, b"b");
    assert_eq!(seq, 2, "frame 0 is the header, 1 the base");
    // The batch with the output waits 2 ms for company; then it goes out at the next record,
    // when the recorder flushes (the guest halts, a switchover drains), or at a kick (the guest
    // runs on without exits): here, a kick. Without it, nothing below would be acknowledged.
    std::thread::sleep(Duration::from_millis(3));
    sink.tick().unwrap();
    // Held: the backup has not acknowledged record `seq`.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        serial.get(),
        b"a",
        "an output left before its acknowledgement"
    );
    assert_eq!(
        link.stats.held.load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    // The backup's receiver starts: it acknowledges what it holds, and the output leaves.
    let progress = Arc::new(Progress::default());
    let kept = Arc::new(Mutex::new(KeptWrites::default()));
    let (backup, _threads) = BackupLink::start(backup_end, progress, kept).unwrap();
    assert!(serial.wait_for(b"ab", Duration::from_secs(10)));
    assert!(backup.received() > seq);

    // What the backup holds is the stream: the header, then the records in order.
    let (mut reader, got) = LogReader::new(backup.reader()).unwrap();
    assert_eq!(got.config_hash, 42);
    assert!(matches!(
        reader.read_record().unwrap(),
        Some(Record::Base { rip: 0x1000, .. })
    ));
    assert!(matches!(
        reader.read_record().unwrap(),
        Some(Record::Output { len: 1, .. })
    ));

    backup.stop("test over");
    releaser.finish(Duration::from_millis(100));
}

/// A primary that stops while its backup is connected but never acknowledges (starved, or
/// wedged) waits for the acknowledgements as long as it was told, then stops: the outputs the
/// rule still holds stay held, and the VMM does not wait for them forever.
#[test]
fn stopping_does_not_wait_forever_for_a_backup_that_never_acknowledges() {
    let (link, releaser, mut sink, serial) = primary(Duration::from_secs(60));
    // The backup's end is connected and kept open, and never reads or acknowledges.
    let _backup_end = attach_backup(&link, &mut sink);
    serial_output(&mut sink, &link, b"x");
    sink.flush().unwrap();
    let (done, stopped) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        releaser.finish(Duration::from_millis(200));
        let _ = done.send(());
    });
    assert!(
        stopped.recv_timeout(Duration::from_secs(60)).is_ok(),
        "the releaser never stopped"
    );
    assert_eq!(
        serial.get(),
        b"",
        "an output left without its acknowledgement"
    );
}

/// The records of one batch `end` received, or None when no batch came within `limit` (the
/// channel's own heartbeats are not messages).
fn next_batch(end: &Connection, limit: Duration) -> Option<u32> {
    match end.recv_timeout(limit).unwrap() {
        Some(Msg::Log { frames, .. }) => Some(frames),
        Some(other) => panic!("expected a log batch, got {other:?}"),
        None => None,
    }
}

fn exit(kind: ExitKind) -> Record {
    Record::Exit {
        kind: kind as u8,
        addr: 0x21,
        data: 0,
        len: 1,
        rip_delta: 0,
    }
}

/// A log batch without an output leaves once the guest has *run* `--batch-run` without halting,
/// or five times that in short runs between halts: halts do not count (a halt replays at once),
/// so an idle guest's ticks gather until `--batch-age`, a guest busy in short bursts sends
/// every few bursts, and a running guest's records leave as soon as it ran `--batch-run`.
#[test]
fn a_batch_leaves_once_the_guest_ran_long_enough_and_an_idle_guests_at_its_age() {
    let (link, _releaser, mut sink, _serial) = primary(Duration::from_secs(60));
    link.set_batch_policy(BatchPolicy {
        run: Duration::from_millis(200),
        age: Duration::from_secs(5),
    });
    // Heartbeats far apart: an idle batch leaves in place of one (below, the next test).
    let mut cfg = channel();
    cfg.heartbeat = Duration::from_secs(30);
    cfg.timeout = Duration::from_secs(60);
    let backup_end = attach_backup_with(&link, &mut sink, cfg);
    assert_eq!(
        next_batch(&backup_end, Duration::from_secs(10)),
        Some(2),
        "the header and the base leave at once"
    );

    // Idle: five ticks, each a halt of 40 ms, an interrupt and a port access.
    for _ in 0..5 {
        sink.record(&exit(ExitKind::Hlt)).unwrap();
        std::thread::sleep(Duration::from_millis(40));
        sink.record(&Record::Interrupt { vector: 0x30 }).unwrap();
        sink.record(&exit(ExitKind::PioOut)).unwrap();
    }
    assert_eq!(
        next_batch(&backup_end, Duration::from_millis(50)),
        None,
        "200 ms of halts sent a batch: halted time counted as running"
    );

    // Bursts: 20 ms of running, then a halt of 5 ms; the batch leaves after 1 s of them (five
    // runs' worth), long before its age.
    let mut bursts = 0;
    let frames = loop {
        sink.record(&exit(ExitKind::PioOut)).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        sink.record(&exit(ExitKind::Hlt)).unwrap();
        bursts += 1;
        if let Some(frames) = next_batch(&backup_end, Duration::from_millis(5)) {
            break frames;
        }
        sink.record(&Record::Interrupt { vector: 0x30 }).unwrap();
        assert!(
            bursts < 120,
            "a guest running in bursts never sent its batch"
        );
    };
    assert!(
        bursts >= 15,
        "sent after {bursts} bursts of 20 ms: a halt did not end the run"
    );
    assert_eq!(frames, 15 + 3 * bursts - 1);

    // Busy: port accesses 25 ms apart, the guest running in between.
    let mut busy = 0;
    let frames = loop {
        sink.record(&exit(ExitKind::PioOut)).unwrap();
        busy += 1;
        if let Some(frames) = next_batch(&backup_end, Duration::from_millis(25)) {
            break frames;
        }
        assert!(busy < 100, "a running guest's batch never left");
    };
    assert!(busy >= 2, "sent after {busy} records 25 ms apart");
    assert_eq!(frames, busy);

    // Idle past the batch's age: what waited leaves with the next record.
    sink.record(&exit(ExitKind::Hlt)).unwrap();
    std::thread::sleep(Duration::from_millis(5100));
    sink.record(&Record::Interrupt { vector: 0x30 }).unwrap();
    assert_eq!(next_batch(&backup_end, Duration::from_secs(10)), Some(2));
}

/// A checkpoint another thread encodes (the vCPU runs on meanwhile) keeps its place in the
/// stream: the records made after it wait behind it, with the numbers they were given, and an
/// output among them leaves only once the backup holds it (so also the checkpoint before it).
#[test]
fn records_made_while_a_checkpoint_is_encoded_follow_it_in_order() {
    use ft_core::log::PendingCheckpoint;
    let (link, releaser, mut sink, serial) = primary(Duration::from_secs(60));
    assert!(sink.defers());
    let backup_end = attach_backup(&link, &mut sink);
    let before = sink.record(&exit(ExitKind::PioOut)).unwrap();
    assert_eq!(before, 2, "frame 0 is the header, 1 the base");

    let (encoded, rx) = std::sync::mpsc::sync_channel(1);
    let counted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = counted.clone();
    let checkpoint = sink
        .record_later(
            PendingCheckpoint::new(rx)
                .on_done(move |len| seen.store(len, std::sync::atomic::Ordering::Relaxed)),
        )
        .unwrap();
    assert_eq!(checkpoint, 3);
    // While it is encoded: an interrupt, the serial output "c", a port access, a kick.
    assert_eq!(sink.record(&Record::Interrupt { vector: 0x30 }).unwrap(), 4);
    assert_eq!(serial_output(&mut sink, &link, b"c"), 5);
    assert_eq!(sink.record(&exit(ExitKind::PioOut)).unwrap(), 6);
    std::thread::sleep(Duration::from_millis(3));
    sink.tick().unwrap();

    // The backup's receiver runs and acknowledges all it holds: the output stays held, for
    // its record waits behind the checkpoint.
    let progress = Arc::new(Progress::default());
    let kept = Arc::new(Mutex::new(KeptWrites::default()));
    let (backup, _threads) = BackupLink::start(backup_end, progress, kept).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        serial.get(),
        b"",
        "an output left before the checkpoint it follows"
    );
    assert!(
        backup.received() <= checkpoint,
        "frames passed the checkpoint"
    );

    // The encoder is done: at the next kick everything leaves in order, and the output with it.
    encoded.send(Ok(vec![0xc5; 1000])).unwrap();
    sink.tick().unwrap();
    std::thread::sleep(Duration::from_millis(3));
    sink.flush().unwrap();
    assert!(serial.wait_for(b"c", Duration::from_secs(10)));
    assert_eq!(counted.load(std::sync::atomic::Ordering::Relaxed), 1000);

    let (mut reader, _) = LogReader::new(backup.reader()).unwrap();
    let mut got = Vec::new();
    for _ in 0..6 {
        got.push(reader.read_record().unwrap().unwrap());
    }
    assert!(matches!(got[0], Record::Base { .. }), "{got:?}");
    assert!(matches!(got[1], Record::Exit { .. }), "{got:?}");
    assert!(
        matches!(&got[2], Record::Checkpoint { data } if data == &vec![0xc5; 1000]),
        "{got:?}"
    );
    assert!(
        matches!(got[3], Record::Interrupt { vector: 0x30 }),
        "{got:?}"
    );
    assert!(matches!(got[4], Record::Output { len: 1, .. }), "{got:?}");
    assert!(matches!(got[5], Record::Exit { .. }), "{got:?}");

    // An encoder that fails ends the stream with its reason, not a panic.
    let (encoded, rx) = std::sync::mpsc::sync_channel(1);
    sink.record_later(PendingCheckpoint::new(rx)).unwrap();
    encoded.send(Err("out of memory".into())).unwrap();
    let err = sink.flush().unwrap_err();
    assert!(err.to_string().contains("out of memory"), "{err}");

    backup.stop("test over");
    releaser.finish(Duration::from_millis(100));
}

/// An idle guest's batch leaves in place of the channel's heartbeat, once per heartbeat period
/// (50 ms): its ticks gather until then, the batch goes a little before the heartbeat would,
/// and no heartbeat goes in between.
#[test]
fn an_idle_guests_batch_leaves_in_place_of_the_heartbeat() {
    let (link, _releaser, mut sink, _serial) = primary(Duration::from_secs(60));
    let backup_end = attach_backup(&link, &mut sink);
    assert_eq!(next_batch(&backup_end, Duration::from_secs(10)), Some(2));
    let conn = link.connection().unwrap();
    let beats = conn.stats().heartbeats_sent;
    let start = std::time::Instant::now();
    let (mut batches, mut frames) = (0, 0);
    // A second of ticks, 10 ms apart: a halt, an interrupt and a port access each.
    while start.elapsed() < Duration::from_secs(1) {
        sink.record(&exit(ExitKind::Hlt)).unwrap();
        sink.flush().unwrap();
        std::thread::sleep(Duration::from_millis(10));
        sink.record(&Record::Interrupt { vector: 0x30 }).unwrap();
        sink.record(&exit(ExitKind::PioOut)).unwrap();
        while let Some(n) = next_batch(&backup_end, Duration::ZERO) {
            batches += 1;
            frames += n;
        }
    }
    // About one batch a heartbeat period, not one a tick; the margins are for a loaded host
    // (a vCPU thread that was not scheduled in time lets a heartbeat go, as it must).
    assert!(
        (8..=40).contains(&batches),
        "{batches} batches in a second of ticks ({frames} frames)"
    );
    let beats = conn.stats().heartbeats_sent - beats;
    assert!(
        beats <= 3,
        "{beats} heartbeats went beside {batches} batches"
    );
}

/// A backup that stops acknowledging (connected, but wedged, starved, or its answers held up on
/// the way) slows the guest down; it does not stop it. A throttle that waited its whole limit in
/// vain lets the guest run `--max-lag` of its own time past the hold before the next: the
/// guest's clock ran on while the vCPU was held, and the record after the hold says so. Counted
/// from before the hold, the first record after it throttled again, and a guest whose backup's
/// acknowledgements stopped made one batch a second (here a batch is a record).
#[test]
fn a_throttle_that_waited_in_vain_lets_the_guest_run_the_bound_past_its_hold() {
    use std::sync::atomic::Ordering::Relaxed;
    const MS: u64 = 1_000_000;
    let (link, _releaser, mut sink, _serial) = primary(Duration::from_millis(50));
    // Every record leaves at once: the throttle looks at what was sent.
    link.set_batch_policy(BatchPolicy {
        run: Duration::ZERO,
        age: Duration::ZERO,
    });
    let backup_end = attach_backup(&link, &mut sink);
    // The backup replays the header and the base, says so once, and never again.
    backup_end
        .send(Msg::Ack {
            received: 2,
            executed: 2,
            vtime_ns: 0,
        })
        .unwrap();
    let conn = link.connection().unwrap();
    let start = Instant::now();
    while conn.acked().1 < 2 {
        assert!(start.elapsed() < Duration::from_secs(10), "no ack arrived");
        std::thread::sleep(Duration::from_millis(1));
    }
    let counts = || {
        (
            link.stats.throttled.load(Relaxed),
            link.stats.lag_exceeded.load(Relaxed),
        )
    };

    // 60 ms: the backup waits at the last frame sent, which is caught up.
    sink.record(&Record::Clock { delta: 60 * MS }).unwrap();
    assert_eq!(counts(), (0, 0));
    // 120 ms: past the bound, and the backup never answers: the throttle holds the vCPU its
    // limit, then gives up.
    let held = Instant::now();
    sink.record(&Record::Clock { delta: 60 * MS }).unwrap();
    let held = held.elapsed();
    assert_eq!(counts(), (1, 1));
    assert!(held >= Duration::from_secs(1), "held {held:?}");

    // The guest's clock ran on through the hold; 10 ms more of guest time is within the bound.
    let delta = u64::try_from(held.as_nanos()).unwrap() + 10 * MS;
    sink.record(&Record::Clock { delta }).unwrap();
    sink.record(&exit(ExitKind::PioOut)).unwrap();
    assert_eq!(
        counts(),
        (1, 1),
        "the vCPU was held again within --max-lag of guest time after the hold"
    );
    // Past the bound again: the next throttle.
    sink.record(&Record::Clock { delta: 60 * MS }).unwrap();
    assert_eq!(counts(), (2, 2));
    drop(backup_end);
}
