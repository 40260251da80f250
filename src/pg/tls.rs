//! The TLS session (rustls with the `ring` provider): which certificates
//! are trusted and checked under each sslmode, client certificates, and
//! channel binding. [`super::transport`] negotiates TLS on the socket;
//! this module says what the session accepts.
//!
//! # libpq's meaning of each sslmode (per host tried)
//!
//! ```text
//! sslmode      attempts, in order                        certificate checks
//! disable      plain                                     -
//! allow        plain; if the server refuses it, TLS      chain if a root file exists
//! prefer       SSLRequest (N → plain); if TLS fails,     chain if a root file exists
//!              plain on a new connection
//! require      TLS                                       chain if a root file exists
//! verify-ca    TLS                                       chain (root file required)
//! verify-full  TLS                                       chain and host name
//! ```
//!
//! - "Refuses" means an ErrorResponse before authentication completed
//!   (e.g. a `hostssl`-only pg_hba.conf); "TLS fails" means the handshake
//!   or the encrypted startup failed (e.g. `hostnossl … reject`).
//! - Unix-domain sockets never use TLS, whatever the sslmode: libpq does
//!   not either (the socket's file permissions protect it).
//! - The root file is `sslrootcert` (default `~/.postgresql/root.crt`);
//!   like libpq, an existing one is used even under `require`, which then
//!   acts like `verify-ca`. `sslrootcert=system` uses the system's roots.
//! - The host name checked by `verify-full` is `host`, never `hostaddr`,
//!   matched against the certificate's subjectAltName DNS and IP entries
//!   (wildcards allowed). Unlike libpq, a certificate whose name is only in
//!   its subject CN is refused: rustls reads subjectAltName only.
//! - A client certificate is sent when `sslcert` (default
//!   `~/.postgresql/postgresql.crt`) exists; its key `sslkey` must then
//!   exist and be private: mode 0600 or less, or 0640 or less when owned by
//!   root (libpq's rule). Encrypted keys (`sslpassword`) are not supported.
//! - SNI carries the host name (not an IP address), like libpq's `sslsni=1`.
//!
//! # Channel binding
//!
//! Over TLS, SCRAM uses `tls-server-end-point` ([`crate::pg::transport::PgStream::tls_server_end_point`]:
//! a hash of the server's certificate with the hash of its signature
//! algorithm, SHA-256 for MD5 and SHA-1) when the server offers
//! SCRAM-SHA-256-PLUS, which proves that no man in the middle terminated
//! the TLS session. When the certificate's algorithm has no such hash
//! (Ed25519, RSA-PSS) walsafe says it cannot bind (`n,,`), which the server
//! accepts.

use std::fmt;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::Digest;

use crate::pg::conninfo::{ConnParams, RootCert, SslMode};

/// The SSLRequest code (1234 << 16 | 5679).
/// TLS problems, each naming the file, host or setting to fix.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The server answered the SSLRequest with 'N' under an sslmode that
    /// needs TLS.
    #[error("PostgreSQL at {target} does not support TLS but sslmode={sslmode}; enable ssl on the server (ssl = on, ssl_cert_file, ssl_key_file) or lower sslmode to prefer or disable")]
    ServerRefusedTls { target: String, sslmode: SslMode },

    /// verify-ca / verify-full without a root certificate file.
    #[error("root certificate file {path} does not exist, but sslmode={sslmode} must verify the server's certificate; set sslrootcert to the CA that signed the server's certificate (or sslrootcert=system), or use sslmode=require")]
    RootCertMissing { path: String, sslmode: SslMode },

    /// A certificate or key file could not be read.
    #[error("could not read {what} {}: {source}; check sslrootcert / sslcert / sslkey in [postgres] conninfo (or PGSSLROOTCERT / PGSSLCERT / PGSSLKEY)", path.display())]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A certificate or key file has no usable PEM content.
    #[error("{what} {} is not usable: {reason}", path.display())]
    BadFile {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },

    /// The system's trusted roots could not be loaded (sslrootcert=system).
    #[error("sslrootcert=system, but no trusted root certificate could be loaded from the system ({reason}); install the ca-certificates package or name a CA file in sslrootcert")]
    NoSystemRoots { reason: String },

    /// A client certificate exists but its key does not.
    #[error("client certificate {} is present but its private key {} is not: {reason}; set sslkey to the key's file, or remove the certificate (or point sslcert elsewhere) to connect without one", cert.display(), key.display())]
    ClientKeyMissing {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },

    /// The client key is readable by others (libpq refuses it too).
    #[error("private key file {} has group or world access; chmod 0600 it (or 0640 if owned by root), as libpq requires", path.display())]
    KeyPermissions { path: PathBuf },

    /// The server's certificate does not chain to a trusted root, has
    /// expired, or is otherwise invalid.
    #[error("the certificate of PostgreSQL at {target} is not trusted (sslmode={sslmode}, roots: {roots}): {reason}; set sslrootcert to the CA that signed the server's certificate, or fix the server's certificate")]
    CertificateRejected {
        target: String,
        sslmode: SslMode,
        roots: String,
        reason: String,
    },

    /// verify-full: the certificate is valid but for other names.
    #[error("certificate for {target} does not match host name \"{host}\" (it is for {presented}; sslmode=verify-full); connect with a name in the certificate or use sslmode=verify-ca")]
    HostnameMismatch {
        target: String,
        host: String,
        presented: String,
    },

    /// verify-full, but `host` cannot be checked against a certificate.
    #[error("host \"{host}\" is not a valid DNS name or IP address, so sslmode=verify-full cannot check the server's certificate against it; use the name in the certificate as host (and the address as hostaddr), or sslmode=verify-ca")]
    UncheckableHost { host: String },

    /// The server aborted the TLS session with an alert (e.g. it does not
    /// trust our client certificate, or none was sent and it wants one).
    #[error("PostgreSQL at {target} ended the TLS session while {context} with alert {alert}; if it asks for a client certificate, check sslcert/sslkey and that the server's ssl_ca_file trusts their CA")]
    ServerAlert {
        target: String,
        context: String,
        alert: String,
    },

    /// Any other handshake failure (I/O, protocol).
    #[error("TLS handshake with PostgreSQL at {target} failed: {source}")]
    Handshake {
        target: String,
        #[source]
        source: io::Error,
    },

    /// The rustls configuration could not be built.
    #[error("TLS setup failed: {0}")]
    Setup(String),
}

impl TlsError {
    /// Only a connection reset during the handshake may heal by itself;
    /// every other TLS failure needs a person to change a file or setting.
    pub fn is_retryable(&self) -> bool {
        match self {
            TlsError::Handshake { source, .. } => io_error_is_transient(source),
            _ => false,
        }
    }
}

/// Whether an I/O error may go away on its own: not when it carries a TLS
/// failure (a bad certificate, an alert), which repeats on every attempt.
pub fn io_error_is_transient(e: &io::Error) -> bool {
    !e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>())
}

/// The TLS alert inside an I/O error, if the server sent one.
pub fn alert_in(e: &io::Error) -> Option<String> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(a) => Some(format!("{a:?}")),
        _ => None,
    }
}

/// What the server's certificate is checked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// Nothing (require, prefer, allow without a root file).
    Nothing,
    /// Signed by a trusted root, unexpired (verify-ca, or any mode with a root file).
    Chain,
    /// Chain, and valid for `host` (verify-full).
    ChainAndName,
}

/// The rustls client configuration for one `ConnParams`, with what it checks.
pub struct TlsSetup {
    /// What the verifier checks.
    pub check: Check,
    /// Where the roots came from, for messages.
    pub roots: String,
    /// Whether a client certificate is configured.
    pub client_cert: bool,
    sslmode: SslMode,
    pub(crate) config: Arc<rustls::ClientConfig>,
}

impl fmt::Debug for TlsSetup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSetup")
            .field("check", &self.check)
            .field("roots", &self.roots)
            .field("client_cert", &self.client_cert)
            .field("sslmode", &self.sslmode)
            .finish()
    }
}

impl TlsSetup {
    /// Reads the root, certificate and key files `params` name, as libpq
    /// does when the server has agreed to TLS.
    pub fn load(params: &ConnParams) -> Result<TlsSetup, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mode = params.sslmode;
        let (roots, roots_name) = load_roots(params)?;
        let check = match (mode, &roots) {
            (SslMode::VerifyFull, _) => Check::ChainAndName,
            (SslMode::VerifyCa, _) => Check::Chain,
            (_, Some(_)) => Check::Chain,
            (_, None) => Check::Nothing,
        };
        let verifier = Arc::new(PgVerifier {
            check,
            roots: Arc::new(roots.unwrap_or_else(RootCertStore::empty)),
            algs: provider.signature_verification_algorithms,
        });
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Setup(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let (config, client_cert) = match load_client_identity(params)? {
            Some((chain, key)) => (
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| TlsError::BadFile {
                        what: "client certificate",
                        path: params.sslcert.clone().unwrap_or_default(),
                        reason: format!("it does not fit its key or is unsupported: {e}"),
                    })?,
                true,
            ),
            None => (builder.with_no_client_auth(), false),
        };
        Ok(TlsSetup {
            check,
            roots: roots_name,
            client_cert,
            sslmode: mode,
            config: Arc::new(config),
        })
    }

    /// Turns a failed handshake into the error that says what to fix.
    pub(crate) fn handshake_error(&self, target: &str, host: &str, e: io::Error) -> TlsError {
        let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
            return TlsError::Handshake {
                target: target.to_string(),
                source: e,
            };
        };
        match tls {
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            ) => {
                let presented = match tls {
                    rustls::Error::InvalidCertificate(
                        CertificateError::NotValidForNameContext { presented, .. },
                    ) if !presented.is_empty() => presented.join(", "),
                    _ => "other names".to_string(),
                };
                TlsError::HostnameMismatch {
                    target: target.to_string(),
                    host: host.to_string(),
                    presented,
                }
            }
            rustls::Error::InvalidCertificate(c) => TlsError::CertificateRejected {
                target: target.to_string(),
                sslmode: self.sslmode,
                roots: self.roots.clone(),
                reason: certificate_reason(c),
            },
            rustls::Error::AlertReceived(a) => TlsError::ServerAlert {
                target: target.to_string(),
                context: "negotiating TLS".into(),
                alert: format!("{a:?}"),
            },
            _ => TlsError::Handshake {
                target: target.to_string(),
                source: e,
            },
        }
    }
}

fn certificate_reason(c: &CertificateError) -> String {
    match c {
        CertificateError::UnknownIssuer => {
            "it is not signed by any of the trusted root certificates".into()
        }
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            "it has expired".into()
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "it is not valid yet (check the clocks)".into()
        }
        CertificateError::BadSignature => "its signature is invalid".into(),
        other => format!("{other:?}"),
    }
}

/// The trusted roots, `None` when there is no root file and the sslmode
/// does not need one.
fn load_roots(params: &ConnParams) -> Result<(Option<RootCertStore>, String), TlsError> {
    let mode = params.sslmode;
    let must_verify = matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull);
    match &params.sslrootcert {
        Some(RootCert::System) => {
            let found = rustls_native_certs::load_native_certs();
            let mut store = RootCertStore::empty();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                let reason = match found.errors.first() {
                    Some(e) => e.to_string(),
                    None => "no certificate found".into(),
                };
                return Err(TlsError::NoSystemRoots { reason });
            }
            Ok((Some(store), "the system's trusted roots".into()))
        }
        Some(RootCert::File(path)) => match std::fs::metadata(path) {
            Ok(_) => {
                let mut store = RootCertStore::empty();
                for cert in read_certs("root certificate file", path)? {
                    store.add(cert).map_err(|e| TlsError::BadFile {
                        what: "root certificate file",
                        path: path.clone(),
                        reason: format!("a certificate in it is not usable as a root: {e}"),
                    })?;
                }
                Ok((Some(store), path.display().to_string()))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && !must_verify => {
                Ok((None, "none".into()))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(TlsError::RootCertMissing {
                path: path.display().to_string(),
                sslmode: mode,
            }),
            Err(source) => Err(TlsError::ReadFile {
                what: "root certificate file",
                path: path.clone(),
                source,
            }),
        },
        None if must_verify => Err(TlsError::RootCertMissing {
            path: "~/.postgresql/root.crt (no home directory)".into(),
            sslmode: mode,
        }),
        None => Ok((None, "none".into())),
    }
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::ReadFile {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadFile {
            what,
            path: path.to_path_buf(),
            reason: format!("invalid PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::BadFile {
            what,
            path: path.to_path_buf(),
            reason: "it holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
        });
    }
    Ok(certs)
}

/// The client certificate chain and key, when `sslcert` exists.
fn load_client_identity(
    params: &ConnParams,
) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>, TlsError> {
    let Some(cert_path) = &params.sslcert else {
        return Ok(None);
    };
    match std::fs::metadata(cert_path) {
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            return Ok(None)
        }
        Err(source) => {
            return Err(TlsError::ReadFile {
                what: "client certificate file",
                path: cert_path.clone(),
                source,
            })
        }
    }
    let chain = read_certs("client certificate file", cert_path)?;
    let Some(key_path) = &params.sslkey else {
        return Err(TlsError::ClientKeyMissing {
            cert: cert_path.clone(),
            key: PathBuf::from("~/.postgresql/postgresql.key"),
            reason: "there is no home directory".into(),
        });
    };
    let meta = std::fs::metadata(key_path).map_err(|e| TlsError::ClientKeyMissing {
        cert: cert_path.clone(),
        key: key_path.clone(),
        reason: e.to_string(),
    })?;
    check_key_permissions(key_path, &meta)?;
    let bytes = std::fs::read(key_path).map_err(|source| TlsError::ReadFile {
        what: "private key file",
        path: key_path.clone(),
        source,
    })?;
    if String::from_utf8_lossy(&bytes).contains("ENCRYPTED") {
        return Err(TlsError::BadFile {
            what: "private key file",
            path: key_path.clone(),
            reason: "it is encrypted, which walsafe does not support (no sslpassword); store it decrypted with mode 0600 (openssl pkey -in KEY -out KEY.plain)".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::BadFile {
        what: "private key file",
        path: key_path.clone(),
        reason: format!("no PEM private key (PKCS#8, PKCS#1 RSA or SEC1 EC) in it: {e}"),
    })?;
    Ok(Some((chain, key)))
}

/// libpq's rule for the client key: a regular file, no group or world
/// access, except group read when owned by root.
fn check_key_permissions(path: &Path, meta: &std::fs::Metadata) -> Result<(), TlsError> {
    if !meta.is_file() {
        return Err(TlsError::BadFile {
            what: "private key file",
            path: path.to_path_buf(),
            reason: "it is not a regular file".into(),
        });
    }
    let mode = meta.mode();
    let too_open = if meta.uid() == 0 {
        mode & 0o037 != 0
    } else {
        mode & 0o077 != 0
    };
    if too_open {
        return Err(TlsError::KeyPermissions {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// Checks the server's certificate as [`Check`] says; handshake
/// signatures are always checked.
#[derive(Debug)]
struct PgVerifier {
    check: Check,
    roots: Arc<RootCertStore>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PgVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.check == Check::Nothing {
            return Ok(ServerCertVerified::assertion());
        }
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        if self.check == Check::ChainAndName {
            rustls::client::verify_server_name(&cert, server_name)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// RFC 5929 `tls-server-end-point`: the certificate hashed with its
/// signature algorithm's hash (SHA-256 for MD5 and SHA-1); `None` when the
/// algorithm has no single hash (Ed25519, RSA-PSS) or the certificate does
/// not parse.
pub fn tls_server_end_point(cert_der: &[u8]) -> Option<Vec<u8>> {
    use x509_parser::certificate::X509CertificateParser;
    use x509_parser::der_parser::oid;
    use x509_parser::nom::Parser;
    use x509_parser::oid_registry::{
        Oid, OID_PKCS1_MD5WITHRSAENC, OID_PKCS1_SHA1WITHRSA, OID_PKCS1_SHA256WITHRSA,
        OID_PKCS1_SHA384WITHRSA, OID_PKCS1_SHA512WITHRSA, OID_SIG_ECDSA_WITH_SHA256,
        OID_SIG_ECDSA_WITH_SHA384, OID_SIG_ECDSA_WITH_SHA512,
    };
    /// ecdsa-with-SHA1 (RFC 3279), which the OID registry lacks.
    #[rustfmt::skip]
    const OID_SIG_ECDSA_WITH_SHA1: Oid<'static> = oid!(1.2.840.10045.4.1);
    // Only the signature algorithm matters here: extensions are not parsed,
    // so that an unusual one cannot cost the channel binding.
    let (_, cert) = X509CertificateParser::new()
        .with_deep_parse_extensions(false)
        .parse(cert_der)
        .ok()?;
    let alg = &cert.signature_algorithm.algorithm;
    let sha256 = [
        OID_PKCS1_MD5WITHRSAENC,
        OID_PKCS1_SHA1WITHRSA,
        OID_PKCS1_SHA256WITHRSA,
        OID_SIG_ECDSA_WITH_SHA1,
        OID_SIG_ECDSA_WITH_SHA256,
    ];
    let sha384 = [OID_PKCS1_SHA384WITHRSA, OID_SIG_ECDSA_WITH_SHA384];
    let sha512 = [OID_PKCS1_SHA512WITHRSA, OID_SIG_ECDSA_WITH_SHA512];
    if sha256.contains(alg) {
        Some(sha2::Sha256::digest(cert_der).to_vec())
    } else if sha384.contains(alg) {
        Some(sha2::Sha384::digest(cert_der).to_vec())
    } else if sha512.contains(alg) {
        Some(sha2::Sha512::digest(cert_der).to_vec())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn errors_say_what_to_do_and_are_permanent() {
        let e = TlsError::ServerRefusedTls {
            target: "127.0.0.1 port 5432".into(),
            sslmode: SslMode::Require,
        };
        assert!(e.to_string().starts_with(
            "PostgreSQL at 127.0.0.1 port 5432 does not support TLS but sslmode=require; enable ssl on the server"
        ));
        assert!(!e.is_retryable());
        let e = TlsError::RootCertMissing {
            path: "/root/.postgresql/root.crt".into(),
            sslmode: SslMode::VerifyFull,
        };
        assert!(e
            .to_string()
            .starts_with("root certificate file /root/.postgresql/root.crt does not exist"));
        assert!(e.to_string().contains("use sslmode=require"));
        let reset = TlsError::Handshake {
            target: "t".into(),
            source: io::Error::from(io::ErrorKind::ConnectionReset),
        };
        assert!(reset.is_retryable());
        let bad = TlsError::Handshake {
            target: "t".into(),
            source: io::Error::new(
                io::ErrorKind::InvalidData,
                rustls::Error::AlertReceived(rustls::AlertDescription::UnknownCA),
            ),
        };
        assert!(!bad.is_retryable());
        assert_eq!(
            alert_in(&io::Error::new(
                io::ErrorKind::InvalidData,
                rustls::Error::AlertReceived(rustls::AlertDescription::UnknownCA),
            ))
            .as_deref(),
            Some("UnknownCA")
        );
    }

    fn params(extra: &str, dir: &Path) -> ConnParams {
        let home = dir.to_string_lossy().into_owned();
        ConnParams::parse_with_env(&format!("host=db {extra}"), &|k| {
            (k == "HOME").then(|| home.clone())
        })
        .unwrap()
    }

    #[test]
    fn roots_and_modes() {
        let dir = tempfile::tempdir().unwrap();
        // No ~/.postgresql/root.crt: require checks nothing, verify-* refuse.
        let s = TlsSetup::load(&params("sslmode=require", dir.path())).unwrap();
        assert_eq!(s.check, Check::Nothing);
        assert!(!s.client_cert);
        let e = TlsSetup::load(&params("sslmode=verify-ca", dir.path())).unwrap_err();
        assert!(matches!(e, TlsError::RootCertMissing { .. }), "{e}");
        assert!(e
            .to_string()
            .contains(".postgresql/root.crt does not exist"));

        // With the default root file present, require acts like verify-ca.
        let ca = rcgen::generate_simple_self_signed(vec!["ca".to_string()]).unwrap();
        std::fs::create_dir(dir.path().join(".postgresql")).unwrap();
        std::fs::write(dir.path().join(".postgresql/root.crt"), ca.cert.pem()).unwrap();
        for (mode, check) in [
            ("prefer", Check::Chain),
            ("require", Check::Chain),
            ("verify-ca", Check::Chain),
            ("verify-full", Check::ChainAndName),
        ] {
            let s = TlsSetup::load(&params(&format!("sslmode={mode}"), dir.path())).unwrap();
            assert_eq!(s.check, check, "{mode}");
        }
        // A file that is no certificate is an error naming it.
        let junk = dir.path().join("junk.crt");
        std::fs::write(&junk, "hello").unwrap();
        let e = TlsSetup::load(&params(
            &format!("sslmode=verify-ca sslrootcert={}", junk.display()),
            dir.path(),
        ))
        .unwrap_err();
        assert!(e.to_string().contains("holds no PEM certificate"), "{e}");
    }

    #[test]
    fn client_key_rules() {
        let dir = tempfile::tempdir().unwrap();
        let cert = rcgen::generate_simple_self_signed(vec!["walsafe".to_string()]).unwrap();
        let crt = dir.path().join("c.crt");
        let key = dir.path().join("c.key");
        std::fs::write(&crt, cert.cert.pem()).unwrap();
        let files = format!("sslcert={} sslkey={}", crt.display(), key.display());
        // Certificate without key.
        let e = TlsSetup::load(&params(&files, dir.path())).unwrap_err();
        assert!(matches!(e, TlsError::ClientKeyMissing { .. }), "{e}");
        std::fs::write(&key, cert.signing_key.serialize_pem()).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        let r = TlsSetup::load(&params(&files, dir.path()));
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            // Owned by root: 0640 is allowed (libpq's rule), 0644 is not.
            assert!(r.unwrap().client_cert);
        } else {
            let e = r.unwrap_err();
            assert!(matches!(e, TlsError::KeyPermissions { .. }), "{e}");
        }
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = TlsSetup::load(&params(&files, dir.path())).unwrap_err();
        assert!(matches!(e, TlsError::KeyPermissions { .. }), "{e}");
        assert!(e.to_string().contains("chmod 0600"));
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let s = TlsSetup::load(&params(&files, dir.path())).unwrap();
        assert!(s.client_cert);
        // No certificate file: no client certificate, no error.
        let s = TlsSetup::load(&params(
            &format!("sslcert={}/none.crt", dir.path().display()),
            dir.path(),
        ))
        .unwrap();
        assert!(!s.client_cert);
    }

    #[test]
    fn channel_binding_hash_follows_the_signature_algorithm() {
        for (alg, len) in [
            (&rcgen::PKCS_ECDSA_P256_SHA256, Some(32)),
            (&rcgen::PKCS_ECDSA_P384_SHA384, Some(48)),
            (&rcgen::PKCS_ED25519, None),
        ] {
            let key = rcgen::KeyPair::generate_for(alg).unwrap();
            let cert = rcgen::CertificateParams::new(vec!["x".to_string()])
                .unwrap()
                .self_signed(&key)
                .unwrap();
            let h = tls_server_end_point(cert.der());
            assert_eq!(h.as_ref().map(Vec::len), len);
            if len == Some(32) {
                assert_eq!(h.unwrap(), sha2::Sha256::digest(cert.der()).to_vec());
            }
        }
        assert_eq!(tls_server_end_point(b""), None);
        assert_eq!(tls_server_end_point(&[0x30, 0x82, 0xff]), None);
    }
}
