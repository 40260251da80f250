//! The byte level of a walsender connection: a boxed transport (a plain
//! socket or TLS, see [`crate::pg::tls`]), a frame codec that yields whole backend messages, and
//! the CopyData payloads of physical streaming replication.
//!
//! ```text
//! XLogData (server → client, inside CopyData)
//!   u8 'w' | u64 start LSN | u64 server WAL end | i64 send time (µs since 2000-01-01) | WAL bytes…
//! Primary keepalive (server → client)
//!   u8 'k' | u64 server WAL end | i64 send time | u8 reply requested (1 = reply now)
//! Standby status update (client → server)
//!   u8 'r' | u64 written | u64 flushed | u64 applied | i64 client time | u8 reply requested
//! ```
//!
//! All integers are big-endian. Messages are read whole by [`BackendCodec`]
//! before anything acts on them, which is what makes reading cancel-safe.

use std::collections::HashMap;
use std::io;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use postgres_protocol::message::backend::{DataRowBody, Message};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_postgres::fallible_iterator::FallibleIterator;
use tokio_util::codec::{Decoder, Encoder, Framed};

use super::ReplMessage;
use crate::pg::error::{error_fields, PgError, ServerError};
use crate::pg::lsn::Lsn;

/// A byte stream to the server: TCP, Unix socket or TLS over TCP.
pub trait Transport: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Transport for T {}

/// The boxed transport every connection uses.
pub type BoxedTransport = Box<dyn Transport>;

/// Microseconds between 1970-01-01 and 2000-01-01 (PostgreSQL's epoch).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// Largest backend message accepted (XLogData is at most ~128 KiB; error
/// texts and history files are far smaller). Guards against a garbage length.
const MAX_MESSAGE_LEN: usize = 64 * 1024 * 1024;

/// A backend message, with CopyBothResponse (which postgres-protocol does
/// not know) handled here.
pub enum Backend {
    /// Any message postgres-protocol parses.
    Msg(Message),
    /// `W`: the server entered CopyBoth mode (START_REPLICATION accepted).
    CopyBothResponse,
}

/// Frames backend messages; encodes nothing itself (frontend messages are
/// written straight into the write buffer).
pub struct BackendCodec;

impl Decoder for BackendCodec {
    type Item = Backend;
    type Error = io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> io::Result<Option<Backend>> {
        if src.len() >= 5 {
            let len = u32::from_be_bytes([src[1], src[2], src[3], src[4]]) as usize;
            if len > MAX_MESSAGE_LEN {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("backend message of {len} bytes is larger than the {MAX_MESSAGE_LEN} allowed"),
                ));
            }
            if src[0] == b'W' {
                // The length counts itself: below 4, framing is lost.
                if len < 4 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "CopyBothResponse with an invalid message length {len} (at least 4)"
                        ),
                    ));
                }
                if src.len() < len + 1 {
                    src.reserve(len + 1 - src.len());
                    return Ok(None);
                }
                src.advance(len + 1);
                return Ok(Some(Backend::CopyBothResponse));
            }
        }
        Ok(Message::parse(src)?.map(Backend::Msg))
    }
}

impl Encoder<Bytes> for BackendCodec {
    type Error = io::Error;
    fn encode(&mut self, item: Bytes, dst: &mut BytesMut) -> io::Result<()> {
        dst.extend_from_slice(&item);
        Ok(())
    }
}

/// A framed connection plus what the server told us about itself.
pub struct Wire {
    framed: Framed<BoxedTransport, BackendCodec>,
    /// Where we are connected, for error messages.
    pub target: String,
    /// ParameterStatus values (server_version, …).
    pub parameters: HashMap<String, String>,
}

impl Wire {
    pub fn new(transport: BoxedTransport, target: String) -> Self {
        Wire {
            framed: Framed::new(transport, BackendCodec),
            target,
            parameters: HashMap::new(),
        }
    }

    /// The write buffer: frontend messages are appended here and sent by
    /// [`Wire::flush`]. Appending is synchronous, so a message is either
    /// fully queued or not at all, whatever the caller's cancellation.
    pub fn queue(&mut self) -> &mut BytesMut {
        self.framed.write_buffer_mut()
    }

    /// Whether queued bytes wait to be sent.
    pub fn has_pending_writes(&self) -> bool {
        !self.framed.write_buffer().is_empty()
    }

    /// Sends everything queued. Cancel-safe: what is not yet sent stays queued.
    pub async fn flush(&mut self, context: &str) -> Result<(), PgError> {
        SinkExt::<Bytes>::flush(&mut self.framed)
            .await
            .map_err(|e| self.io_error(context, e))
    }

    /// The next message, skipping (and recording) notices and parameter
    /// changes. Cancel-safe.
    pub async fn recv(&mut self, context: &str) -> Result<Backend, PgError> {
        loop {
            match self.framed.next().await {
                None => {
                    return Err(PgError::Closed {
                        target: self.target.clone(),
                        context: context.to_string(),
                    })
                }
                Some(Err(e)) => return Err(self.io_error(context, e)),
                Some(Ok(Backend::Msg(Message::NoticeResponse(n)))) => {
                    let fields = error_fields(n.fields());
                    let notice = ServerError::from_fields(fields.iter().map(|(t, v)| (*t, &v[..])));
                    tracing::info!(target = %self.target, "server notice: {notice}");
                }
                Some(Ok(Backend::Msg(Message::ParameterStatus(p)))) => {
                    if let (Ok(name), Ok(value)) = (p.name(), p.value()) {
                        self.parameters.insert(name.to_string(), value.to_string());
                    }
                }
                Some(Ok(Backend::Msg(Message::NotificationResponse(_)))) => {}
                Some(Ok(m)) => return Ok(m),
            }
        }
    }

    /// Says goodbye (Terminate) and closes, ignoring errors: the connection
    /// is being thrown away.
    pub async fn close(mut self) {
        frontend::terminate(self.queue());
        let _ = SinkExt::<Bytes>::flush(&mut self.framed).await;
        let _ = self.framed.get_mut().shutdown().await;
    }

    fn io_error(&self, context: &str, source: io::Error) -> PgError {
        // TLS 1.3 servers reject a client certificate after the handshake,
        // so the alert arrives here, on the first read.
        if let Some(alert) = crate::pg::tls::alert_in(&source) {
            return PgError::Tls(crate::pg::tls::TlsError::ServerAlert {
                target: self.target.clone(),
                context: context.to_string(),
                alert,
            });
        }
        PgError::Io {
            target: self.target.clone(),
            context: context.to_string(),
            source,
        }
    }

    /// A protocol violation error naming where we are.
    pub fn protocol(&self, context: &str, detail: impl Into<String>) -> PgError {
        PgError::Protocol {
            target: self.target.clone(),
            context: context.to_string(),
            detail: detail.into(),
        }
    }
}

/// The columns of a DataRow, `None` for SQL NULL. Values share the
/// message's buffer (no copy).
pub fn row_values(body: &DataRowBody) -> io::Result<Vec<Option<Bytes>>> {
    let buf = body.buffer_bytes();
    let mut ranges = body.ranges();
    let mut out = Vec::new();
    while let Some(r) = ranges.next()? {
        out.push(r.map(|r| buf.slice(r)));
    }
    Ok(out)
}

/// A name for a message in protocol-violation texts.
pub fn message_name(m: &Backend) -> &'static str {
    let m = match m {
        Backend::CopyBothResponse => return "CopyBothResponse",
        Backend::Msg(m) => m,
    };
    match m {
        Message::AuthenticationOk => "AuthenticationOk",
        Message::BackendKeyData(_) => "BackendKeyData",
        Message::CommandComplete(_) => "CommandComplete",
        Message::CopyData(_) => "CopyData",
        Message::CopyDone => "CopyDone",
        Message::CopyInResponse(_) => "CopyInResponse",
        Message::CopyOutResponse(_) => "CopyOutResponse",
        Message::DataRow(_) => "DataRow",
        Message::EmptyQueryResponse => "EmptyQueryResponse",
        Message::ErrorResponse(_) => "ErrorResponse",
        Message::ReadyForQuery(_) => "ReadyForQuery",
        Message::RowDescription(_) => "RowDescription",
        _ => "an unexpected message",
    }
}

/// The current time in PostgreSQL's representation (µs since 2000-01-01).
pub fn pg_now_micros() -> i64 {
    let since_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    since_unix - PG_EPOCH_OFFSET_MICROS
}

/// Decodes a CopyData payload (`w` XLogData or `k` keepalive).
pub fn parse_copy_payload(mut b: Bytes) -> Result<ReplMessage, String> {
    if b.is_empty() {
        return Err("empty CopyData message".into());
    }
    match b[0] {
        b'w' => {
            if b.len() < 25 {
                return Err(format!("XLogData header too short ({} bytes)", b.len()));
            }
            b.advance(1);
            let start = Lsn(b.get_u64());
            let server_end = Lsn(b.get_u64());
            let _send_time = b.get_i64();
            Ok(ReplMessage::XLogData {
                start,
                server_end,
                data: b,
            })
        }
        b'k' => {
            if b.len() < 18 {
                return Err(format!("keepalive message too short ({} bytes)", b.len()));
            }
            b.advance(1);
            let server_end = Lsn(b.get_u64());
            let _send_time = b.get_i64();
            let reply_requested = b.get_u8() != 0;
            Ok(ReplMessage::Keepalive {
                server_end,
                reply_requested,
            })
        }
        other => Err(format!(
            "unknown CopyData message type {:?}",
            char::from(other)
        )),
    }
}

/// Encodes a standby status update (`r`) payload.
pub fn status_update_payload(
    write: Lsn,
    flush: Lsn,
    apply: Lsn,
    now_micros: i64,
    reply_requested: bool,
) -> Bytes {
    let mut b = BytesMut::with_capacity(34);
    b.put_u8(b'r');
    b.put_u64(write.0);
    b.put_u64(flush.0);
    b.put_u64(apply.0);
    b.put_i64(now_micros);
    b.put_u8(u8::from(reply_requested));
    b.freeze()
}

/// Appends a CopyData message carrying `payload` to `buf`.
pub fn put_copy_data(payload: Bytes, buf: &mut BytesMut) -> io::Result<()> {
    frontend::CopyData::new(payload)?.write(buf);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xlogdata_and_keepalive_decode() {
        let mut w = BytesMut::new();
        w.put_u8(b'w');
        w.put_u64(0x1_0000_0000);
        w.put_u64(0x1_0000_0010);
        w.put_i64(12345);
        w.put_slice(b"walbytes");
        assert_eq!(
            parse_copy_payload(w.freeze()).unwrap(),
            ReplMessage::XLogData {
                start: Lsn(0x1_0000_0000),
                server_end: Lsn(0x1_0000_0010),
                data: Bytes::from_static(b"walbytes"),
            }
        );
        let mut k = BytesMut::new();
        k.put_u8(b'k');
        k.put_u64(77);
        k.put_i64(1);
        k.put_u8(1);
        assert_eq!(
            parse_copy_payload(k.freeze()).unwrap(),
            ReplMessage::Keepalive {
                server_end: Lsn(77),
                reply_requested: true
            }
        );
        assert!(parse_copy_payload(Bytes::from_static(b"w123")).is_err());
        assert!(parse_copy_payload(Bytes::from_static(b"kxx")).is_err());
        assert!(parse_copy_payload(Bytes::from_static(b"z")).is_err());
    }

    #[test]
    fn status_update_layout() {
        let p = status_update_payload(Lsn(1), Lsn(2), Lsn(3), 4, true);
        assert_eq!(p.len(), 34);
        assert_eq!(p[0], b'r');
        assert_eq!(&p[1..9], &1u64.to_be_bytes());
        assert_eq!(&p[9..17], &2u64.to_be_bytes());
        assert_eq!(&p[17..25], &3u64.to_be_bytes());
        assert_eq!(&p[25..33], &4i64.to_be_bytes());
        assert_eq!(p[33], 1);
        let mut buf = BytesMut::new();
        put_copy_data(p, &mut buf).unwrap();
        assert_eq!(buf[0], b'd');
        assert_eq!(&buf[1..5], &(34u32 + 4).to_be_bytes());
    }

    #[test]
    fn codec_frames_copy_both_and_partial_messages() {
        let mut c = BackendCodec;
        let mut buf = BytesMut::new();
        // CopyBothResponse: 'W', len 7, format 0, 0 columns.
        buf.put_slice(&[b'W', 0, 0, 0, 7, 0, 0, 0]);
        // Start of a CopyDone ('c', len 4) split in two.
        buf.put_slice(&[b'c', 0, 0]);
        assert!(matches!(
            c.decode(&mut buf).unwrap(),
            Some(Backend::CopyBothResponse)
        ));
        assert!(c.decode(&mut buf).unwrap().is_none());
        buf.put_slice(&[0, 4]);
        assert!(matches!(
            c.decode(&mut buf).unwrap(),
            Some(Backend::Msg(Message::CopyDone))
        ));
        assert!(buf.is_empty());
        buf.put_slice(&[b'd', 0xff, 0xff, 0xff, 0xff]);
        assert!(c.decode(&mut buf).is_err());
    }

    #[test]
    fn pg_epoch_is_2000() {
        let now = pg_now_micros();
        // Later than 2024-01-01 in PostgreSQL time.
        assert!(now > 24 * 365 * 24 * 3600 * 1_000_000);
    }
}

/// Hostile input: the decoder of what a server (or anything that answers on
/// its port) sends, fuzzed with proptest. `scripts/fuzz.sh` runs these with
/// many more cases (`PROPTEST_CASES`).
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn cases(n: u32) -> proptest::test_runner::Config {
        let mut c = proptest::test_runner::Config::default();
        if std::env::var_os("PROPTEST_CASES").is_none() {
            c.cases = n;
        }
        // Failures become explicit #[test]s, not persisted seed files.
        c.failure_persistence = None;
        c
    }

    /// A backend message as (tag, body), framed as `tag | u32 len | body`.
    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    /// Messages a walsender sends while streaming, with their bodies.
    fn message() -> impl Strategy<Value = (u8, Vec<u8>)> {
        let cstr = "[a-zA-Z0-9 ]{0,20}".prop_map(|s| {
            let mut b = s.into_bytes();
            b.push(0);
            b
        });
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..300).prop_map(|b| (b'd', b)),
            Just((b'c', vec![])),
            (0..3u16).prop_map(|n| {
                let mut b = vec![0u8];
                b.extend_from_slice(&n.to_be_bytes());
                (0..n).for_each(|_| b.extend_from_slice(&0u16.to_be_bytes()));
                (b'W', b)
            }),
            cstr.clone().prop_map(|b| (b'C', b)),
            Just((b'Z', vec![b'I'])),
            cstr.prop_map(|mut b| {
                let mut e = vec![b'S'];
                e.append(&mut b);
                e.push(0);
                (b'N', e)
            }),
        ]
    }

    /// Feeds `stream` to the codec in pieces cut at `cuts`; returns what it
    /// decoded, each with the bytes it consumed, and the first error.
    fn decode_all(stream: &[u8], cuts: &[usize]) -> (Vec<(Backend, usize)>, Option<io::Error>) {
        let mut codec = BackendCodec;
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut at = 0;
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
        cuts.push(stream.len());
        cuts.sort_unstable();
        for c in cuts {
            buf.extend_from_slice(&stream[at..c.max(at)]);
            at = c.max(at);
            loop {
                let before = buf.len();
                match codec.decode(&mut buf) {
                    Ok(Some(m)) => out.push((m, before - buf.len())),
                    Ok(None) => break,
                    Err(e) => return (out, Some(e)),
                }
            }
        }
        (out, None)
    }

    proptest! {
        #![proptest_config(cases(1000))]

        /// CopyData payloads: `w` with at least 25 bytes and `k` with at
        /// least 18 decode to their big-endian fields; anything else is an
        /// error that says what was wrong. Never a panic.
        #[test]
        fn fuzz_copy_payload_arbitrary(
            tag in prop::sample::select(vec![b'w', b'k', b'r', b'd', 0, 0xff]),
            rest in proptest::collection::vec(any::<u8>(), 0..64),
            tagged in any::<bool>(),
        ) {
            let mut b = rest.clone();
            if tagged {
                b.insert(0, tag);
            }
            let be = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().unwrap());
            match parse_copy_payload(Bytes::from(b.clone())) {
                Ok(ReplMessage::XLogData { start, server_end, data }) => {
                    prop_assert!(b[0] == b'w' && b.len() >= 25);
                    prop_assert_eq!(start, Lsn(be(1)));
                    prop_assert_eq!(server_end, Lsn(be(9)));
                    prop_assert_eq!(&data[..], &b[25..]);
                }
                Ok(ReplMessage::Keepalive { server_end, reply_requested }) => {
                    prop_assert!(b[0] == b'k' && b.len() >= 18);
                    prop_assert_eq!(server_end, Lsn(be(1)));
                    prop_assert_eq!(reply_requested, b[17] != 0);
                }
                Ok(other) => prop_assert!(false, "{other:?}"),
                Err(e) => {
                    prop_assert!(b.is_empty() || !(b[0] == b'w' && b.len() >= 25 || b[0] == b'k' && b.len() >= 18));
                    prop_assert!(e.contains("CopyData") || e.contains("too short"), "{e}");
                }
            }
        }

        /// What a server sends round-trips through the payload decoder.
        #[test]
        fn fuzz_copy_payload_round_trip(start in any::<u64>(), end in any::<u64>(), t in any::<i64>(), data in proptest::collection::vec(any::<u8>(), 0..100), reply in any::<bool>()) {
            let mut w = BytesMut::new();
            w.put_u8(b'w');
            w.put_u64(start);
            w.put_u64(end);
            w.put_i64(t);
            w.put_slice(&data);
            prop_assert_eq!(parse_copy_payload(w.freeze()).unwrap(), ReplMessage::XLogData { start: Lsn(start), server_end: Lsn(end), data: Bytes::from(data) });
            let mut k = BytesMut::new();
            k.put_u8(b'k');
            k.put_u64(end);
            k.put_i64(t);
            k.put_u8(u8::from(reply));
            prop_assert_eq!(parse_copy_payload(k.freeze()).unwrap(), ReplMessage::Keepalive { server_end: Lsn(end), reply_requested: reply });
        }

        /// A stream of well-formed messages, cut anywhere, frames back into
        /// exactly those messages.
        #[test]
        fn fuzz_codec_frames_any_cut(msgs in proptest::collection::vec(message(), 0..12), cuts in proptest::collection::vec(any::<usize>(), 0..12)) {
            let stream: Vec<u8> = msgs.iter().flat_map(|(t, b)| frame(*t, b)).collect();
            let (out, err) = decode_all(&stream, &cuts);
            prop_assert!(err.is_none(), "{err:?}");
            prop_assert_eq!(out.len(), msgs.len());
            for ((m, used), (tag, body)) in out.iter().zip(&msgs) {
                prop_assert_eq!(*used, body.len() + 5);
                match (m, tag) {
                    (Backend::CopyBothResponse, b'W') => {}
                    (Backend::Msg(Message::CopyData(d)), b'd') => prop_assert_eq!(d.data(), &body[..]),
                    (Backend::Msg(Message::CopyDone), b'c') => {}
                    (Backend::Msg(Message::CommandComplete(_)), b'C') => {}
                    (Backend::Msg(Message::ReadyForQuery(_)), b'Z') => {}
                    (Backend::Msg(Message::NoticeResponse(_)), b'N') => {}
                    (m, t) => prop_assert!(false, "{} for tag {}", message_name(m), char::from(*t)),
                }
            }
        }

        /// Arbitrary bytes, and well-formed frames with damaged lengths:
        /// never a panic, and every message decoded is a whole frame of a
        /// valid length (at least 4, the length field itself).
        #[test]
        fn fuzz_codec_arbitrary(
            msgs in proptest::collection::vec(message(), 0..6),
            junk in proptest::collection::vec(any::<u8>(), 0..64),
            damage in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            lengths in proptest::collection::vec((any::<prop::sample::Index>(), prop_oneof![0..8u32, any::<u32>()]), 0..2),
            cuts in proptest::collection::vec(any::<usize>(), 0..6),
        ) {
            let mut stream = Vec::new();
            let mut starts = Vec::new();
            for (t, b) in &msgs {
                starts.push(stream.len());
                stream.extend_from_slice(&frame(*t, b));
            }
            // A damaged length field of one message.
            for (i, len) in &lengths {
                if !starts.is_empty() {
                    let at = starts[i.index(starts.len())];
                    stream[at + 1..at + 5].copy_from_slice(&len.to_be_bytes());
                }
            }
            stream.extend_from_slice(&junk);
            for (i, v) in &damage {
                let i = i.index(stream.len().max(1));
                if i < stream.len() {
                    stream[i] = *v;
                }
            }
            let (out, _err) = decode_all(&stream, &cuts);
            let mut at = 0;
            for (m, used) in &out {
                let len = u32::from_be_bytes(stream[at + 1..at + 5].try_into().unwrap()) as usize;
                prop_assert!(len >= 4, "{} with length {len} accepted", message_name(m));
                prop_assert_eq!(*used, len + 1);
                if let Backend::Msg(Message::DataRow(r)) = m {
                    let _ = row_values(r);
                }
                at += used;
            }
        }
    }

    /// Found by `fuzz_codec_arbitrary`: a CopyBothResponse (`W`) whose length
    /// field is below 4 was accepted and only `len + 1` bytes consumed, so
    /// the rest of its own header was then read as the next message.
    #[test]
    fn copy_both_response_with_a_length_below_4_is_refused() {
        for len in 0u8..4 {
            let mut buf = BytesMut::from(&[b'W', 0, 0, 0, len, b'd', 0, 0, 0, 4][..]);
            let e = BackendCodec.decode(&mut buf).err();
            assert!(e.is_some(), "length {len} accepted");
            assert!(e.unwrap().to_string().contains("length"));
        }
    }
}
