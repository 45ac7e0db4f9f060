//! TLS on both hops: the listener's certificate (and the throwaway dev pair), and the trust
//! anchors used to verify gateways.

use std::path::Path;
use std::sync::Arc;

use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use thiserror::Error;

use crate::config::{is_dev_cert_path, Config};

/// A certificate, key or CA file that cannot be used.
#[derive(Debug, Error)]
pub enum TlsError {
    #[error("{key}: {path}: {why}")]
    File { key: String, path: String, why: String },
    #[error("building the TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn file_error(key: &str, path: &Path, why: impl ToString) -> TlsError {
    TlsError::File { key: key.to_string(), path: path.display().to_string(), why: why.to_string() }
}

/// ring for the record layer, certificates and signatures, aws-lc-rs for key exchange and
/// random numbers: aws-lc's X25519 costs half of ring's (it was a quarter of the CPU per
/// handshake) and its random numbers need no system call each, while ring seals and opens small
/// records faster. Cipher suites with AES-128-GCM first: its SHA-256 key schedule is cheaper
/// per handshake than the SHA-384 of AES-256-GCM, which rustls otherwise puts first. Every suite
/// is AEAD with forward secrecy, as Mozilla's intermediate profile asks. Key exchange: X25519,
/// P-256, P-384 (no post-quantum hybrid yet: it would add an ML-KEM key to every gateway
/// connection). Everything sigrelay speaks TLS with uses it: the listener, the gateway hop,
/// and the mock gateway and load-test client, so a benchmark's harness costs what a browser and
/// a gateway would, not more.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::aws_lc_rs::{self as aws_lc, kx_group};
    use rustls::crypto::ring::{self, cipher_suite::*};
    Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: vec![
            TLS13_AES_128_GCM_SHA256,
            TLS13_AES_256_GCM_SHA384,
            TLS13_CHACHA20_POLY1305_SHA256,
            TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        ],
        kx_groups: vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1],
        secure_random: aws_lc::default_provider().secure_random,
        ..ring::default_provider()
    })
}

/// Reads a PEM certificate chain.
pub fn load_certs(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(key, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(key, path, e))?;
    if certs.is_empty() {
        return Err(file_error(key, path, "no CERTIFICATE block in the file"));
    }
    Ok(certs)
}

/// Reads a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(key: &str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_error(key, path, e))
}

/// Writes a self-signed `localhost` certificate and key if the configured pair is missing and
/// lives under `certs/dev/`. Returns whether it generated one.
pub fn ensure_dev_cert(cert: &Path, key: &Path) -> Result<bool, TlsError> {
    if cert.exists() && key.exists() {
        return Ok(false);
    }
    if !is_dev_cert_path(cert) || !is_dev_cert_path(key) {
        return Ok(false);
    }
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into(), "::1".into()])
        .map_err(|e| file_error("server.cert", cert, e))?;
    for (path, pem, name) in [
        (cert, generated.cert.pem(), "server.cert"),
        (key, generated.signing_key.serialize_pem(), "server.key"),
    ] {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| file_error(name, path, e))?;
        }
        std::fs::write(path, pem).map_err(|e| file_error(name, path, e))?;
    }
    Ok(true)
}

/// The listener's TLS configuration: TLS 1.2 and 1.3, ALPN `http/1.1` (and `stun.turn`, for TURN
/// clients that name it: RFC 7443), certificates from `store`.
pub fn server_config(store: Arc<CertStore>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut tls = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(store);
    // A client offering ALPN without one of these is refused by rustls. A TURN client's first
    // bytes send it to TURN; the listener holds a session to what its ALPN agreed.
    tls.alpn_protocols = vec![b"http/1.1".to_vec(), b"stun.turn".to_vec()];
    tls.ignore_client_order = true;
    // A browser spends one ticket per resumed connection, so one replaces it; rustls's default
    // of two costs a second ticket's encryption and cache entry on every handshake.
    tls.send_tls13_tickets = 1;
    Ok(Arc::new(tls))
}

/// The listener's certificates: the default pair and `[[server.certs]]`, picked by SNI, and
/// swapped whole on reload so a handshake sees either the old set or the new one.
#[derive(Debug)]
pub struct CertStore {
    current: arc_swap::ArcSwap<CertSet>,
    /// Fingerprint of the files' contents when last loaded, to notice changes.
    loaded_from: std::sync::Mutex<u64>,
}

#[derive(Debug)]
struct CertSet {
    default: Arc<CertifiedKey>,
    extra: Vec<Arc<CertifiedKey>>,
    /// Each name served, with its certificate's `notAfter`, for the expiry metric.
    expiry: Vec<(String, i64)>,
}

impl CertStore {
    /// Loads every configured pair; fails on the first unusable one.
    pub fn load(config: &Config) -> Result<CertStore, TlsError> {
        let set = CertSet::load(config)?;
        Ok(CertStore {
            current: arc_swap::ArcSwap::from_pointee(set),
            loaded_from: std::sync::Mutex::new(files_fingerprint(config)),
        })
    }

    /// Re-reads the files; on any error the certificates in service stay. Returns whether
    /// anything was reloaded.
    pub fn reload(&self, config: &Config) -> Result<bool, TlsError> {
        let fingerprint = files_fingerprint(config);
        let mut loaded_from = self.loaded_from.lock().unwrap();
        if *loaded_from == fingerprint {
            return Ok(false);
        }
        let set = CertSet::load(config)?;
        self.current.store(Arc::new(set));
        *loaded_from = fingerprint;
        Ok(true)
    }
}

impl CertSet {
    fn load(config: &Config) -> Result<CertSet, TlsError> {
        let default = certified_key(&config.server.cert, &config.server.key, &Keys::default_pair())?;
        let extra = config
            .server
            .certs
            .iter()
            .enumerate()
            .map(|(i, pair)| certified_key(&pair.cert, &pair.key, &Keys::extra_pair(i)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut expiry: Vec<(String, i64)> = Vec::new();
        // The first extra pair naming a host serves it, else the default pair (as `resolve`).
        let paths = config.server.certs.iter().enumerate().map(|(i, p)| (&p.cert, Keys::extra_pair(i)));
        let paths = paths.chain(std::iter::once((&config.server.cert, Keys::default_pair())));
        for (ck, (path, keys)) in extra.iter().chain(std::iter::once(&default)).zip(paths) {
            let (mut names, not_after) = names_and_expiry(ck, path, &keys.cert)?;
            if names.is_empty() && Arc::ptr_eq(ck, &default) {
                // Served to every name the others do not cover, and to clients that send no SNI.
                names.push("-".into());
            }
            for name in names {
                if !expiry.iter().any(|(n, _)| *n == name) {
                    expiry.push((name, not_after));
                }
            }
        }
        Ok(CertSet { default, extra, expiry })
    }
}

/// The config keys a pair's problems are reported under: `server.cert`/`server.key` for the
/// default pair, `server.certs[i].cert`/`.key` for the extra ones.
struct Keys {
    cert: String,
    key: String,
}

impl Keys {
    fn default_pair() -> Keys {
        Keys { cert: "server.cert".into(), key: "server.key".into() }
    }

    fn extra_pair(i: usize) -> Keys {
        Keys { cert: format!("server.certs[{i}].cert"), key: format!("server.certs[{i}].key") }
    }
}

/// The DNS names (wildcards included) and the `notAfter` (Unix seconds) of a pair's leaf, read
/// from `path` (the config key `name`).
fn names_and_expiry(ck: &CertifiedKey, path: &Path, name: &str) -> Result<(Vec<String>, i64), TlsError> {
    let der = ck.end_entity_cert().map_err(|e| file_error(name, path, e))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(der).map_err(|e| file_error(name, path, e))?;
    let not_after = parsed.validity().not_after.timestamp();
    let names = webpki::EndEntityCert::try_from(der)
        .map(|ee| ee.valid_dns_names().map(str::to_string).collect())
        .unwrap_or_default();
    Ok((names, not_after))
}

fn certified_key(cert: &Path, key: &Path, keys: &Keys) -> Result<Arc<CertifiedKey>, TlsError> {
    let certs = load_certs(&keys.cert, cert)?;
    let key_der = load_key(&keys.key, key)?;
    let signing = provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| file_error(&keys.key, key, e))?;
    let ck = CertifiedKey::new(certs, signing);
    ck.keys_match().map_err(|e| file_error(&keys.key, key, format!("does not match {}: {e}", cert.display())))?;
    Ok(Arc::new(ck))
}

/// A hash of the certificate and key files' contents (following symlinks, as Kubernetes swaps
/// a mounted Secret by replacing a symlink).
fn files_fingerprint(config: &Config) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let pairs = std::iter::once((&config.server.cert, &config.server.key))
        .chain(config.server.certs.iter().map(|p| (&p.cert, &p.key)));
    for (cert, key) in pairs {
        for path in [cert, key] {
            path.hash(&mut h);
            std::fs::read(path).ok().hash(&mut h);
        }
    }
    h.finish()
}

impl CertStore {
    /// Each name the certificates answer to, with the `notAfter` (Unix seconds) of the
    /// certificate served for it; the default certificate is listed as `-` when it names no
    /// host (an IP-only certificate).
    pub fn expiry(&self) -> Vec<(String, i64)> {
        self.current.load().expiry.clone()
    }

    /// The first DNS name, not a wildcard, of the default certificate: the relay's own host.
    pub fn host_name(&self) -> Option<String> {
        let set = self.current.load();
        let der = set.default.end_entity_cert().ok()?;
        let cert = webpki::EndEntityCert::try_from(der).ok()?;
        let name = cert.valid_dns_names().find(|n| !n.starts_with('*')).map(str::to_string);
        name
    }
}

impl rustls::server::ResolvesServerCert for CertStore {
    fn resolve(&self, hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let set = self.current.load();
        if let Some(sni) = hello.server_name() {
            crate::tls_stream::saw_client_sni(sni);
            if let Ok(name) = ServerName::try_from(sni) {
                for ck in &set.extra {
                    let valid = ck.end_entity_cert().ok().and_then(|der| webpki::EndEntityCert::try_from(der).ok())
                        .is_some_and(|ee| ee.verify_is_valid_for_subject_name(&name).is_ok());
                    if valid {
                        return Some(ck.clone());
                    }
                }
            }
        }
        Some(set.default.clone())
    }
}

/// The gateway-side TLS configuration: Mozilla's roots plus `ca_file`, full verification.
pub fn client_config(config: &Config) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    if let Some(ca) = &config.upstream.ca_file {
        for cert in load_certs("upstream.ca_file", ca)? {
            roots.add(cert).map_err(|e| file_error("upstream.ca_file", ca, e))?;
        }
    }
    client_config_with_roots(roots)
}

/// A verifying client configuration for `roots`: TLS 1.3 and 1.2, ALPN `http/1.1`, and room
/// for 64 TLS 1.3 tickets per server so bursts of connections resume.
pub fn client_config_with_roots(roots: RootCertStore) -> Result<Arc<ClientConfig>, TlsError> {
    let mut tls = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    tls.resumption = rustls::client::Resumption::store(Arc::new(TicketStore::default()));
    Ok(Arc::new(tls))
}

/// TLS 1.3 tickets kept per gateway host name.
const TICKETS_PER_GATEWAY: usize = 64;

/// The gateway-side session store: rustls's in-memory one, with room for more TLS 1.3 tickets
/// per gateway. rustls keeps 8 per server; a burst of connections to one gateway (a meeting
/// starting, a reconnect wave) uses them up and the rest pay a full handshake, certificate
/// verification included. Bounded: one queue per configured gateway host.
#[derive(Debug)]
struct TicketStore {
    other: rustls::client::ClientSessionMemoryCache,
    tls13: std::sync::Mutex<std::collections::HashMap<ServerName<'static>, std::collections::VecDeque<rustls::client::Tls13ClientSessionValue>>>,
}

impl Default for TicketStore {
    fn default() -> TicketStore {
        TicketStore { other: rustls::client::ClientSessionMemoryCache::new(256), tls13: Default::default() }
    }
}

impl rustls::client::ClientSessionStore for TicketStore {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: rustls::NamedGroup) {
        self.other.set_kx_hint(server_name, group)
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.other.kx_hint(server_name)
    }

    fn set_tls12_session(&self, server_name: ServerName<'static>, value: rustls::client::Tls12ClientSessionValue) {
        self.other.set_tls12_session(server_name, value)
    }

    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.other.tls12_session(server_name)
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.other.remove_tls12_session(server_name)
    }

    fn insert_tls13_ticket(&self, server_name: ServerName<'static>, value: rustls::client::Tls13ClientSessionValue) {
        let mut all = self.tls13.lock().unwrap();
        let tickets = all.entry(server_name).or_default();
        if tickets.len() == TICKETS_PER_GATEWAY {
            tickets.pop_front();
        }
        tickets.push_back(value);
    }

    fn take_tls13_ticket(&self, server_name: &ServerName<'static>) -> Option<rustls::client::Tls13ClientSessionValue> {
        // The newest first: it is the least likely to have left the server's session cache.
        self.tls13.lock().unwrap().get_mut(server_name)?.pop_back()
    }
}

/// A client configuration that accepts any server certificate, for `sigrelay healthcheck`
/// probing the relay's own loopback port: it asks "is it up", not "is it who it claims".
pub fn probe_client_config() -> Arc<ClientConfig> {
    let provider = provider();
    let verifier = Arc::new(AnyCertificate(provider.clone()));
    Arc::new(
        ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth(),
    )
}

#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CertPair;

    /// A self-signed pair written under `dir/<name>/certs/dev/`.
    fn pair(dir: &Path, name: &str) -> CertPair {
        let dev = dir.join(name).join("certs/dev");
        let (cert, key) = (dev.join("cert.pem"), dev.join("key.pem"));
        assert!(ensure_dev_cert(&cert, &key).unwrap());
        CertPair { cert, key }
    }

    #[test]
    fn a_broken_extra_pair_is_named_by_its_own_keys() {
        let dir = tempfile::tempdir().unwrap();
        let (default, first, second) = (pair(dir.path(), "default"), pair(dir.path(), "a"), pair(dir.path(), "b"));
        let mut config = Config::defaults();
        config.server.cert = default.cert.clone();
        config.server.key = default.key.clone();
        let load_with = |config: &Config, certs: Vec<CertPair>| {
            let mut config = config.clone();
            config.server.certs = certs;
            CertStore::load(&config).map(drop).unwrap_err().to_string()
        };
        let load = |certs| load_with(&config, certs);
        let good = CertPair { cert: first.cert.clone(), key: first.key.clone() };
        let missing = dir.path().join("missing.pem");

        let e = load(vec![good.clone(), CertPair { cert: missing.clone(), key: second.key.clone() }]);
        assert!(e.starts_with("server.certs[1].cert: "), "{e}");
        let e = load(vec![good.clone(), CertPair { cert: second.cert.clone(), key: missing }]);
        assert!(e.starts_with("server.certs[1].key: "), "{e}");
        let e = load(vec![CertPair { cert: second.cert.clone(), key: first.key.clone() }]);
        assert!(e.starts_with("server.certs[0].key: ") && e.contains("does not match"), "{e}");
        // The default pair keeps its own keys.
        let mut mismatched = config.clone();
        mismatched.server.key = second.key.clone();
        let e = load_with(&mismatched, vec![good]);
        assert!(e.starts_with("server.key: ") && e.contains("does not match"), "{e}");
    }
}
