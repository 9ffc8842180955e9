//! TLS at the edge (certificates chosen by SNI, ALPN h2 and http/1.1) and
//! towards `wss://` backends (system roots or a pool's CA file).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::ring as provider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::config::CertFiles;

pub mod stream;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: cannot read certificate: {source}", path.display())]
    Cert {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{}: no certificate in file", path.display())]
    NoCert { path: PathBuf },
    #[error("{}: cannot read private key: {source}", path.display())]
    Key {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{}: key does not suit the certificate: {source}", path.display())]
    BadKey {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("{}: no usable CA certificate", path.display())]
    NoRoots { path: PathBuf },
}

/// Loads a certificate chain and its key from PEM files.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Cert {
            path: cert.into(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCert { path: cert.into() });
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Key {
        path: key.into(),
        source,
    })?;
    let signer = provider::sign::any_supported_type(&der).map_err(|source| TlsError::BadKey {
        path: key.into(),
        source,
    })?;
    let ck = CertifiedKey::new(chain, signer);
    ck.keys_match().map_err(|source| TlsError::BadKey {
        path: key.into(),
        source,
    })?;
    Ok(ck)
}

/// Picks a certificate by SNI: one naming the host exactly, else the first
/// whose names (wildcards included) cover it, else the first listed.
#[derive(Debug)]
pub struct SniResolver {
    certs: Vec<Arc<CertifiedKey>>,
}

impl SniResolver {
    pub fn new(certs: Vec<Arc<CertifiedKey>>) -> Self {
        SniResolver { certs }
    }

    fn covers(ck: &CertifiedKey, name: &ServerName<'_>) -> bool {
        ck.end_entity_cert()
            .ok()
            .and_then(|der| webpki::EndEntityCert::try_from(der).ok())
            .is_some_and(|ee| ee.verify_is_valid_for_subject_name(name).is_ok())
    }

    /// The index of the certificate served for `sni`.
    pub fn pick(&self, sni: Option<&str>) -> usize {
        let Some(sni) = sni else { return 0 };
        let Ok(name) = ServerName::try_from(sni) else {
            return 0;
        };
        // A sibling name is covered only through a wildcard, so a certificate
        // that covers `sni` but not its sibling names it exactly.
        let sibling = sni
            .split_once('.')
            .and_then(|(_, rest)| ServerName::try_from(format!("upgate-sni-probe.{rest}")).ok());
        let mut first = None;
        for (i, ck) in self.certs.iter().enumerate() {
            if Self::covers(ck, &name) {
                let wildcard = sibling.as_ref().is_some_and(|s| Self::covers(ck, s));
                if !wildcard {
                    return i;
                }
                first.get_or_insert(i);
            }
        }
        first.unwrap_or(0)
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.certs.get(self.pick(hello.server_name())).cloned()
    }
}

/// Session resumption state a gateway keeps for its whole life: the ticket
/// keys (TLS 1.3 and 1.2 tickets, rotated by rustls) and the TLS 1.2
/// session-id cache. Every listener's config, including those a reload
/// builds, shares it, so a client that resumed before a reload (or on
/// another listener) still resumes after it instead of paying for a full
/// handshake.
#[derive(Clone)]
pub struct Resumption {
    ticketer: Arc<dyn rustls::server::ProducesTickets>,
    sessions: Arc<dyn rustls::server::StoresServerSessions>,
}

impl Resumption {
    pub fn new() -> Result<Resumption, TlsError> {
        Ok(Resumption {
            ticketer: provider::Ticketer::new()?,
            sessions: rustls::server::ServerSessionMemoryCache::new(4096),
        })
    }
}

/// The rustls server config of one listener.
pub fn server_config(
    files: &[CertFiles],
    resumption: &Resumption,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = files
        .iter()
        .map(|f| load_certified_key(&f.cert, &f.key).map(Arc::new))
        .collect::<Result<Vec<_>, _>>()?;
    let mut cfg =
        rustls::ServerConfig::builder_with_provider(Arc::new(provider::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(SniResolver::new(certs)));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // Resumption: clients that come back skip the full handshake.
    cfg.ticketer = resumption.ticketer.clone();
    cfg.session_storage = resumption.sessions.clone();
    cfg.send_tls13_tickets = 1;
    Ok(Arc::new(cfg))
}

/// The system's CA certificates, read once per process however many pools use them.
fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: std::sync::OnceLock<Vec<CertificateDer<'static>>> = std::sync::OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::warn!(error = %e, "loading a system CA certificate failed");
        }
        found.certs
    })
}

/// The rustls client config for a pool's `wss://` backends. We speak HTTP/1.1 to backends.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|source| TlsError::Cert {
                    path: path.into(),
                    source,
                })?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(TlsError::NoRoots { path: path.into() });
            }
        }
        None => {
            roots.add_parsable_certificates(system_roots().iter().cloned());
        }
    }
    let mut cfg =
        rustls::ClientConfig::builder_with_provider(Arc::new(provider::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A self-signed certificate for `names`, as (certificate PEM, key PEM).
pub fn self_signed(names: &[&str]) -> Result<(String, String), rcgen::Error> {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let ck = rcgen::generate_simple_self_signed(names)?;
    Ok((ck.cert.pem(), ck.signing_key.serialize_pem()))
}

/// Writes a self-signed development certificate unless both files exist.
/// The key is written with mode 0600. Returns whether it generated one.
pub fn ensure_dev_cert(cert: &Path, key: &Path) -> std::io::Result<bool> {
    if cert.exists() && key.exists() {
        return Ok(false);
    }
    let (c, k) = self_signed(&["localhost", "127.0.0.1", "::1"]).map_err(std::io::Error::other)?;
    if let Some(dir) = cert.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if let Some(dir) = key.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(cert, c)?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    std::io::Write::write_all(&mut opts.open(key)?, k.as_bytes())?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ck(names: &[&str]) -> Arc<CertifiedKey> {
        let (c, k) = self_signed(names).unwrap();
        let chain = vec![CertificateDer::from_pem_slice(c.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(k.as_bytes()).unwrap();
        Arc::new(CertifiedKey::new(
            chain,
            provider::sign::any_supported_type(&key).unwrap(),
        ))
    }

    #[test]
    fn sni_prefers_exact_then_wildcard_then_default() {
        let r = SniResolver::new(vec![
            ck(&["default.test"]),
            ck(&["*.example.com"]),
            ck(&["chat.example.com"]),
        ]);
        assert_eq!(r.pick(Some("chat.example.com")), 2);
        assert_eq!(r.pick(Some("feed.example.com")), 1);
        assert_eq!(r.pick(Some("default.test")), 0);
        assert_eq!(r.pick(Some("unknown.org")), 0);
        assert_eq!(r.pick(None), 0);
    }
}
