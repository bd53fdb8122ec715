//! The Jupyter wire protocol: framing, signing and the typed message contents.
//!
//! A message on a ROUTER socket is `[identities.., "<IDS|MSG>", hmac, header,
//! parent_header, metadata, content, buffers..]`. Decoding verifies the
//! signature over the raw frames before any JSON is parsed, so an
//! unauthenticated peer cannot reach the JSON parser with crafted input.

mod header;
mod signer;

pub mod comm;
pub mod complete;
pub mod display;
pub mod error;
pub mod execute;
pub mod history;
pub mod input;
pub mod inspect;
pub mod interrupt;
pub mod is_complete;
pub mod kernel_info;
pub mod shutdown;
pub mod status;
pub mod steer;
pub mod stream;
pub mod subshell;
pub mod sync;

use bytes::Bytes;
use serde::{de::DeserializeOwned, Serialize};
use serde_json::{Map, Value};

pub use header::{now_iso8601, Header, PROTOCOL_VERSION};
pub use signer::{ReplayGuard, Signer};

pub const DELIMITER: &[u8] = b"<IDS|MSG>";

/// Frames larger than this are refused before parsing (a JSON frame of a
/// request is small; buffers may be large but are bounded too).
pub const MAX_JSON_FRAME: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("no <IDS|MSG> delimiter in a {0}-frame message")]
    NoDelimiter(usize),
    #[error("truncated message: {0} frames after the delimiter, need at least 5")]
    Truncated(usize),
    #[error("message has no signature but the session is signed")]
    MissingSignature,
    #[error("message signature does not match")]
    BadSignature,
    #[error("message signature was already seen (replay)")]
    Replay,
    #[error("unsupported signature scheme {0:?} (only hmac-sha256)")]
    UnsupportedScheme(String),
    #[error("unusable signing key")]
    BadKey,
    #[error("{frame} frame is {len} bytes, over the {max}-byte limit")]
    TooLarge {
        frame: &'static str,
        len: usize,
        max: usize,
    },
    #[error("malformed JSON in {frame}: {source}")]
    Json {
        frame: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

/// A decoded message whose content is still untyped JSON; handlers turn it
/// into the typed request with [`Message::content_as`].
#[derive(Debug, Clone)]
pub struct Message {
    pub identities: Vec<Bytes>,
    pub header: Header,
    pub parent_header: Option<Header>,
    pub metadata: Map<String, Value>,
    pub content: Value,
    pub buffers: Vec<Bytes>,
    /// When the kernel read it off the socket (orders it against events
    /// such as a failed cell that aborts what was queued before it).
    pub received: std::time::Instant,
}

impl Message {
    pub fn decode(
        frames: Vec<Bytes>,
        signer: &Signer,
        replay: Option<&mut ReplayGuard>,
    ) -> Result<Self, WireError> {
        let n = frames.len();
        let delim = frames
            .iter()
            .position(|f| f.as_ref() == DELIMITER)
            .ok_or(WireError::NoDelimiter(n))?;
        let rest = &frames[delim + 1..];
        if rest.len() < 5 {
            return Err(WireError::Truncated(rest.len()));
        }
        let names = ["header", "parent_header", "metadata", "content"];
        for (name, frame) in names.iter().zip(&rest[1..5]) {
            if frame.len() > MAX_JSON_FRAME {
                return Err(WireError::TooLarge {
                    frame: name,
                    len: frame.len(),
                    max: MAX_JSON_FRAME,
                });
            }
        }
        let signature = &rest[0];
        signer.verify(signature, [&rest[1], &rest[2], &rest[3], &rest[4]])?;
        if let Some(replay) = replay {
            if signer.is_signing() && !replay.check_and_record(signature) {
                return Err(WireError::Replay);
            }
        }
        let header: Header = parse(&rest[1], "header")?;
        let parent: Value = parse(&rest[2], "parent_header")?;
        let parent_header = match parent {
            Value::Object(ref m) if m.is_empty() => None,
            Value::Null => None,
            other => Some(
                serde_json::from_value(other).map_err(|source| WireError::Json {
                    frame: "parent_header",
                    source,
                })?,
            ),
        };
        let metadata = match parse::<Value>(&rest[3], "metadata")? {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        let content = parse(&rest[4], "content")?;
        Ok(Self {
            identities: frames[..delim].to_vec(),
            header,
            parent_header,
            metadata,
            content,
            buffers: rest[5..].to_vec(),
            received: std::time::Instant::now(),
        })
    }

    pub fn content_as<T: DeserializeOwned>(&self) -> Result<T, WireError> {
        T::deserialize(&self.content).map_err(|source| WireError::Json {
            frame: "content",
            source,
        })
    }
}

/// An outgoing message, built from typed content.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub identities: Vec<Bytes>,
    pub header: Header,
    pub parent_header: Option<Header>,
    pub metadata: Value,
    pub content: Value,
    pub buffers: Vec<Bytes>,
}

impl Outgoing {
    pub fn new(msg_type: &str, session: &str, parent: Option<&Header>, content: Value) -> Self {
        Self {
            identities: Vec::new(),
            header: Header::new(msg_type, session),
            parent_header: parent.cloned(),
            metadata: Value::Object(Map::new()),
            content,
            buffers: Vec::new(),
        }
    }

    /// Builds from a typed content struct; serialisation of our own types
    /// cannot fail, but a failure still yields a well-formed (empty) message.
    pub fn typed<T: Serialize>(
        msg_type: &str,
        session: &str,
        parent: Option<&Header>,
        content: &T,
    ) -> Self {
        let content = serde_json::to_value(content).unwrap_or_else(|e| {
            tracing::error!(msg_type, "cannot serialise content: {e}");
            Value::Object(Map::new())
        });
        Self::new(msg_type, session, parent, content)
    }

    pub fn to(mut self, identities: &[Bytes]) -> Self {
        self.identities = identities.to_vec();
        self
    }

    pub fn with_metadata(mut self, metadata: Value) -> Self {
        self.metadata = metadata;
        self
    }

    pub fn with_buffers(mut self, buffers: Vec<Bytes>) -> Self {
        self.buffers = buffers;
        self
    }

    pub fn encode(&self, signer: &Signer) -> Vec<Bytes> {
        let header = to_bytes(&self.header);
        let parent = match &self.parent_header {
            Some(p) => to_bytes(p),
            None => b"{}".to_vec(),
        };
        let metadata = to_bytes(&self.metadata);
        let content = to_bytes(&self.content);
        let signature = signer.sign([&header, &parent, &metadata, &content]);
        let mut frames = Vec::with_capacity(self.identities.len() + 6 + self.buffers.len());
        frames.extend(self.identities.iter().cloned());
        frames.push(Bytes::from_static(DELIMITER));
        frames.push(Bytes::from(signature.into_bytes()));
        frames.push(Bytes::from(header));
        frames.push(Bytes::from(parent));
        frames.push(Bytes::from(metadata));
        frames.push(Bytes::from(content));
        frames.extend(self.buffers.iter().cloned());
        frames
    }
}

fn parse<T: DeserializeOwned>(frame: &[u8], name: &'static str) -> Result<T, WireError> {
    serde_json::from_slice(frame).map_err(|source| WireError::Json {
        frame: name,
        source,
    })
}

fn to_bytes<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn signer() -> Signer {
        Signer::new("hmac-sha256", b"secret").unwrap()
    }

    fn request(code: &str) -> Vec<Bytes> {
        Outgoing::new("execute_request", "client", None, json!({ "code": code }))
            .to(&[Bytes::from_static(b"peer")])
            .with_buffers(vec![Bytes::from_static(b"buf")])
            .encode(&signer())
    }

    #[test]
    fn round_trip_keeps_identities_content_and_buffers() {
        let mut guard = ReplayGuard::new(16);
        let m = Message::decode(request("1+1"), &signer(), Some(&mut guard)).unwrap();
        assert_eq!(m.identities, vec![Bytes::from_static(b"peer")]);
        assert_eq!(m.header.msg_type, "execute_request");
        assert!(m.parent_header.is_none());
        assert_eq!(m.content["code"], "1+1");
        assert_eq!(m.buffers, vec![Bytes::from_static(b"buf")]);
    }

    #[test]
    fn replayed_message_is_refused() {
        let mut guard = ReplayGuard::new(16);
        let frames = request("x");
        Message::decode(frames.clone(), &signer(), Some(&mut guard)).unwrap();
        assert!(matches!(
            Message::decode(frames, &signer(), Some(&mut guard)),
            Err(WireError::Replay)
        ));
    }

    #[test]
    fn tampered_content_is_refused() {
        let mut frames = request("x");
        let n = frames.len();
        frames[n - 2] = Bytes::from_static(br#"{"code":"import os"}"#);
        assert!(matches!(
            Message::decode(frames, &signer(), None),
            Err(WireError::BadSignature)
        ));
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        let s = signer();
        assert!(matches!(
            Message::decode(vec![Bytes::from_static(b"x")], &s, None),
            Err(WireError::NoDelimiter(1))
        ));
        let frames = vec![Bytes::from_static(DELIMITER), Bytes::new()];
        assert!(matches!(
            Message::decode(frames, &s, None),
            Err(WireError::Truncated(1))
        ));
        // Correctly signed but not JSON.
        let junk: [&[u8]; 4] = [b"{not json", b"{}", b"{}", b"{}"];
        let sig = s.sign(junk);
        let mut frames = vec![Bytes::from_static(DELIMITER), Bytes::from(sig.into_bytes())];
        frames.extend(junk.iter().map(|f| Bytes::copy_from_slice(f)));
        assert!(matches!(
            Message::decode(frames, &s, None),
            Err(WireError::Json {
                frame: "header",
                ..
            })
        ));
    }

    #[test]
    fn invalid_utf8_is_a_json_error() {
        let s = signer();
        let parts: [&[u8]; 4] = [b"{\"msg_id\":\"\xff\"}", b"{}", b"{}", b"{}"];
        let sig = s.sign(parts);
        let mut frames = vec![Bytes::from_static(DELIMITER), Bytes::from(sig.into_bytes())];
        frames.extend(parts.iter().map(|f| Bytes::copy_from_slice(f)));
        assert!(matches!(
            Message::decode(frames, &s, None),
            Err(WireError::Json { .. })
        ));
    }
}
