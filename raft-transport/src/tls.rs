//! The kernel's own certificate authority and the TLS configs built on it.
//!
//! A kernel generates a fresh CA when it starts ([`KernelCa::generate`]). Every replica
//! generates its private key where it runs ([`NodeKey::generate`]) and only sends its
//! *public* key to the CA holder, which returns a certificate for `node-<id>` signed by
//! the kernel CA ([`KernelCa::sign_node_key`]). Private keys therefore never travel.
//!
//! Both sides of every QUIC connection present such a certificate, and both sides trust
//! only the kernel CA: a peer whose certificate chains to any other CA fails the
//! handshake. The dialer additionally checks that the server's certificate names the
//! node it meant to reach, and the acceptor checks the dialer's claimed node id against
//! its certificate (see `server.rs`).

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, PublicKeyData, SignatureAlgorithm, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

use crate::error::TlsError;
use crate::types::NodeId;

/// ALPN protocol id; a client speaking anything else is refused by rustls.
pub const ALPN: &[u8] = b"notebookos-raft/1";

/// The DNS name a replica's certificate is issued for. Not resolved: it only binds
/// the certificate to a replica id.
pub fn node_server_name(id: NodeId) -> String {
    format!("node-{id}.replica.notebookos")
}

/// The crypto provider used everywhere. `ring` builds with just a C compiler;
/// aws-lc-rs would need cmake and nasm.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The CA of one kernel. Keep it on the host that created it.
pub struct KernelCa {
    params: CertificateParams,
    key: KeyPair,
    cert: CertificateDer<'static>,
}

impl KernelCa {
    /// Generates a new CA for the kernel named `kernel_id` (used only in the subject name).
    pub fn generate(kernel_id: &str) -> Result<Self, TlsError> {
        let params = Self::params(kernel_id)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = params.self_signed(&key)?.der().clone();
        Ok(Self { params, key, cert })
    }

    fn params(kernel_id: &str) -> Result<CertificateParams, TlsError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "notebookos");
        dn.push(
            DnType::CommonName,
            format!("notebookos kernel {kernel_id} CA"),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Ok(params)
    }

    /// CA certificate and key as PEM, for the CA holder's own disk (store it mode 0600) so
    /// that a restarted kernel launcher can keep signing for the same kernel.
    pub fn to_pem(&self) -> String {
        let mut out = pem_encode("CERTIFICATE", &self.cert);
        out.push_str(&pem_encode("PRIVATE KEY", self.key.serialized_der()));
        out
    }

    /// Restores a CA written by [`KernelCa::to_pem`]; `kernel_id` must be the one it was
    /// generated with (the issuer name of new certificates is derived from it).
    pub fn from_pem(kernel_id: &str, pem: &str) -> Result<Self, TlsError> {
        let mut cert = None;
        let mut key = None;
        for (label, der) in pem_decode_all(pem)? {
            match label.as_str() {
                "CERTIFICATE" => cert = Some(der),
                "PRIVATE KEY" => key = Some(der),
                other => return Err(TlsError::Pem(format!("unexpected PEM block {other}"))),
            }
        }
        let cert = cert.ok_or_else(|| TlsError::Pem("missing CERTIFICATE".into()))?;
        let key = key.ok_or_else(|| TlsError::Pem("missing PRIVATE KEY".into()))?;
        let key = KeyPair::from_pkcs8_der_and_sign_algo(
            &PrivatePkcs8KeyDer::from(key),
            &PKCS_ECDSA_P256_SHA256,
        )?;
        Ok(Self {
            params: Self::params(kernel_id)?,
            key,
            cert: CertificateDer::from(cert),
        })
    }

    /// The CA certificate (public) that every replica must trust.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert.clone()
    }

    /// The CA certificate as PEM, to hand to replicas on other hosts.
    pub fn cert_pem(&self) -> String {
        pem_encode("CERTIFICATE", &self.cert)
    }

    /// Signs a certificate for replica `id` over a public key that the replica generated.
    pub fn sign_node_key(
        &self,
        id: NodeId,
        public_key: &NodePublicKey,
    ) -> Result<CertificateDer<'static>, TlsError> {
        let mut params = CertificateParams::new(vec![node_server_name(id)])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "notebookos");
        dn.push(DnType::CommonName, node_server_name(id));
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // A replica is both a TLS server (accepts) and a TLS client (dials).
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        Ok(params.signed_by(public_key, &issuer)?.der().clone())
    }

    /// Convenience for replicas on the CA's own host (and tests): key + certificate.
    pub fn issue_identity(&self, id: NodeId) -> Result<NodeIdentity, TlsError> {
        let key = NodeKey::generate()?;
        let cert = self.sign_node_key(id, &key.public_key())?;
        Ok(key.into_identity(id, cert, self.cert_der()))
    }
}

/// A replica's private key, generated where the replica runs.
pub struct NodeKey {
    key: KeyPair,
}

/// The public half of a [`NodeKey`]: the only thing sent to the CA holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodePublicKey {
    raw: Vec<u8>,
}

impl NodePublicKey {
    /// Raw uncompressed P-256 point, as produced by [`NodePublicKey::as_bytes`].
    pub fn from_bytes(raw: Vec<u8>) -> Result<Self, TlsError> {
        // 0x04 || X || Y for uncompressed P-256.
        if raw.len() != 65 || raw[0] != 4 {
            return Err(TlsError::PublicKey(
                "expected an uncompressed P-256 point".into(),
            ));
        }
        Ok(Self { raw })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.raw
    }
}

impl PublicKeyData for NodePublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

impl NodeKey {
    pub fn generate() -> Result<Self, TlsError> {
        Ok(Self {
            key: KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?,
        })
    }

    pub fn public_key(&self) -> NodePublicKey {
        NodePublicKey {
            raw: self.key.public_key_raw().to_vec(),
        }
    }

    pub fn into_identity(
        self,
        id: NodeId,
        cert: CertificateDer<'static>,
        ca_cert: CertificateDer<'static>,
    ) -> NodeIdentity {
        NodeIdentity {
            id,
            cert,
            key_pkcs8: self.key.serialize_der(),
            ca_cert,
        }
    }
}

/// Everything a replica needs to authenticate and to authenticate its peers.
#[derive(Clone)]
pub struct NodeIdentity {
    pub id: NodeId,
    pub cert: CertificateDer<'static>,
    key_pkcs8: Vec<u8>,
    pub ca_cert: CertificateDer<'static>,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("NodeIdentity")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl NodeIdentity {
    /// Writes certificate, key and CA as one PEM bundle (for a replica's own disk, mode 0600).
    pub fn to_pem(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!("# notebookos replica {}\n", self.id));
        out.push_str(&pem_encode("CERTIFICATE", &self.cert));
        out.push_str(&pem_encode("PRIVATE KEY", &self.key_pkcs8));
        out.push_str(&pem_encode("CA CERTIFICATE", &self.ca_cert));
        out
    }

    /// Parses the bundle written by [`NodeIdentity::to_pem`].
    pub fn from_pem(id: NodeId, pem: &str) -> Result<Self, TlsError> {
        let mut cert = None;
        let mut key = None;
        let mut ca = None;
        for (label, der) in pem_decode_all(pem)? {
            match label.as_str() {
                "CERTIFICATE" => cert = Some(der),
                "PRIVATE KEY" => key = Some(der),
                "CA CERTIFICATE" => ca = Some(der),
                other => return Err(TlsError::Pem(format!("unexpected PEM block {other}"))),
            }
        }
        let missing = |what: &str| TlsError::Pem(format!("missing {what}"));
        Ok(Self {
            id,
            cert: CertificateDer::from(cert.ok_or_else(|| missing("CERTIFICATE"))?),
            key_pkcs8: key.ok_or_else(|| missing("PRIVATE KEY"))?,
            ca_cert: CertificateDer::from(ca.ok_or_else(|| missing("CA CERTIFICATE"))?),
        })
    }

    fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8.clone()))
    }

    fn roots(&self) -> Result<Arc<rustls::RootCertStore>, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_cert.clone())?;
        Ok(Arc::new(roots))
    }

    /// Server side: require a client certificate that chains to the kernel CA.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let provider = crypto_provider();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots()?,
            provider.clone(),
        )
        .build()?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![self.cert.clone()], self.private_key())?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }

    /// Client side: trust only the kernel CA and present our own certificate.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(vec![self.cert.clone()], self.private_key())?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }
}

/// True when `cert` (already verified to chain to the kernel CA by rustls) was issued
/// for replica `id`. Used by the acceptor to bind a dialer's claimed id to its certificate.
pub(crate) fn cert_is_for_node(cert: &CertificateDer<'_>, id: NodeId) -> bool {
    let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    let Ok(name) = ServerName::try_from(node_server_name(id)) else {
        return false;
    };
    ee.verify_is_valid_for_subject_name(&name).is_ok()
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new(label, der), config)
}

fn pem_decode_all(text: &str) -> Result<Vec<(String, Vec<u8>)>, TlsError> {
    let blocks = pem::parse_many(text).map_err(|e| TlsError::Pem(e.to_string()))?;
    Ok(blocks
        .into_iter()
        .map(|b| (b.tag().to_string(), b.into_contents()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trip_and_garbage() {
        for len in 0..20 {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let text = pem_encode("CERTIFICATE", &data);
            assert!(!text.contains('\r'), "LF line endings");
            assert_eq!(
                pem_decode_all(&text).unwrap(),
                vec![("CERTIFICATE".into(), data)]
            );
        }
        let bad = "-----BEGIN CERTIFICATE-----\n@@@@\n-----END CERTIFICATE-----\n";
        assert!(matches!(pem_decode_all(bad), Err(TlsError::Pem(_))));
        let unclosed = "-----BEGIN CERTIFICATE-----\nAAAA\n";
        assert!(pem_decode_all(unclosed).map_or(true, |b| b.is_empty()));
    }

    #[test]
    fn identity_pem_round_trip_and_name_binding() {
        let ca = KernelCa::generate("k1").unwrap();
        let id = ca.issue_identity(7).unwrap();
        let back = NodeIdentity::from_pem(7, &id.to_pem()).unwrap();
        assert_eq!(back.cert, id.cert);
        assert_eq!(back.key_pkcs8, id.key_pkcs8);
        assert!(cert_is_for_node(&id.cert, 7));
        assert!(!cert_is_for_node(&id.cert, 8));
        back.server_config().unwrap();
        back.client_config().unwrap();
    }

    #[test]
    fn public_key_only_signing() {
        let ca = KernelCa::generate("k1").unwrap();
        let key = NodeKey::generate().unwrap();
        let wire = key.public_key().as_bytes().to_vec();
        let cert = ca
            .sign_node_key(3, &NodePublicKey::from_bytes(wire).unwrap())
            .unwrap();
        assert!(cert_is_for_node(&cert, 3));
        assert!(NodePublicKey::from_bytes(vec![1, 2, 3]).is_err());
    }
}
