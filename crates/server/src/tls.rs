//! TLS for the `tls` and `wss` listeners: certificates and keys from PEM files, TLS 1.2 and
//! 1.3 with the ring provider, optional client-certificate verification against a CA file.
//! Everything is loaded at start (and by `check-config`), never at the first connection.

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig, version};

pub use tokio_rustls::rustls::ServerConfig as TlsConfig;

/// What is wrong with one TLS setting; `key` names the config key (`cert`, `key`, `client_ca`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsError {
    pub key: &'static str,
    pub message: String,
}

fn err(key: &'static str, message: impl Into<String>) -> TlsError {
    TlsError {
        key,
        message: message.into(),
    }
}

fn certificates(path: &Path, key: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let iter = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(key, format!("cannot read {}: {e}", path.display())))?;
    let certs: Vec<_> = iter.collect::<Result<_, _>>().map_err(|e| {
        err(
            key,
            format!("{}: not a PEM certificate: {e}", path.display()),
        )
    })?;
    if certs.is_empty() {
        return Err(err(
            key,
            format!("{}: no certificate in the file", path.display()),
        ));
    }
    Ok(certs)
}

/// Builds the server side of TLS from PEM files.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certificates(cert, "cert")?;
    let private_key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        err(
            "key",
            format!("{}: no usable PEM private key: {e}", key.display()),
        )
    })?;
    let builder = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_protocol_versions(&[&version::TLS13, &version::TLS12])
        .map_err(|e| err("cert", format!("TLS versions: {e}")))?;
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(ca, "client_ca")? {
                roots
                    .add(cert)
                    .map_err(|e| err("client_ca", format!("{}: {e}", ca.display())))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                Arc::new(ring::default_provider()),
            )
            .build()
            .map_err(|e| err("client_ca", format!("{}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(chain, private_key)
        .map_err(|e| err("key", format!("the key does not fit the certificate: {e}")))?;
    Ok(Arc::new(config))
}
