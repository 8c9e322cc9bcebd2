//! TLS served by kaiwa itself (`--tls-cert`, `--tls-key`): rustls with aws-lc-rs, no OpenSSL.
//! The certificate is read again when its files change, so a renewal needs no restart.

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// The files are looked at again at most this often, on the next connection after it.
const RECHECK: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("--tls-cert {path}: {reason}")]
    Certificate { path: PathBuf, reason: String },
    #[error("--tls-key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("--tls-cert and --tls-key do not belong together: {0}")]
    Mismatch(String),
    #[error("TLS could not be set up: {0}")]
    Setup(String),
}

/// Accepts TLS connections with the configured certificate.
pub struct Tls {
    acceptor: TlsAcceptor,
    certificates: Arc<Certificates>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("certificate", &self.certificates.cert_path)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Reads the certificate chain and its key, and checks that they belong together.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let certified = load(cert, key, &provider)?;
        let certificates = Arc::new(Certificates {
            cert_path: cert.to_owned(),
            key_path: key.to_owned(),
            stamp: Mutex::new(Stamp {
                files: stamp(cert, key),
                checked: Instant::now(),
            }),
            current: RwLock::new(Arc::new(certified)),
            provider: provider.clone(),
        });
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|err| TlsError::Setup(err.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(certificates.clone());
        // kaiwa speaks HTTP/1.1 only (WebSocket upgrades are HTTP/1.1).
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            certificates,
        })
    }

    /// The TLS handshake of an accepted connection; the caller bounds its time.
    pub(super) async fn accept(&self, tcp: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
        self.certificates.refresh();
        self.acceptor.accept(tcp).await
    }
}

/// When and how big the two files were: a change in either means a renewal.
type FileStamp = [(Option<SystemTime>, u64); 2];

#[derive(Debug)]
struct Stamp {
    files: FileStamp,
    checked: Instant,
}

/// The certificate connections get now, and where it comes from.
#[derive(Debug)]
struct Certificates {
    cert_path: PathBuf,
    key_path: PathBuf,
    stamp: Mutex<Stamp>,
    current: RwLock<Arc<CertifiedKey>>,
    provider: Arc<CryptoProvider>,
}

impl Certificates {
    /// Reads the files again if they changed since they were last read. A pair that does not
    /// load (a renewal half written, say) leaves the current certificate in place.
    fn refresh(&self) {
        let mut stamp = self
            .stamp
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if stamp.checked.elapsed() < RECHECK {
            return;
        }
        stamp.checked = Instant::now();
        let files = self::stamp(&self.cert_path, &self.key_path);
        if files == stamp.files {
            return;
        }
        stamp.files = files;
        match load(&self.cert_path, &self.key_path, &self.provider) {
            Ok(certified) => {
                *self
                    .current
                    .write()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(certified);
                tracing::info!(certificate = %self.cert_path.display(), "TLS certificate changed on disk: new connections get the new one");
            }
            Err(err) => {
                tracing::error!(%err, "the TLS certificate files changed but do not load; connections keep getting the previous certificate");
            }
        }
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone(),
        )
    }
}

fn stamp(cert: &Path, key: &Path) -> FileStamp {
    [cert, key].map(|path| match std::fs::metadata(path) {
        Ok(meta) => (meta.modified().ok(), meta.len()),
        Err(_) => (None, 0),
    })
}

fn load(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let certificate = |reason: String| TlsError::Certificate {
        path: cert.to_owned(),
        reason,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|err| certificate(err.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| certificate(err.to_string()))?;
    if chain.is_empty() {
        return Err(certificate("no CERTIFICATE in the file".into()));
    }
    // The error names the file, never its content.
    let private = PrivateKeyDer::from_pem_file(key).map_err(|err| TlsError::Key {
        path: key.to_owned(),
        reason: err.to_string(),
    })?;
    CertifiedKey::from_der(chain, private, provider)
        .map_err(|err| TlsError::Mismatch(err.to_string()))
}
