//! What the tests check in what ftvmm printed: the serial stream across a failover (`ticks`,
//! the Linux `counter`, `diskwrite`'s records), numbered lines, a status document's numbers.

use crate::{wait_until, Proc};
use std::path::Path;
use std::time::Duration;

/// The number after `"key": ` in a status document.
pub fn json_number(doc: &str, key: &str) -> Option<u64> {
    let pat = format!("\"{key}\": ");
    let at = doc.find(&pat)? + pat.len();
    doc[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Output an old primary may have released before it died, re-sent by the new one: a few UART
/// bytes (the guest writes the serial line a byte at a time).
pub const MAX_DUP: usize = 64;

/// `before` (the dead primary's output) and `after` (the new primary's) joined: `after` may
/// begin with up to [`MAX_DUP`] bytes that end `before`. Returns every way of joining them.
pub fn joins(before: &str, after: &str) -> Vec<String> {
    (0..=MAX_DUP.min(after.len()))
        .filter(|&k| after.is_char_boundary(k) && before.ends_with(&after[..k]))
        .map(|k| format!("{before}{}", &after[k..]))
        .collect()
}

/// The last tick of a `ticks` guest's output when it is every tenth tick in order (None
/// otherwise).
pub fn ticks_upto(out: &str) -> Option<u32> {
    let mut n = 0;
    // A last line cut short by a kill is the start of the next tick (the next primary completes
    // or re-emits it); every whole line is the next tick.
    let (whole, cut) = out.rsplit_once('\n').map_or(("", out), |(w, c)| (w, c));
    for line in whole.lines() {
        let v: u32 = line.strip_prefix("tick ")?.parse().ok()?;
        if v != n + 10 {
            return None;
        }
        n = v;
    }
    format!("tick {}\n", n + 10).starts_with(cut).then_some(n)
}

/// The joined serial stream is every tick in order, up to `last`.
pub fn assert_ticks_across(before: &str, after: &str, last: u32) {
    assert!(
        joins(before, after)
            .iter()
            .any(|s| ticks_upto(s) == Some(last) && s.ends_with('\n')),
        "the client's stream has a gap or a wrong line:\n--- before ---\n{before}\n--- after ---\n{after}"
    );
}

/// Numbers `n` of `prefix<n>suffix` lines, in order of appearance (lines cut short are
/// skipped).
pub fn numbers(out: &str, prefix: &str, suffix: &str) -> Vec<u64> {
    // Only whole lines: a stream stopped (or killed) mid-line ends in the first bytes of the next
    // line, and `n=9` cut from `n=957` is not the number 9.
    out.split_inclusive('\n')
        .filter_map(|l| {
            l.strip_suffix('\n')?
                .trim_end_matches('\r')
                .strip_prefix(prefix)?
                .strip_suffix(suffix)?
                .parse()
                .ok()
        })
        .collect()
}

/// The number of the last whole `record N synced` line `diskwrite` printed in `out` (0: none).
pub fn last_synced(out: &str) -> u64 {
    numbers(out, "record ", " synced")
        .last()
        .copied()
        .unwrap_or(0)
}

/// Waits (up to `limit`) until `p` printed a whole `record N synced` line with N >= `n`: the
/// workload goes on (a liveness check, not a speed). A stream that begins with the end of a
/// line another primary cut short counts from its first whole line.
pub fn wait_synced(p: &Proc, n: u64, limit: Duration) -> bool {
    wait_until(limit, Duration::from_millis(100), || {
        last_synced(&p.stdout()) >= n
    })
}

/// Whether `v` counts up by one.
pub fn consecutive(v: &[u64]) -> bool {
    v.windows(2).all(|w| w[1] == w[0] + 1)
}

/// What is wrong with `v` as the count 1, 2, 3...: None when it is that count, else the first
/// place it breaks (a failure message that names the spot, not the thousand lines around it).
pub fn count_break(v: &[u64]) -> Option<String> {
    match v.first() {
        None => return Some("no numbered line at all".into()),
        Some(&first) if first != 1 => return Some(format!("it begins at {first}, not 1")),
        _ => {}
    }
    let i = v.windows(2).position(|w| w[1] != w[0] + 1)?;
    let what = if v[i + 1] <= v[i] {
        "a repeat"
    } else {
        "a gap"
    };
    Some(format!(
        "{what} after {} whole lines: {} is followed by {} (around it: {:?})",
        i + 1,
        v[i],
        v[i + 1],
        &v[i.saturating_sub(3)..(i + 5).min(v.len())]
    ))
}

/// A failover trial of the Linux `counter` workload: `before` (the dead primary's serial
/// output) and `after` (the new primary's) joined count 1, 2, 3... with no gap, and the new
/// primary printed at least five more.
pub fn assert_counter_across(trial: usize, before: &str, after: &str) {
    let ok = joins(before, after).iter().any(|s| {
        let n = numbers(s, "n=", "");
        !n.is_empty()
            && n[0] == 1
            && consecutive(&n)
            && n.len() >= numbers(before, "n=", "").len() + 5
    });
    assert!(
        ok,
        "trial {trial}: the counter has a gap, a wrong value or stopped\n--- before ---\n{before}\n--- after ---\n{after}"
    );
}

/// A failover trial of the Linux `diskwrite` workload: the client's `record N synced` lines
/// across both primaries have no gap, and every record the client saw synced is on `disk`.
pub fn assert_synced_records_kept(trial: usize, before: &str, after: &str, disk: &Path) {
    let seen = joins(before, after)
        .iter()
        .map(|s| numbers(s, "record ", " synced"))
        .find(|n| !n.is_empty() && n[0] == 1 && consecutive(n));
    let Some(&last_seen) = seen.as_ref().and_then(|n| n.last()) else {
        panic!("trial {trial}: the client's record lines have a gap\n--- before ---\n{before}\n--- after ---\n{after}");
    };
    let on_disk = records_on_disk(disk);
    assert!(
        on_disk >= last_seen,
        "trial {trial}: the client saw record {last_seen} synced, the disk holds 1..{on_disk}"
    );
}

/// The records the Linux guest's `diskwrite` left on `disk`: record n at sector n-1, valid,
/// in order; the number of them.
pub fn records_on_disk(disk: &Path) -> u64 {
    let data = std::fs::read(disk).unwrap();
    let mut n = 0;
    for sector in data.chunks(512) {
        let line = String::from_utf8_lossy(sector);
        let line = line.trim_end_matches('\0');
        if !line.starts_with(&format!("FTVMMREC {} ", n + 1)) {
            break;
        }
        n += 1;
    }
    n
}

/// `GET path` of an HTTP server at `addr` (a side's `--metrics`): the whole response, status
/// line and headers included. Waits at most 10 s for the answer.
pub fn http_get(addr: &str, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_cut_short_is_not_a_number() {
        // A pair stopped while the guest was writing `n=957`.
        let stream = "boot\r\nn=955\r\nn=956\r\nn=9";
        assert_eq!(numbers(stream, "n=", ""), [955, 956]);
        assert_eq!(
            numbers("record 1 synced\nrecord 2 syn", "record ", " synced"),
            [1]
        );
    }

    #[test]
    fn a_count_break_names_the_spot() {
        assert_eq!(count_break(&[1, 2, 3]), None);
        assert!(count_break(&[]).unwrap().contains("no numbered line"));
        assert!(count_break(&[2, 3]).unwrap().contains("begins at 2"));
        let gap = count_break(&[1, 2, 4, 5]).unwrap();
        assert!(
            gap.starts_with("a gap") && gap.contains("2 is followed by 4"),
            "{gap}"
        );
        let repeat = count_break(&[1, 2, 3, 3]).unwrap();
        assert!(repeat.starts_with("a repeat"), "{repeat}");
    }
}
