//! How the fleet's processes reach each other over gRPC: plain HTTP/2 (the default, inside a
//! NetworkPolicy), or mutual TLS, where every process presents a certificate signed by the
//! fleet's CA and accepts only peers that do the same. The files are those of a Kubernetes TLS
//! Secret as cert-manager writes it: `tls.crt`, `tls.key` and `ca.crt`.

use anyhow::{bail, Context, Result};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The time a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// This process's certificate chain and key, and the CA every peer's certificate must chain to.
pub struct MutualTls {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Vec<u8>,
}

impl MutualTls {
    /// From PEM text, each part checked so a wrong file is named before anything starts.
    pub fn from_pem(cert: Vec<u8>, key: Vec<u8>, ca: Vec<u8>) -> Result<Self> {
        certificates(&cert).context("the certificate")?;
        certificates(&ca).context("the CA certificate")?;
        PrivateKeyDer::from_pem_slice(&key)
            .map_err(|e| anyhow::anyhow!("the private key: no PEM private key ({e})"))?;
        Ok(MutualTls { cert, key, ca })
    }

    /// From the certificate, key and CA files (`--tls-cert`, `--tls-key`, `--tls-ca`).
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<Self> {
        let read = |path: &Path, flag: &str| {
            std::fs::read(path).with_context(|| format!("{flag}: cannot read {}", path.display()))
        };
        let (cert_pem, key_pem, ca_pem) = (
            read(cert, "--tls-cert")?,
            read(key, "--tls-key")?,
            read(ca, "--tls-ca")?,
        );
        certificates(&cert_pem).with_context(|| format!("--tls-cert {}", cert.display()))?;
        certificates(&ca_pem).with_context(|| format!("--tls-ca {}", ca.display()))?;
        PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| anyhow::anyhow!("--tls-key {}: no PEM private key ({e})", key.display()))?;
        Ok(MutualTls {
            cert: cert_pem,
            key: key_pem,
            ca: ca_pem,
        })
    }

    fn identity(&self) -> Identity {
        Identity::from_pem(&self.cert, &self.key)
    }

    fn ca(&self) -> Certificate {
        Certificate::from_pem(&self.ca)
    }
}

/// Every certificate in `pem`; an error when there is none or one does not parse.
fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("not PEM ({e})"))?;
    if certs.is_empty() {
        bail!("no PEM certificate in it");
    }
    Ok(certs)
}

/// How this process's gRPC servers listen and its clients connect.
#[derive(Clone, Default)]
pub enum Transport {
    /// Plain HTTP/2.
    #[default]
    Plain,
    /// Mutual TLS: the servers require a client certificate from the CA, the clients check the
    /// server's certificate against the CA and the name they dialled.
    MutualTls(Arc<MutualTls>),
}

impl Transport {
    /// `http` or `https`.
    pub fn scheme(&self) -> &'static str {
        match self {
            Transport::Plain => "http",
            Transport::MutualTls(_) => "https",
        }
    }

    /// A server's TLS settings, or none for plain HTTP/2.
    pub(crate) fn server(&self) -> Option<ServerTlsConfig> {
        match self {
            Transport::Plain => None,
            Transport::MutualTls(tls) => Some(
                ServerTlsConfig::new()
                    .identity(tls.identity())
                    .client_ca_root(tls.ca())
                    .timeout(HANDSHAKE_TIMEOUT),
            ),
        }
    }

    /// A client's TLS settings for a server whose certificate must name `server_name` (the
    /// host it dials, unless told otherwise), or none for plain HTTP/2.
    pub(crate) fn client(&self, server_name: &str) -> Option<ClientTlsConfig> {
        match self {
            Transport::Plain => None,
            Transport::MutualTls(tls) => Some(
                ClientTlsConfig::new()
                    .ca_certificate(tls.ca())
                    .identity(tls.identity())
                    .domain_name(server_name)
                    .timeout(HANDSHAKE_TIMEOUT),
            ),
        }
    }
}
