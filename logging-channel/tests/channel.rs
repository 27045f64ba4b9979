//! The channel over real TCP on 127.0.0.1.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use logging_channel::{
    connect, ChannelConfig, ChannelError, Connection, Listener, Msg, Psk, NOISE_PATTERN,
    PROTOCOL_VERSION,
};

const KEY: &[u8] = b"the test pre-shared key, 32 byte";
const LONG: Duration = Duration::from_secs(10);

fn cfg() -> ChannelConfig {
    ChannelConfig::new(Psk::from_bytes(KEY).unwrap())
}

/// A connected (primary, backup) pair, and the listener.
fn pair(cfg: ChannelConfig) -> (Listener, Connection, Connection) {
    let listener = Listener::bind("127.0.0.1:0", cfg.clone()).unwrap();
    let backup = connect(&listener.local_addr().to_string(), cfg).unwrap();
    let primary = listener
        .accept_timeout(LONG)
        .expect("primary side connection");
    (listener, primary, backup)
}

/// Polls `cond` until it holds or `within` passes.
fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(10));
    }
    cond()
}

#[test]
fn attach_and_messages_both_ways() {
    let (listener, primary, backup) = pair(cfg());
    assert_eq!(primary.acked(), (0, 0, 0));
    let hello = Msg::Hello {
        version: PROTOCOL_VERSION,
        config_hash: 42,
        config_summary: "ram=64M".into(),
    };
    backup.send(hello.clone()).unwrap();
    assert_eq!(primary.recv().unwrap(), hello);
    primary
        .send(Msg::Welcome {
            ack_executed: false,
        })
        .unwrap();
    assert_eq!(
        backup.recv().unwrap(),
        Msg::Welcome {
            ack_executed: false
        }
    );

    primary.send(Msg::Transfer(vec![9; 1000])).unwrap();
    primary.send_log(0, 4, true, vec![1, 2, 3, 4]).unwrap();
    primary.send(Msg::Released { seq: 0 }).unwrap();
    assert_eq!(backup.recv().unwrap(), Msg::Transfer(vec![9; 1000]));
    assert_eq!(
        backup.recv().unwrap(),
        Msg::Log {
            first_seq: 0,
            frames: 4,
            carries_output: true,
            bytes: vec![1, 2, 3, 4]
        }
    );
    assert_eq!(backup.recv().unwrap(), Msg::Released { seq: 0 });
    assert_eq!(primary.stats().log_bytes_outstanding, 4);

    backup
        .send(Msg::Ack {
            received: 4,
            executed: 2,
            vtime_ns: 777,
        })
        .unwrap();
    assert_eq!(primary.wait_ack((0, 0, 0), LONG), (4, 2, 777));
    assert_eq!(primary.acked(), (4, 2, 777));
    assert_eq!(primary.stats().log_bytes_outstanding, 0);
    // Acks are absorbed: nothing else is waiting.
    assert_eq!(primary.try_recv().unwrap(), None);

    backup
        .send(Msg::ResyncRequest {
            reason: "digest mismatch".into(),
        })
        .unwrap();
    assert!(matches!(
        primary.recv_timeout(LONG).unwrap(),
        Some(Msg::ResyncRequest { .. })
    ));

    // The writer counts a batch once its write returned, which may be after the peer read it.
    let counted = |s: &logging_channel::ChannelStats| {
        s.bytes_sent > 1000 && s.bytes_received > 0 && s.msgs_sent >= 3 && s.msgs_received >= 3
    };
    assert!(
        eventually(LONG, || counted(&primary.stats())),
        "{:?}",
        primary.stats()
    );
    assert_eq!(backup.peer_addr(), listener.local_addr());

    backup.close("backup shutting down");
    assert!(!backup.is_alive());
    assert_eq!(
        primary.recv().unwrap(),
        Msg::Bye {
            reason: "backup shutting down".into()
        }
    );
    assert!(matches!(primary.recv(), Err(ChannelError::Closed(_))));
    assert!(primary.failure().unwrap().contains("backup shutting down"));
    let after = backup.send(Msg::Heartbeat);
    assert!(matches!(after, Err(ChannelError::Closed(_))), "{after:?}");
}

#[test]
fn wrong_key_is_refused_on_both_sides() {
    let listener = Listener::bind("127.0.0.1:0", cfg()).unwrap();
    let other = ChannelConfig::new(Psk::from_bytes(b"some other key, also 32 bytes!!").unwrap());
    let err = connect(&listener.local_addr().to_string(), other).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ChannelError::Handshake { .. }), "{msg}");
    assert!(msg.contains("pre-shared key"), "{msg}");
    assert!(eventually(LONG, || listener.refused() == 1));
    assert!(listener.try_accept().is_none());

    // The listener still accepts the right key afterwards.
    let backup = connect(&listener.local_addr().to_string(), cfg()).unwrap();
    let primary = listener.accept_timeout(LONG).unwrap();
    backup
        .send(Msg::Welcome {
            ack_executed: false,
        })
        .unwrap();
    assert_eq!(
        primary.recv().unwrap(),
        Msg::Welcome {
            ack_executed: false
        }
    );
}

#[test]
fn garbage_instead_of_a_handshake_is_refused() {
    let listener = Listener::bind("127.0.0.1:0", cfg()).unwrap();
    let mut raw = TcpStream::connect(listener.local_addr()).unwrap();
    raw.write_all(&[0, 40]).unwrap();
    raw.write_all(&[0x55; 40]).unwrap();
    assert!(eventually(LONG, || listener.refused() == 1));
    // It was told (empty frame) and dropped.
    let mut answer = Vec::new();
    raw.set_read_timeout(Some(LONG)).unwrap();
    let _ = raw.read_to_end(&mut answer);
    assert_eq!(answer, [0, 0]);
    assert!(listener.try_accept().is_none());
}

#[test]
fn unreachable_primary_is_an_error() {
    // A port nobody listens on: bind one and drop it.
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let err = connect(&addr.to_string(), cfg()).unwrap_err();
    assert!(err.to_string().contains("cannot connect"), "{err}");
}

/// Reads one length-prefixed Noise frame from a blocking socket.
fn read_frame(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len)?;
    let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut body)?;
    Ok(body)
}

fn write_frame(s: &mut TcpStream, body: &[u8]) -> std::io::Result<()> {
    let mut out = (body.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    s.write_all(&out)
}

/// Forwards frames from `from` to `to`, flipping one bit of frame number `flip` (if any).
fn pump(mut from: TcpStream, mut to: TcpStream, flip: Option<usize>) {
    for n in 0.. {
        let Ok(mut frame) = read_frame(&mut from) else {
            break;
        };
        if Some(n) == flip {
            let mid = frame.len() / 2;
            frame[mid] ^= 0x01;
        }
        if write_frame(&mut to, &frame).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
}

#[test]
fn altered_frame_fails_authentication() {
    let listener = Listener::bind("127.0.0.1:0", cfg()).unwrap();
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_addr = proxy.local_addr().unwrap();
    let upstream = listener.local_addr();
    thread::spawn(move || {
        let (client, _) = proxy.accept().unwrap();
        let server = TcpStream::connect(upstream).unwrap();
        let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        // Backup -> primary: frame 0 is the handshake, frame 1 the first transport message.
        thread::spawn(move || pump(client, server, Some(1)));
        pump(s2, c2, None);
    });

    let backup = connect(&proxy_addr.to_string(), cfg()).unwrap();
    let primary = listener.accept_timeout(LONG).unwrap();
    backup
        .send(Msg::Hello {
            version: PROTOCOL_VERSION,
            config_hash: 1,
            config_summary: "x".into(),
        })
        .unwrap();
    let err = primary.recv_timeout(LONG).unwrap_err();
    assert!(matches!(err, ChannelError::Broken(_)), "{err}");
    let why = primary.failure().unwrap();
    assert!(why.contains("failed authentication"), "{why}");
    assert!(!primary.is_alive());
    // The backup sees its connection end.
    assert!(eventually(LONG, || !backup.is_alive()));
}

#[test]
fn send_log_blocks_until_acked() {
    let mut c = cfg();
    c.log_buffer = 64 << 10;
    let (_l, primary, backup) = pair(c);
    let batch = 16 << 10;
    let (done_tx, done_rx) = mpsc::channel();
    let sender = {
        let primary = primary.clone();
        thread::spawn(move || {
            for i in 0..8u64 {
                primary
                    .send_log(i * 10, 10, false, vec![i as u8; batch])
                    .unwrap();
                done_tx.send(i).unwrap();
            }
        })
    };
    // Four batches fill the 64 KiB; the fifth waits for an ack that does not come.
    for want in 0..4 {
        assert_eq!(done_rx.recv_timeout(LONG).unwrap(), want);
    }
    assert!(done_rx.recv_timeout(Duration::from_millis(300)).is_err());
    assert_eq!(primary.stats().log_bytes_outstanding, 4 * batch as u64);

    // The backup holds the first two batches: room for two more.
    for _ in 0..4 {
        assert!(matches!(backup.recv().unwrap(), Msg::Log { .. }));
    }
    backup
        .send(Msg::Ack {
            received: 20,
            executed: 0,
            vtime_ns: 0,
        })
        .unwrap();
    assert_eq!(done_rx.recv_timeout(LONG).unwrap(), 4);
    assert_eq!(done_rx.recv_timeout(LONG).unwrap(), 5);
    assert!(done_rx.recv_timeout(Duration::from_millis(300)).is_err());

    backup
        .send(Msg::Ack {
            received: 80,
            executed: 80,
            vtime_ns: 0,
        })
        .unwrap();
    sender.join().unwrap();
    let mut frames = 40;
    while frames < 80 {
        let Msg::Log {
            first_seq,
            frames: n,
            bytes,
            ..
        } = backup.recv().unwrap()
        else {
            panic!("expected a log batch")
        };
        assert_eq!(first_seq, frames);
        assert_eq!(bytes, vec![(first_seq / 10) as u8; batch]);
        frames += u64::from(n);
    }
}

#[test]
fn oversize_batch_passes_when_nothing_is_in_flight() {
    let mut c = cfg();
    c.log_buffer = 1024;
    let (_l, primary, backup) = pair(c);
    primary.send_log(0, 1, false, vec![5; 100_000]).unwrap();
    assert!(matches!(backup.recv().unwrap(), Msg::Log { .. }));
}

#[test]
fn dead_connection_wakes_a_blocked_send_log() {
    let mut c = cfg();
    c.log_buffer = 1024;
    let (_l, primary, backup) = pair(c);
    primary.send_log(0, 1, false, vec![0; 1024]).unwrap();
    let blocked = {
        let primary = primary.clone();
        thread::spawn(move || primary.send_log(1, 1, false, vec![0; 1024]))
    };
    thread::sleep(Duration::from_millis(200));
    assert!(!blocked.is_finished());
    drop(backup);
    let result = blocked.join().unwrap();
    assert!(result.is_err(), "{result:?}");
    assert!(!primary.is_alive());
    // wait_ack returns at once on a dead connection.
    let t = Instant::now();
    primary.wait_ack((0, 0, 0), LONG);
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn messages_larger_than_a_noise_frame() {
    let (_l, primary, backup) = pair(cfg());
    let big: Vec<u8> = (0..5u32 << 20).map(|i| (i * 7 + i / 251) as u8).collect();
    primary.send(Msg::Transfer(big.clone())).unwrap();
    primary
        .send(Msg::Welcome {
            ack_executed: false,
        })
        .unwrap();
    assert_eq!(backup.recv().unwrap(), Msg::Transfer(big));
    assert_eq!(
        backup.recv().unwrap(),
        Msg::Welcome {
            ack_executed: false
        }
    );
    // And the other way.
    let summary = "s".repeat(200_000);
    backup
        .send(Msg::Hello {
            version: 1,
            config_hash: 2,
            config_summary: summary.clone(),
        })
        .unwrap();
    let Msg::Hello { config_summary, .. } = primary.recv().unwrap() else {
        panic!("expected Hello")
    };
    assert_eq!(config_summary, summary);
}

#[test]
fn heartbeats_keep_an_idle_connection_alive() {
    // Twice the timeout without a message but heartbeats; the timeout generous enough that a
    // loaded machine (CPU hogs beside the test) does not starve this process that long.
    let mut c = cfg();
    c.timeout = Duration::from_secs(3);
    c.heartbeat = Duration::from_millis(50);
    let (_l, primary, backup) = pair(c);
    thread::sleep(Duration::from_secs(6));
    assert!(primary.is_alive(), "{:?}", primary.failure());
    assert!(backup.is_alive(), "{:?}", backup.failure());
    assert_eq!(primary.try_recv().unwrap(), None);
    assert!(primary.stats().msgs_received >= 5, "{:?}", primary.stats());
}

/// A backup that completes the handshake by hand, then never sends a byte.
fn silent_backup(addr: SocketAddr) -> TcpStream {
    let key: [u8; 32] = {
        use sha2::Digest;
        sha2::Sha256::digest(KEY).into()
    };
    let mut hs = snow::Builder::new(NOISE_PATTERN.parse().unwrap())
        .psk(0, &key)
        .unwrap()
        .build_initiator()
        .unwrap();
    let mut s = TcpStream::connect(addr).unwrap();
    let mut buf = [0u8; 65535];
    let n = hs.write_message(&[], &mut buf).unwrap();
    write_frame(&mut s, &buf[..n]).unwrap();
    let reply = read_frame(&mut s).unwrap();
    hs.read_message(&reply, &mut buf).unwrap();
    assert!(hs.is_handshake_finished());
    s
}

/// A primary whose peer's silence counts as a loss after `timeout`, and its [`silent_backup`].
fn primary_with_a_silent_backup(timeout: Duration) -> (Listener, TcpStream, Connection) {
    let mut c = cfg();
    c.timeout = timeout;
    let listener = Listener::bind("127.0.0.1:0", c).unwrap();
    let silent = silent_backup(listener.local_addr());
    let primary = listener.accept_timeout(LONG).unwrap();
    (listener, silent, primary)
}

#[test]
fn silent_peer_is_lost_after_the_timeout() {
    let (_l, _silent, primary) = primary_with_a_silent_backup(Duration::from_millis(500));
    let start = Instant::now();
    let err = primary.recv().unwrap_err();
    assert!(matches!(err, ChannelError::PeerLost(_)), "{err}");
    assert!(start.elapsed() < Duration::from_millis(500) + Duration::from_secs(3));
    let why = primary.failure().unwrap();
    assert!(why.contains("peer silent for 0.5 s"), "{why}");
}

/// Makes the kernel drop every segment arriving for `s` (a socket filter that accepts
/// nothing): it acknowledges nothing from now on, as a host that died or was cut off.
fn drop_everything_arriving(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let mut reject = [libc::sock_filter {
        code: 0x06, // BPF_RET | BPF_K: accept 0 bytes
        jt: 0,
        jf: 0,
        k: 0,
    }];
    let prog = libc::sock_fprog {
        len: 1,
        filter: reject.as_mut_ptr(),
    };
    // SAFETY: a valid socket and a one-instruction classic BPF program that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&raw const prog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
}

/// A peer whose process never speaks but whose kernel acknowledges (a stopped or starved
/// process on a live host) is slow, not lost, until the timeout.
#[test]
fn a_silent_peer_whose_host_acknowledges_is_slow_until_the_timeout() {
    let (_l, _silent, primary) = primary_with_a_silent_backup(Duration::from_secs(5));
    // Heartbeats go every 50 ms and the silent side's kernel ACKs each: well past the 80 ms of
    // the unacknowledged-data timeout, the peer is slow, not lost.
    thread::sleep(Duration::from_millis(1500));
    assert!(primary.is_alive(), "{:?}", primary.failure());
    let stats = primary.stats();
    assert!(stats.peer_slow, "{stats:?}");
    assert_eq!(stats.slow_peer_episodes, 1, "{stats:?}");
    let err = primary.recv_timeout(LONG * 3).unwrap_err();
    assert!(matches!(err, ChannelError::PeerLost(_)), "{err}");
    let why = primary.failure().unwrap();
    assert!(
        why.contains("peer silent for 5.0 s") && why.contains("acknowledges"),
        "{why}"
    );
}

/// A peer whose kernel stops acknowledging (its host died, or the link was cut) is lost as soon
/// as this side's data has waited the unacknowledged-data timeout, not after the silence
/// timeout (a minute here).
#[test]
fn a_peer_whose_host_stops_acknowledging_is_lost_before_the_timeout() {
    let (_l, silent, primary) = primary_with_a_silent_backup(Duration::from_secs(60));
    drop_everything_arriving(&silent);
    let err = primary
        .recv_timeout(Duration::from_secs(30))
        .expect_err("still alive 30 s after its peer's host stopped acknowledging");
    assert!(matches!(err, ChannelError::PeerLost(_)), "{err}");
    let why = primary.failure().unwrap();
    assert!(why.contains("acknowledged none"), "{why}");
}

#[test]
fn vanished_peer_is_lost() {
    let listener = Listener::bind("127.0.0.1:0", cfg()).unwrap();
    let raw = silent_backup(listener.local_addr());
    let primary = listener.accept_timeout(LONG).unwrap();
    drop(raw); // as if its process were killed: no Bye
    let err = primary.recv().unwrap_err();
    assert!(matches!(err, ChannelError::PeerLost(_)), "{err}");
    assert!(primary.failure().unwrap().contains("without a Bye"));
}

#[test]
fn dropped_peer_is_lost_and_send_fails() {
    let (_l, primary, backup) = pair(cfg());
    drop(backup);
    // The drop sends a Bye; then the connection is closed.
    assert!(matches!(primary.recv().unwrap(), Msg::Bye { .. }));
    assert!(primary.recv().is_err());
    assert!(primary.send(Msg::Heartbeat).is_err());
    assert!(primary.send_log(0, 1, false, vec![1]).is_err());
}

/// A side that closes with a Bye keeps reading what its peer still sends: a peer that was
/// stopped while the Bye arrived (a backup dropped for lagging, SIGSTOPped) writes its acks when
/// it runs again, and a socket already closed would answer them with a reset, which can beat the
/// Bye to the peer's reader. Here the peer writes after the close and still reads to a clean end.
#[test]
fn a_side_that_said_bye_does_not_reset_its_peers_late_data() {
    let (_l, mut silent, primary) = primary_with_a_silent_backup(Duration::from_secs(60));
    primary.close("dropped: it could not keep up");
    assert!(!primary.is_alive());
    // The peer, as if it resumed now: it writes (a frame the closed side never decrypts), more
    // than once, a moment apart, then reads what is there.
    for _ in 0..3 {
        write_frame(&mut silent, &[0u8; 64]).unwrap();
        thread::sleep(Duration::from_millis(100));
    }
    silent.set_read_timeout(Some(LONG)).unwrap();
    let mut frames = 0;
    loop {
        match read_frame(&mut silent) {
            Ok(_) => frames += 1,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => panic!("after {frames} frames: {e} (the closed side reset the connection)"),
        }
    }
    assert!(frames >= 1, "the Bye never arrived");
}

/// A batch that may wait leaves in place of the next heartbeat, a little before it would be
/// due, never after; with the next message that leaves, if one comes first, and in order. A
/// series of them at the heartbeat's pace takes every heartbeat's place; acknowledgements
/// travel relative to each other and come back whole.
#[test]
fn lazy_batches_take_the_heartbeats_place() {
    let mut c = cfg();
    c.heartbeat = Duration::from_millis(100);
    let (_listener, primary, backup) = pair(c);
    // Settle: the first heartbeats.
    thread::sleep(Duration::from_millis(250));
    let beats = primary.stats().heartbeats_sent;
    let sent = Instant::now();
    primary.send_log_lazy(0, 1, false, vec![1]).unwrap();
    let got = backup.recv_timeout(LONG).unwrap();
    let waited = sent.elapsed();
    assert!(
        matches!(got, Some(Msg::Log { first_seq: 0, .. })),
        "{got:?}"
    );
    assert!(waited <= Duration::from_millis(100), "waited {waited:?}");
    // Taken along by the next message, in order.
    primary.send_log_lazy(1, 1, false, vec![2]).unwrap();
    primary.send(Msg::Released { seq: 1 }).unwrap();
    assert!(matches!(
        backup.recv_timeout(Duration::from_millis(50)).unwrap(),
        Some(Msg::Log { first_seq: 1, .. })
    ));
    assert_eq!(
        backup.recv_timeout(LONG).unwrap(),
        Some(Msg::Released { seq: 1 })
    );
    // One lazy batch per period, each sent when the channel has been quiet for most of it:
    // no heartbeat in between.
    let beats_before = primary.stats().heartbeats_sent;
    for seq in 2..12u64 {
        while primary.since_sent() + Duration::from_millis(30) < primary.heartbeat() {
            thread::sleep(Duration::from_millis(2));
        }
        primary.send_log_lazy(seq, 1, false, vec![3]).unwrap();
        let got = backup.recv_timeout(LONG).unwrap();
        assert!(
            matches!(got, Some(Msg::Log { first_seq, .. }) if first_seq == seq),
            "{got:?}"
        );
        backup
            .send(Msg::Ack {
                received: seq + 1,
                executed: seq,
                vtime_ns: 1_000_000 * seq,
            })
            .unwrap();
    }
    assert_eq!(
        primary.wait_ack((11, 10, 10_000_000), LONG),
        (12, 11, 11_000_000)
    );
    assert_eq!(
        primary.stats().heartbeats_sent,
        beats_before,
        "a heartbeat went"
    );
    assert!(beats > 0, "no heartbeat while idle before");
    // Idle again: heartbeats, as Noise messages with nothing inside.
    let received = backup.stats().msgs_received;
    assert!(eventually(LONG, || primary.stats().heartbeats_sent > beats_before));
    assert!(eventually(LONG, || backup.stats().msgs_received > received));
}
