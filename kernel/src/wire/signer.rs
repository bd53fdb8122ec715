//! HMAC signing of the four JSON frames, and replay detection.

use std::collections::{HashSet, VecDeque};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::WireError;

type HmacSha256 = Hmac<Sha256>;

/// Signs and verifies messages with the connection file's key.
///
/// An empty key means the connection file asked for no authentication; then
/// the signature frame is empty and not checked, as in jupyter_client.
#[derive(Clone)]
pub struct Signer {
    mac: Option<HmacSha256>,
}

impl std::fmt::Debug for Signer {
    // The key is a secret: never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("signing", &self.mac.is_some())
            .finish()
    }
}

impl Signer {
    pub fn new(scheme: &str, key: &[u8]) -> Result<Self, WireError> {
        if key.is_empty() {
            return Ok(Self { mac: None });
        }
        if scheme != "hmac-sha256" {
            return Err(WireError::UnsupportedScheme(scheme.to_owned()));
        }
        let mac = HmacSha256::new_from_slice(key).map_err(|_| WireError::BadKey)?;
        Ok(Self { mac: Some(mac) })
    }

    pub fn is_signing(&self) -> bool {
        self.mac.is_some()
    }

    pub fn sign(&self, parts: [&[u8]; 4]) -> String {
        match &self.mac {
            None => String::new(),
            Some(mac) => {
                let mut mac = mac.clone();
                for p in parts {
                    mac.update(p);
                }
                hex(&mac.finalize().into_bytes())
            }
        }
    }

    /// Constant-time check of a hex signature against the four frames.
    pub fn verify(&self, signature: &[u8], parts: [&[u8]; 4]) -> Result<(), WireError> {
        let Some(mac) = &self.mac else {
            return Ok(());
        };
        if signature.is_empty() {
            return Err(WireError::MissingSignature);
        }
        let raw = unhex(signature).ok_or(WireError::BadSignature)?;
        let mut mac = mac.clone();
        for p in parts {
            mac.update(p);
        }
        mac.verify_slice(&raw).map_err(|_| WireError::BadSignature)
    }
}

/// Remembers recent signatures so a captured message cannot be replayed,
/// bounded like jupyter_client's digest history (2^16). Each is kept as the
/// SHA-256 of its text, 32 bytes, whatever the signature's length.
#[derive(Debug)]
pub struct ReplayGuard {
    seen: HashSet<[u8; 32]>,
    order: VecDeque<[u8; 32]>,
    capacity: usize,
}

impl ReplayGuard {
    pub fn new(capacity: usize) -> Self {
        Self {
            seen: HashSet::with_capacity(capacity.min(1 << 16)),
            order: VecDeque::with_capacity(capacity.min(1 << 16)),
            capacity,
        }
    }

    /// Records a signature; false if it was already seen.
    pub fn check_and_record(&mut self, signature: &[u8]) -> bool {
        if signature.is_empty() {
            return true;
        }
        let key: [u8; 32] = Sha256::digest(signature).into();
        if !self.seen.insert(key) {
            return false;
        }
        self.order.push_back(key);
        if self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        true
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
    s
}

fn unhex(s: &[u8]) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    s.chunks(2)
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARTS: [&[u8]; 4] = [b"{\"h\":1}", b"{}", b"{}", b"{\"code\":\"1\"}"];

    #[test]
    fn signature_matches_python_hmac() {
        // python3 -c "import hmac,hashlib;print(hmac.new(b'key',b'{\"h\":1}{}{}{\"code\":\"1\"}',hashlib.sha256).hexdigest())"
        let s = Signer::new("hmac-sha256", b"key").unwrap();
        assert_eq!(
            s.sign(PARTS),
            "5d9e358f747a2d6c267355fdcd7c240498d6cffd6dc8be8621044e171885aea9"
        );
        let sig = s.sign(PARTS);
        assert_eq!(sig.len(), 64);
        assert!(s.verify(sig.as_bytes(), PARTS).is_ok());
    }

    #[test]
    fn tampered_or_missing_signatures_fail() {
        let s = Signer::new("hmac-sha256", b"key").unwrap();
        let mut sig = s.sign(PARTS).into_bytes();
        sig[0] = if sig[0] == b'0' { b'1' } else { b'0' };
        assert!(matches!(
            s.verify(&sig, PARTS),
            Err(WireError::BadSignature)
        ));
        assert!(matches!(
            s.verify(b"", PARTS),
            Err(WireError::MissingSignature)
        ));
        assert!(matches!(
            s.verify(b"zz", PARTS),
            Err(WireError::BadSignature)
        ));
        let other = Signer::new("hmac-sha256", b"other").unwrap();
        assert!(other.verify(s.sign(PARTS).as_bytes(), PARTS).is_err());
    }

    #[test]
    fn empty_key_disables_signing() {
        let s = Signer::new("hmac-sha256", b"").unwrap();
        assert_eq!(s.sign(PARTS), "");
        assert!(s.verify(b"", PARTS).is_ok());
    }

    #[test]
    fn unknown_scheme_is_refused() {
        assert!(matches!(
            Signer::new("hmac-md5", b"k"),
            Err(WireError::UnsupportedScheme(_))
        ));
    }

    #[test]
    fn replays_are_detected_and_history_is_bounded() {
        let mut g = ReplayGuard::new(2);
        assert!(g.check_and_record(b"a"));
        assert!(!g.check_and_record(b"a"));
        assert!(g.check_and_record(b"b"));
        assert!(g.check_and_record(b"c"));
        // "a" fell out of the bounded history.
        assert!(g.check_and_record(b"a"));
        assert!(g.seen.len() <= 2);
    }
}
