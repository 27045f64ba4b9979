//! The Noise layer: the `NNpsk0` handshake and the framing of Noise messages on TCP
//! (`len: u16 big-endian` then the Noise message).

use std::net::SocketAddr;

use snow::{Builder, HandshakeState, TransportState};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{ChannelError, Psk};

/// The Noise protocol name: no static keys, both sides prove the pre-shared key in the first
/// message (psk0), X25519, ChaCha20-Poly1305, BLAKE2s.
pub const NOISE_PATTERN: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";

/// The largest Noise message, and so the largest frame body.
pub const MAX_NOISE_MSG: usize = 65535;

/// Authentication tag added by ChaChaPoly to every transport message.
pub const TAG_LEN: usize = 16;

/// The most plaintext one transport message carries.
pub const MAX_PLAINTEXT: usize = MAX_NOISE_MSG - TAG_LEN;

/// Reads one frame into `buf`, returning its length. A zero length is only meaningful during the
/// handshake (the responder's "wrong key" signal); the caller decides.
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut [u8; MAX_NOISE_MSG],
) -> std::io::Result<usize> {
    let mut len = [0u8; 2];
    rd.read_exact(&mut len).await?;
    let len = usize::from(u16::from_be_bytes(len));
    rd.read_exact(&mut buf[..len]).await?;
    Ok(len)
}

/// Appends one frame (`msg.len() <= MAX_NOISE_MSG`) to `out`.
pub(crate) fn push_frame(out: &mut Vec<u8>, msg: &[u8]) {
    debug_assert!(msg.len() <= MAX_NOISE_MSG);
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
}

/// Encrypts `plain` into as many transport messages as it needs, framed, appended to `out`;
/// an empty `plain` into one message with nothing inside (a heartbeat: its tag alone).
pub(crate) fn seal(
    noise: &mut TransportState,
    plain: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), snow::Error> {
    let mut msg = [0u8; MAX_NOISE_MSG];
    let empty: [&[u8]; 1] = [&[]];
    let chunks: Box<dyn Iterator<Item = &[u8]>> = if plain.is_empty() {
        Box::new(empty.into_iter())
    } else {
        Box::new(plain.chunks(MAX_PLAINTEXT))
    };
    for chunk in chunks {
        let n = noise.write_message(chunk, &mut msg)?;
        push_frame(out, &msg[..n]);
    }
    Ok(())
}

fn builder(psk: &Psk) -> Result<Builder<'_>, snow::Error> {
    Builder::new(NOISE_PATTERN.parse()?).psk(0, psk.key())
}

fn handshake_error(peer: SocketAddr, reason: impl Into<String>) -> ChannelError {
    ChannelError::Handshake {
        peer: peer.to_string(),
        reason: reason.into(),
    }
}

/// The backup's side: `-> psk, e` then `<- e, ee`.
pub(crate) async fn initiate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    psk: &Psk,
    peer: SocketAddr,
) -> Result<TransportState, ChannelError> {
    let internal = |e: snow::Error| handshake_error(peer, format!("Noise: {e}"));
    let io = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            handshake_error(
                peer,
                "the primary closed the connection during the handshake \
                 (is it an ftvmm primary with the same pre-shared key?)",
            )
        } else {
            handshake_error(peer, e.to_string())
        }
    };
    let mut hs: HandshakeState = builder(psk)
        .and_then(|b| b.build_initiator())
        .map_err(internal)?;
    let mut msg = [0u8; MAX_NOISE_MSG];
    let n = hs.write_message(&[], &mut msg).map_err(internal)?;
    let mut out = Vec::with_capacity(n + 2);
    push_frame(&mut out, &msg[..n]);
    stream.write_all(&out).await.map_err(io)?;

    let mut frame = Box::new([0u8; MAX_NOISE_MSG]);
    let len = read_frame(stream, &mut frame).await.map_err(io)?;
    if len == 0 {
        return Err(handshake_error(
            peer,
            "the primary refused us: our pre-shared key differs from its own",
        ));
    }
    hs.read_message(&frame[..len], &mut msg).map_err(|_| {
        handshake_error(
            peer,
            "the primary's reply failed authentication: different pre-shared key, or not an ftvmm primary",
        )
    })?;
    hs.into_transport_mode().map_err(internal)
}

/// The primary's side. A first message that fails authentication (another key) is answered with
/// an empty frame, so the backup can say why, and the connection is dropped.
pub(crate) async fn respond<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    psk: &Psk,
    peer: SocketAddr,
) -> Result<TransportState, ChannelError> {
    let internal = |e: snow::Error| handshake_error(peer, format!("Noise: {e}"));
    let io = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            handshake_error(peer, "the peer closed the connection during the handshake")
        } else {
            handshake_error(peer, e.to_string())
        }
    };
    let mut hs = builder(psk)
        .and_then(|b| b.build_responder())
        .map_err(internal)?;
    let mut frame = Box::new([0u8; MAX_NOISE_MSG]);
    let len = read_frame(stream, &mut frame).await.map_err(io)?;
    let mut msg = [0u8; MAX_NOISE_MSG];
    if hs.read_message(&frame[..len], &mut msg).is_err() {
        // Best effort: the peer may already be gone.
        let _ = stream.write_all(&[0, 0]).await;
        let _ = stream.flush().await;
        return Err(handshake_error(
            peer,
            "the peer does not hold our pre-shared key (its first message failed authentication)",
        ));
    }
    let n = hs.write_message(&[], &mut msg).map_err(internal)?;
    let mut out = Vec::with_capacity(n + 2);
    push_frame(&mut out, &msg[..n]);
    stream.write_all(&out).await.map_err(io)?;
    hs.into_transport_mode().map_err(internal)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The handshake sizes docs/PROTOCOL.md gives, and a wrong key failing at the responder.
    #[test]
    fn handshake_messages_are_48_bytes() {
        let psk = Psk::from_bytes(b"0123456789abcdef").unwrap();
        let mut ini = builder(&psk).unwrap().build_initiator().unwrap();
        let mut res = builder(&psk).unwrap().build_responder().unwrap();
        let (mut a, mut b) = ([0u8; MAX_NOISE_MSG], [0u8; MAX_NOISE_MSG]);
        let n = ini.write_message(&[], &mut a).unwrap();
        assert_eq!(n, 48);
        res.read_message(&a[..n], &mut b).unwrap();
        let n = res.write_message(&[], &mut a).unwrap();
        assert_eq!(n, 48);
        ini.read_message(&a[..n], &mut b).unwrap();
        let mut ini = ini.into_transport_mode().unwrap();
        let mut res = res.into_transport_mode().unwrap();
        let mut wire = Vec::new();
        seal(&mut ini, &[1, 0, 0, 0, 8], &mut wire).unwrap();
        assert_eq!(wire[..2], [0, 21]);
        let n = res.read_message(&wire[2..], &mut b).unwrap();
        assert_eq!(b[..n], [1, 0, 0, 0, 8]);

        let other = Psk::from_bytes(b"fedcba9876543210").unwrap();
        let mut ini = builder(&other).unwrap().build_initiator().unwrap();
        let mut res = builder(&psk).unwrap().build_responder().unwrap();
        let n = ini.write_message(&[], &mut a).unwrap();
        assert!(res.read_message(&a[..n], &mut b).is_err());
    }

    #[test]
    fn large_plaintext_is_split_into_full_messages() {
        let psk = Psk::from_bytes(b"0123456789abcdef").unwrap();
        let mut ini = builder(&psk).unwrap().build_initiator().unwrap();
        let mut res = builder(&psk).unwrap().build_responder().unwrap();
        let (mut a, mut b) = ([0u8; MAX_NOISE_MSG], [0u8; MAX_NOISE_MSG]);
        let n = ini.write_message(&[], &mut a).unwrap();
        res.read_message(&a[..n], &mut b).unwrap();
        let n = res.write_message(&[], &mut a).unwrap();
        ini.read_message(&a[..n], &mut b).unwrap();
        let mut ini = ini.into_transport_mode().unwrap();
        let mut wire = Vec::new();
        seal(&mut ini, &vec![0; MAX_PLAINTEXT + 1], &mut wire).unwrap();
        assert_eq!(wire[..2], [0xff, 0xff]);
        assert_eq!(wire.len(), 2 + MAX_NOISE_MSG + 2 + 1 + TAG_LEN);
    }
}
