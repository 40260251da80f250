//! How bytes reach PostgreSQL: the TCP or Unix socket and libpq's
//! `sslmode` negotiation (see [`super::tls`] for the TLS session itself),
//! shared by the replication connection ([`super::replication`]) and the
//! SQL connection ([`super::sql`]), so that both behave the same way.
//!
//! ```text
//! client ─ SSLRequest { i32 len = 8, i32 code = 80877103 } ─▶ server
//! server ─ one byte: 'S' (go ahead) | 'N' (no TLS here) | 'E' (ErrorResponse follows)
//! 'S': TLS handshake on the same socket, then the startup message inside TLS
//! 'N': the startup message in plain text, on the same socket
//! ```
//!
//! [`attempts`] is libpq's plan per sslmode (see the table in
//! [`super::tls`]); [`with_fallback`] walks it, and [`open`] makes one
//! attempt.

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use postgres_protocol::message::backend::Message;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use crate::pg::conninfo::{ConnParams, Host, SslMode, Target};
use crate::pg::error::{classify, server_error, ErrorContext, PgError};
use crate::pg::tls::{tls_server_end_point, Check, TlsError, TlsSetup};

const SSL_REQUEST_CODE: i32 = 80877103;

/// What one connection attempt does about TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// No SSLRequest.
    Plain,
    /// SSLRequest; 'N' continues in plain text (prefer).
    TlsPreferred,
    /// SSLRequest; 'N' is an error.
    TlsRequired,
}

/// libpq's attempts for `mode` on `target`, in order.
pub fn attempts(mode: SslMode, target: &Target) -> &'static [Attempt] {
    if matches!(target.host, Host::Unix(_)) {
        return &[Attempt::Plain];
    }
    match mode {
        SslMode::Disable => &[Attempt::Plain],
        SslMode::Allow => &[Attempt::Plain, Attempt::TlsRequired],
        SslMode::Prefer => &[Attempt::TlsPreferred, Attempt::Plain],
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => &[Attempt::TlsRequired],
    }
}

/// A failed attempt, and whether it had got as far as TLS.
#[derive(Debug)]
pub struct Failed {
    /// What went wrong.
    pub error: PgError,
    /// Whether the server had agreed to TLS ('S') on this attempt.
    pub tls_tried: bool,
}

impl From<PgError> for Failed {
    fn from(error: PgError) -> Self {
        Failed {
            error,
            tls_tried: false,
        }
    }
}

/// Whether libpq would follow a failed `attempt` with the next one.
fn may_fall_back(attempt: Attempt, failed: &Failed) -> bool {
    match attempt {
        // allow: the server refused the plain connection (pg_hba hostssl).
        Attempt::Plain => failed.error.server_error().is_some(),
        // prefer: TLS was agreed but the handshake or the startup failed.
        Attempt::TlsPreferred => {
            failed.tls_tried && !matches!(failed.error, PgError::Connect { .. })
        }
        Attempt::TlsRequired => false,
    }
}

/// Runs `attempt` for each of libpq's attempts on `target` until one
/// succeeds or may not be followed by another; each attempt (connect, TLS,
/// authentication) gets `limit`.
pub async fn with_fallback<T, F, Fut>(
    params: &ConnParams,
    target: &Target,
    limit: Duration,
    mut attempt: F,
) -> Result<T, PgError>
where
    F: FnMut(Attempt) -> Fut,
    Fut: Future<Output = Result<T, Failed>>,
{
    let plan = attempts(params.sslmode, target);
    for (i, &a) in plan.iter().enumerate() {
        let failed = match tokio::time::timeout(limit, attempt(a)).await {
            Ok(Ok(t)) => return Ok(t),
            Ok(Err(f)) => f,
            Err(_) => Failed::from(PgError::Connect {
                target: target.to_string(),
                source: io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no complete answer within {limit:?} (connect_timeout)"),
                ),
            }),
        };
        if i + 1 < plan.len() && may_fall_back(a, &failed) {
            tracing::info!(
                %target,
                sslmode = %params.sslmode,
                "connection attempt ({a:?}) failed, trying {:?} as libpq does: {}",
                plan[i + 1],
                failed.error
            );
            continue;
        }
        return Err(failed.error);
    }
    Err(PgError::InvalidState("no connection attempt was made"))
}

/// An open connection to the server: a plain socket or TLS over TCP.
pub enum PgStream {
    /// Plain TCP.
    Tcp(TcpStream),
    /// Unix-domain socket (never TLS).
    Unix(UnixStream),
    /// TLS over TCP.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl PgStream {
    /// Whether the bytes are encrypted.
    pub fn is_encrypted(&self) -> bool {
        matches!(self, PgStream::Tls(_))
    }

    /// `tls-server-end-point` channel-binding data: the server certificate's
    /// hash, `None` without TLS or when its signature algorithm names no
    /// usable hash.
    pub fn tls_server_end_point(&self) -> Option<Vec<u8>> {
        let PgStream::Tls(s) = self else { return None };
        let cert = s.get_ref().1.peer_certificates()?.first()?;
        tls_server_end_point(cert.as_ref())
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            PgStream::Tcp($s) => $e,
            PgStream::Unix($s) => $e,
            PgStream::Tls($s) => $e,
        }
    };
}

impl AsyncRead for PgStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for PgStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_shutdown(cx))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            PgStream::Tcp(s) => s.is_write_vectored(),
            PgStream::Unix(s) => s.is_write_vectored(),
            PgStream::Tls(s) => s.is_write_vectored(),
        }
    }
}

impl tokio_postgres::tls::TlsStream for PgStream {
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        match self.tls_server_end_point() {
            Some(h) => tokio_postgres::tls::ChannelBinding::tls_server_end_point(h),
            None => tokio_postgres::tls::ChannelBinding::none(),
        }
    }
}

/// A `tokio_postgres` "connector" for a [`PgStream`] that [`open`] has
/// already negotiated: it hands the stream back unchanged, so that
/// tokio-postgres (told `sslnegotiation=direct`, which skips its own
/// SSLRequest) sees a TLS stream and can use channel binding.
#[derive(Clone, Copy, Debug)]
pub struct Negotiated;

impl tokio_postgres::tls::TlsConnect<PgStream> for Negotiated {
    type Stream = PgStream;
    type Error = io::Error;
    type Future = futures::future::Ready<io::Result<PgStream>>;
    fn connect(self, stream: PgStream) -> Self::Future {
        futures::future::ready(Ok(stream))
    }
}

/// Opens a socket to `target` and, for a TLS attempt, negotiates TLS as
/// `params` say.
pub async fn open(
    params: &ConnParams,
    target: &Target,
    attempt: Attempt,
) -> Result<PgStream, Failed> {
    let connect_err = |source| PgError::Connect {
        target: target.to_string(),
        source,
    };
    let tcp = match &target.host {
        Host::Unix(_) => {
            let path = target.socket_path().expect("unix target");
            let s = UnixStream::connect(&path).await.map_err(connect_err)?;
            return Ok(PgStream::Unix(s));
        }
        Host::Tcp(host) => match target.hostaddr {
            Some(addr) => TcpStream::connect((addr, target.port)).await,
            None => TcpStream::connect((host.as_str(), target.port)).await,
        }
        .map_err(connect_err)?,
    };
    let _ = tcp.set_nodelay(true);
    if attempt == Attempt::Plain {
        return Ok(PgStream::Tcp(tcp));
    }
    negotiate(params, target, attempt, tcp).await
}

async fn negotiate(
    params: &ConnParams,
    target: &Target,
    attempt: Attempt,
    mut tcp: TcpStream,
) -> Result<PgStream, Failed> {
    let name = target.to_string();
    let io_err = |source| PgError::Io {
        target: name.clone(),
        context: "asking for TLS (SSLRequest)".into(),
        source,
    };
    let mut req = BytesMut::with_capacity(8);
    req.put_i32(8);
    req.put_i32(SSL_REQUEST_CODE);
    tcp.write_all(&req).await.map_err(io_err)?;
    let mut answer = [0u8; 1];
    if let Err(e) = tcp.read_exact(&mut answer).await {
        return Err(if e.kind() == io::ErrorKind::UnexpectedEof {
            PgError::Closed {
                target: name.clone(),
                context: "asking for TLS (SSLRequest)".into(),
            }
        } else {
            io_err(e)
        }
        .into());
    }
    match answer[0] {
        b'S' => {}
        b'N' if attempt == Attempt::TlsPreferred => {
            tracing::debug!(target = %name, "server does not support TLS; continuing in plain text (sslmode=prefer)");
            return Ok(PgStream::Tcp(tcp));
        }
        b'N' => {
            return Err(PgError::Tls(TlsError::ServerRefusedTls {
                target: name,
                sslmode: params.sslmode,
            })
            .into())
        }
        b'E' => {
            return Err(error_response_to_ssl_request(params, &name, tcp)
                .await
                .into())
        }
        other => {
            return Err(PgError::Protocol {
                target: name,
                context: "asking for TLS (SSLRequest)".into(),
                detail: format!(
                    "answer byte {:?} is none of 'S', 'N', 'E'; is this a PostgreSQL server?",
                    char::from(other)
                ),
            }
            .into())
        }
    }
    let tls_failed = |e: TlsError| Failed {
        error: PgError::Tls(e),
        tls_tried: true,
    };
    let setup = TlsSetup::load(params).map_err(tls_failed)?;
    let Host::Tcp(host) = &target.host else {
        unreachable!("TLS is only negotiated over TCP")
    };
    let server_name = match server_name_for(host) {
        Some(n) => n,
        None if setup.check == Check::ChainAndName => {
            return Err(tls_failed(TlsError::UncheckableHost { host: host.clone() }))
        }
        // Nothing checks the name: identify the server by its address
        // (which sends no SNI).
        None => match tcp.peer_addr() {
            Ok(a) => ServerName::IpAddress(a.ip().into()),
            Err(e) => return Err(io_err(e).into()),
        },
    };
    let connector = tokio_rustls::TlsConnector::from(setup.config.clone());
    match connector.connect(server_name, tcp).await {
        Ok(s) => Ok(PgStream::Tls(Box::new(s))),
        Err(e) => Err(tls_failed(setup.handshake_error(&name, host, e))),
    }
}

/// The server answered the SSLRequest with an ErrorResponse (e.g. it
/// could not start a backend): read it and classify it like any other.
async fn error_response_to_ssl_request(
    params: &ConnParams,
    target: &str,
    mut tcp: TcpStream,
) -> PgError {
    let protocol = |detail: String| PgError::Protocol {
        target: target.to_string(),
        context: "asking for TLS (SSLRequest)".into(),
        detail,
    };
    let mut len = [0u8; 4];
    if let Err(e) = tcp.read_exact(&mut len).await {
        return protocol(format!("truncated error response: {e}"));
    }
    let len = u32::from_be_bytes(len) as usize;
    if !(4..=64 * 1024).contains(&len) {
        return protocol(format!("error response of implausible length {len}"));
    }
    let mut buf = BytesMut::with_capacity(len + 1);
    buf.put_u8(b'E');
    buf.put_u32(len as u32);
    buf.resize(len + 1, 0);
    if let Err(e) = tcp.read_exact(&mut buf[5..]).await {
        return protocol(format!("truncated error response: {e}"));
    }
    match Message::parse(&mut buf) {
        Ok(Some(Message::ErrorResponse(body))) => {
            let ctx = ErrorContext {
                target: target.to_string(),
                user: params.user.clone(),
                command: "asking for TLS (SSLRequest)".into(),
                ..ErrorContext::default()
            };
            classify(server_error(&body), &ctx)
        }
        _ => protocol("unparsable error response".into()),
    }
}

/// The name rustls checks and sends as SNI: an IP address or a DNS name.
fn server_name_for(host: &str) -> Option<ServerName<'static>> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Some(ServerName::IpAddress(ip.into()));
    }
    ServerName::try_from(host.to_string()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(host: Host) -> Target {
        Target {
            host,
            hostaddr: None,
            port: 5432,
        }
    }

    #[test]
    fn attempts_follow_libpq() {
        let tcp = target(Host::Tcp("db".into()));
        let unix = target(Host::Unix("/run/postgresql".into()));
        use Attempt::*;
        assert_eq!(attempts(SslMode::Disable, &tcp), &[Plain]);
        assert_eq!(attempts(SslMode::Allow, &tcp), &[Plain, TlsRequired]);
        assert_eq!(attempts(SslMode::Prefer, &tcp), &[TlsPreferred, Plain]);
        for m in [SslMode::Require, SslMode::VerifyCa, SslMode::VerifyFull] {
            assert_eq!(attempts(m, &tcp), &[TlsRequired]);
            // Never TLS over a Unix socket, as in libpq.
            assert_eq!(attempts(m, &unix), &[Plain]);
        }
    }

    #[test]
    fn fall_back_only_where_libpq_does() {
        let server = || PgError::Server {
            target: "t".into(),
            context: "c".into(),
            server: Box::new(crate::pg::error::ServerError {
                severity: "FATAL".into(),
                code: "28000".into(),
                message: "no pg_hba.conf entry".into(),
                detail: None,
                hint: None,
            }),
        };
        let connect = || PgError::Connect {
            target: "t".into(),
            source: io::Error::from(io::ErrorKind::ConnectionRefused),
        };
        let f = |error, tls_tried| Failed { error, tls_tried };
        assert!(may_fall_back(Attempt::Plain, &f(server(), false)));
        assert!(!may_fall_back(Attempt::Plain, &f(connect(), false)));
        assert!(may_fall_back(Attempt::TlsPreferred, &f(server(), true)));
        // After 'N' the plain connection already failed: no second try.
        assert!(!may_fall_back(Attempt::TlsPreferred, &f(server(), false)));
        assert!(!may_fall_back(Attempt::TlsPreferred, &f(connect(), true)));
        assert!(!may_fall_back(Attempt::TlsRequired, &f(server(), true)));
    }
}
