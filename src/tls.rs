//! TLS on both hops: the listener's certificate (and the throwaway dev pair), and the trust
//! anchors used to verify gateways.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::ring;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;

use crate::config::{is_dev_cert_path, Config};

/// A certificate, key or CA file that cannot be used.
#[derive(Debug, Error)]
pub enum TlsError {
    #[error("{key}: {path}: {why}")]
    File { key: &'static str, path: String, why: String },
    #[error("building the TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn file_error(key: &'static str, path: &Path, why: impl ToString) -> TlsError {
    TlsError::File { key, path: path.display().to_string(), why: why.to_string() }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// Reads a PEM certificate chain.
pub fn load_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
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
pub fn load_key(key: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
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

/// The listener's TLS configuration: TLS 1.2 and 1.3, ALPN `http/1.1`.
pub fn server_config(config: &Config) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = load_certs("server.cert", &config.server.cert)?;
    let key = load_key("server.key", &config.server.key)?;
    let mut tls = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| file_error("server.key", &config.server.key, format!("does not match server.cert: {e}")))?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(tls))
}

/// The gateway-side TLS configuration: Mozilla's roots plus `ca_file`, full verification.
pub fn client_config(config: &Config) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    if let Some(ca) = &config.upstream.ca_file {
        for cert in load_certs("upstream.ca_file", ca)? {
            roots.add(cert).map_err(|e| file_error("upstream.ca_file", ca, e))?;
        }
    }
    let mut tls = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(tls))
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
