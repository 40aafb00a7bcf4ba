//! RSA keys of the real gateways, and the one signature they all use: RSASSA-PKCS1-v1_5
//! with SHA-256 (Alipay's "RSA2", WeChat Pay's "SHA256-RSA2048"), base64 encoded.
//! The `rsa` crate reads the key formats; `ring` does the arithmetic (verifying a
//! notification: 29 µs against 215 µs with `rsa`; a signature 0.57 ms against 1.75 ms,
//! `benches/channels.rs`).

use std::sync::Arc;

use base64::Engine;
use rsa::pkcs1::{DecodeRsaPrivateKey, DecodeRsaPublicKey, EncodeRsaPrivateKey, EncodeRsaPublicKey};
use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use rsa::{RsaPrivateKey, RsaPublicKey};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Largest key file read (a 4096-bit PEM key is ~3.3 KiB).
const MAX_KEY_FILE_BYTES: u64 = 64 * 1024;

/// A merchant's private key: signs requests.
#[derive(Clone)]
pub struct PrivateKey(Arc<ring::rsa::KeyPair>);

/// A gateway's public key (PKCS#1 DER): verifies what the gateway signs.
#[derive(Clone)]
pub struct PublicKey(Arc<Vec<u8>>);

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrivateKey(..)") // never the key itself
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PublicKey(..)")
    }
}

impl PrivateKey {
    /// PEM (PKCS#8 `PRIVATE KEY` or PKCS#1 `RSA PRIVATE KEY`), or bare base64 of
    /// either DER form (what Alipay's key tool writes).
    pub fn parse(text: &str) -> Result<PrivateKey, String> {
        let text = text.trim();
        let key = if text.starts_with("-----") {
            RsaPrivateKey::from_pkcs8_pem(text)
                .or_else(|_| RsaPrivateKey::from_pkcs1_pem(text))
                .map_err(|e| format!("not an RSA private key in PEM: {e}"))?
        } else {
            let der = bare_base64(text)?;
            RsaPrivateKey::from_pkcs8_der(&der)
                .or_else(|_| RsaPrivateKey::from_pkcs1_der(&der))
                .map_err(|e| format!("not an RSA private key: {e}"))?
        };
        let der = key.to_pkcs1_der().map_err(|e| format!("RSA private key: {e}"))?;
        let pair = ring::rsa::KeyPair::from_der(der.as_bytes()).map_err(|e| format!("RSA private key: {e}"))?;
        Ok(PrivateKey(Arc::new(pair)))
    }

    /// `base64(SHA256withRSA(message))`.
    pub fn sign(&self, message: &[u8]) -> String {
        let mut signature = vec![0; self.0.public().modulus_len()];
        self.0
            .sign(&ring::signature::RSA_PKCS1_SHA256, &ring::rand::SystemRandom::new(), message, &mut signature)
            .expect("RSA signing with a key ring accepted");
        B64.encode(signature)
    }

    /// [`sign`](Self::sign) on tokio's blocking threads: an RSA-2048 private-key
    /// operation takes on the order of a millisecond of CPU, too long for a thread
    /// that serves requests.
    pub async fn sign_off_thread(&self, message: Vec<u8>) -> String {
        let key = self.clone();
        match tokio::task::spawn_blocking(move || key.sign(&message)).await {
            Ok(signature) => signature,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}

impl PublicKey {
    /// PEM (`PUBLIC KEY` or `RSA PUBLIC KEY`), or bare base64 of the DER.
    pub fn parse(text: &str) -> Result<PublicKey, String> {
        let text = text.trim();
        let key = if text.starts_with("-----") {
            RsaPublicKey::from_public_key_pem(text)
                .or_else(|_| RsaPublicKey::from_pkcs1_pem(text))
                .map_err(|e| format!("not an RSA public key in PEM: {e}"))?
        } else {
            let der = bare_base64(text)?;
            RsaPublicKey::from_public_key_der(&der)
                .or_else(|_| RsaPublicKey::from_pkcs1_der(&der))
                .map_err(|e| format!("not an RSA public key: {e}"))?
        };
        let der = key.to_pkcs1_der().map_err(|e| format!("RSA public key: {e}"))?;
        Ok(PublicKey(Arc::new(der.as_bytes().to_vec())))
    }

    /// Whether `signature_b64` is a SHA256withRSA signature of `message` (keys of
    /// 2048 to 8192 bits).
    pub fn verifies(&self, message: &[u8], signature_b64: &str) -> bool {
        let Ok(signature) = B64.decode(signature_b64.trim()) else { return false };
        let key = ring::signature::UnparsedPublicKey::new(&ring::signature::RSA_PKCS1_2048_8192_SHA256, &**self.0);
        key.verify(message, &signature).is_ok()
    }
}

fn bare_base64(text: &str) -> Result<Vec<u8>, String> {
    let joined: String = text.split_whitespace().collect();
    B64.decode(joined).map_err(|_| "neither PEM nor base64".to_string())
}

/// Reads a key or secret file (bounded), naming it on failure. The contents are
/// never put in the error.
pub fn read_file(path: &str) -> Result<String, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let mut text = String::new();
    file.take(MAX_KEY_FILE_BYTES + 1).read_to_string(&mut text).map_err(|e| format!("cannot read {path}: {e}"))?;
    if text.len() as u64 > MAX_KEY_FILE_BYTES {
        return Err(format!("{path} is larger than {MAX_KEY_FILE_BYTES} bytes"));
    }
    Ok(text)
}

/// A fresh RSA-2048 key pair as PEM (PKCS#8 private, SPKI public): for the
/// simulators, the tests and `kami sandbox-gateway`.
pub fn generate_pem_pair() -> (String, String) {
    let key = RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("RSA key generation");
    let private = key.to_pkcs8_pem(LineEnding::LF).expect("PKCS#8 PEM").to_string();
    let public = key.to_public_key().to_public_key_pem(LineEnding::LF).expect("SPKI PEM");
    (private, public)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_only_for_its_message_and_key() {
        let (private, public) = generate_pem_pair();
        let (_, other_public) = generate_pem_pair();
        let private = PrivateKey::parse(&private).unwrap();
        let sig = private.sign(b"a=1&b=2");
        assert!(PublicKey::parse(&public).unwrap().verifies(b"a=1&b=2", &sig));
        assert!(!PublicKey::parse(&public).unwrap().verifies(b"a=1&b=3", &sig));
        assert!(!PublicKey::parse(&other_public).unwrap().verifies(b"a=1&b=2", &sig));
        assert!(!PublicKey::parse(&public).unwrap().verifies(b"a=1&b=2", "not base64!"));
    }

    #[test]
    fn bare_base64_keys_as_alipay_writes_them_are_read() {
        let (private, public) = generate_pem_pair();
        let strip = |pem: &str| pem.lines().filter(|l| !l.starts_with("-----")).collect::<String>();
        let key = PrivateKey::parse(&strip(&private)).unwrap();
        assert!(PublicKey::parse(&strip(&public)).unwrap().verifies(b"m", &key.sign(b"m")));
        assert!(PrivateKey::parse("garbage").is_err());
        assert!(format!("{key:?}").len() < 20, "Debug never shows the key");
    }
}
