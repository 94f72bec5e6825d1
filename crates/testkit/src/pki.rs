//! Certificates made in the test: a CA, a server certificate for 127.0.0.1/localhost and a
//! client certificate, as PEM files, and rustls client configurations that trust the CA.

use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tempfile::TempDir;

pub struct TestPki {
    dir: TempDir,
    pub ca_pem: String,
    pub client_cert_pem: String,
    pub client_key_pem: String,
}

impl TestPki {
    pub fn new() -> TestPki {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = TempDir::new().expect("temp dir");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Distinct names: with rcgen's default name for all, OpenSSL takes the server
        // certificate for a self-signed one.
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "Herald test CA");
        let ca =
            CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("CA");
        let server_key = KeyPair::generate().expect("key");
        let mut server_params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("params");
        server_params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let server = server_params
            .signed_by(&server_key, &ca)
            .expect("server cert");
        let client_key = KeyPair::generate().expect("key");
        let mut client_params =
            CertificateParams::new(vec!["device-1".to_string()]).expect("params");
        client_params
            .distinguished_name
            .push(DnType::CommonName, "device-1");
        let client = client_params
            .signed_by(&client_key, &ca)
            .expect("client cert");
        let pki = TestPki {
            dir,
            ca_pem: ca.pem(),
            client_cert_pem: client.pem(),
            client_key_pem: client_key.serialize_pem(),
        };
        std::fs::write(pki.path("ca.pem"), &pki.ca_pem).expect("write");
        std::fs::write(pki.path("server.pem"), server.pem()).expect("write");
        std::fs::write(pki.path("server.key"), server_key.serialize_pem()).expect("write");
        pki
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Trusts the test CA; presents the client certificate when `with_client_cert`.
    pub fn client_config(&self, with_client_cert: bool) -> Arc<ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots.add(cert.expect("CA PEM")).expect("add CA");
        }
        let builder = ClientConfig::builder().with_root_certificates(roots);
        let config = if with_client_cert {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(self.client_cert_pem.as_bytes())
                    .map(|c| c.expect("cert PEM"))
                    .collect();
            let key =
                PrivateKeyDer::from_pem_slice(self.client_key_pem.as_bytes()).expect("key PEM");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client auth")
        } else {
            builder.with_no_client_auth()
        };
        Arc::new(config)
    }
}

impl Default for TestPki {
    fn default() -> Self {
        TestPki::new()
    }
}
