//! Wire format of the QUIC streams.
//!
//! Every exchange (one Raft RPC, one snapshot, one blob) uses its own bidirectional
//! stream, so the stream boundary frames the request and QUIC gives per-stream flow control
//! and no head-of-line blocking between exchanges. A stream starts with a two-byte header:
//!
//! ```text
//! request : [version u8][kind u8] kind-specific body …            (then FIN)
//! RPC body: [len u32 LE][postcard bytes]
//! response: [status u8][len u32 LE][postcard bytes | utf-8 error]  (then FIN)
//! ```
//!
//! Bodies are postcard: a compact, non-self-describing serde format (varint integers, raw
//! byte strings), so an append-entries RPC with 100-byte entries costs little more than
//! the entries themselves, and it is actively maintained (unlike bincode). JSON would
//! triple the size of binary payloads. Lengths are explicit so that a reader can bound its
//! allocation before reading anything a peer sent.

use serde::de::DeserializeOwned;
use serde::Serialize;

pub(crate) const VERSION: u8 = 1;

/// Largest RPC body we accept (a full batch of log entries).
pub(crate) const MAX_RPC_BODY: usize = 256 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum StreamKind {
    /// First stream of a connection: the dialer's node id (checked against its cert).
    Hello = 1,
    AppendEntries = 2,
    Vote = 3,
    /// A whole snapshot: metadata message, then `[len u64][bytes]`.
    Snapshot = 4,
    /// Push a blob: `[sha256 32B][len u64][bytes]`, answered by one status byte.
    PutBlob = 5,
    /// Fetch a blob: `[sha256 32B]`, answered by `[status][len u64][bytes]`.
    GetBlob = 6,
    /// A follower forwards a client proposal to the leader: body `Vec<u8>`, answered by
    /// [`ForwardReply`].
    Forward = 7,
    /// A mailbox message: `[len u64][bytes]`, answered by one status byte once it is
    /// queued for the application (see [`crate::ReplicaNode::send_message`]).
    Message = 8,
    /// Offer a blob in shared memory to a peer on the same host: `[shm handle][sha256 32B]`,
    /// answered by one status byte (`STATUS_OK` once the peer has mapped it).
    PutShared = 9,
}

/// The leader's answer to a forwarded proposal.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) enum ForwardReply {
    Committed { index: u64, term: u64 },
    NotLeader { leader: Option<u64> },
    Failed(String),
}

impl StreamKind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Hello,
            2 => Self::AppendEntries,
            3 => Self::Vote,
            4 => Self::Snapshot,
            5 => Self::PutBlob,
            6 => Self::GetBlob,
            7 => Self::Forward,
            8 => Self::Message,
            9 => Self::PutShared,
            _ => return None,
        })
    }
}

pub(crate) const STATUS_OK: u8 = 0;
pub(crate) const STATUS_ERR: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("read: {0}")]
    Read(#[from] quinn::ReadExactError),
    #[error("read: {0}")]
    ReadStream(#[from] quinn::ReadError),
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("stream closed: {0}")]
    Closed(#[from] quinn::ClosedStream),
    #[error("decode: {0}")]
    Decode(#[from] postcard::Error),
    #[error("unsupported protocol version {0}")]
    Version(u8),
    #[error("unknown stream kind {0}")]
    Kind(u8),
    #[error("message of {0} bytes is too large")]
    TooLarge(u64),
    #[error("remote error: {0}")]
    Remote(String),
}

/// Header + one postcard message in a single write, so a small RPC is one packet.
pub(crate) fn encode_request<T: Serialize>(
    kind: StreamKind,
    msg: &T,
) -> Result<Vec<u8>, WireError> {
    let mut buf = vec![VERSION, kind as u8];
    buf.extend_from_slice(&encode_msg(msg)?);
    Ok(buf)
}

pub(crate) fn header(kind: StreamKind) -> [u8; 2] {
    [VERSION, kind as u8]
}

pub(crate) async fn read_header(recv: &mut quinn::RecvStream) -> Result<StreamKind, WireError> {
    let mut h = [0u8; 2];
    recv.read_exact(&mut h).await?;
    parse_header(h)
}

fn parse_header(h: [u8; 2]) -> Result<StreamKind, WireError> {
    if h[0] != VERSION {
        return Err(WireError::Version(h[0]));
    }
    StreamKind::from_u8(h[1]).ok_or(WireError::Kind(h[1]))
}

fn body_len(len: [u8; 4]) -> Result<usize, WireError> {
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_RPC_BODY {
        return Err(WireError::TooLarge(len as u64));
    }
    Ok(len)
}

/// Reads `[len u32][postcard]`.
pub(crate) async fn read_msg<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
) -> Result<T, WireError> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await?;
    let mut body = vec![0u8; body_len(len)?];
    recv.read_exact(&mut body).await?;
    Ok(postcard::from_bytes(&body)?)
}

/// What a server decodes from a request stream (`[version][kind][len
/// u32][postcard]`), from a buffer: the same checks and types, for the fuzz
/// target. Blob and mailbox streams carry raw bytes and decode nothing.
#[doc(hidden)]
pub fn decode_request(data: &[u8]) -> Result<(), WireError> {
    use crate::types::{NodeId, SnapshotMeta, TypeConfig, Vote};
    use openraft::raft::{AppendEntriesRequest, VoteRequest};
    let (h, rest) = data.split_first_chunk::<2>().ok_or(WireError::Kind(0))?;
    let kind = parse_header(*h)?;
    let (len, body) = rest
        .split_first_chunk::<4>()
        .ok_or(WireError::TooLarge(0))?;
    let body = body.get(..body_len(*len)?).ok_or(WireError::TooLarge(0))?;
    match kind {
        StreamKind::AppendEntries => {
            postcard::from_bytes::<AppendEntriesRequest<TypeConfig>>(body)?;
        }
        StreamKind::Vote => {
            postcard::from_bytes::<VoteRequest<NodeId>>(body)?;
        }
        StreamKind::Snapshot => {
            postcard::from_bytes::<(Vote, SnapshotMeta)>(body)?;
        }
        StreamKind::Forward => {
            postcard::from_bytes::<Vec<u8>>(body)?;
        }
        StreamKind::Hello
        | StreamKind::PutBlob
        | StreamKind::PutShared
        | StreamKind::GetBlob
        | StreamKind::Message => {}
    }
    Ok(())
}

pub(crate) fn encode_msg<T: Serialize>(msg: &T) -> Result<Vec<u8>, WireError> {
    let body = postcard::to_stdvec(msg)?;
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(&body);
    Ok(buf)
}

/// Writes a response (status + body) and finishes the stream.
pub(crate) async fn write_response<T: Serialize>(
    send: &mut quinn::SendStream,
    result: Result<&T, String>,
) -> Result<(), WireError> {
    let buf = match result {
        Ok(msg) => {
            let mut buf = vec![STATUS_OK];
            buf.extend_from_slice(&encode_msg(msg)?);
            buf
        }
        Err(text) => {
            let mut buf = vec![STATUS_ERR];
            buf.extend_from_slice(&(text.len() as u32).to_le_bytes());
            buf.extend_from_slice(text.as_bytes());
            buf
        }
    };
    send.write_all(&buf).await?;
    send.finish()?;
    Ok(())
}

pub(crate) async fn read_response<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
) -> Result<T, WireError> {
    let mut status = [0u8; 1];
    recv.read_exact(&mut status).await?;
    match status[0] {
        STATUS_OK => read_msg(recv).await,
        _ => {
            let mut len = [0u8; 4];
            recv.read_exact(&mut len).await?;
            let len = (u32::from_le_bytes(len) as usize).min(64 << 10);
            let mut text = vec![0u8; len];
            recv.read_exact(&mut text).await?;
            Err(WireError::Remote(
                String::from_utf8_lossy(&text).into_owned(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Entry, LogId};

    #[test]
    fn request_framing() {
        let entries: Vec<Entry> = (1..=3)
            .map(|i| Entry {
                log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), i),
                payload: openraft::EntryPayload::Normal(vec![i as u8; 100]),
            })
            .collect();
        let buf = encode_request(StreamKind::AppendEntries, &entries).unwrap();
        assert_eq!(&buf[..2], &[VERSION, StreamKind::AppendEntries as u8]);
        let len = u32::from_le_bytes(buf[2..6].try_into().unwrap()) as usize;
        assert_eq!(len, buf.len() - 6);
        let back: Vec<Entry> = postcard::from_bytes(&buf[6..]).unwrap();
        assert_eq!(back, entries);
        // Compact: three 100-byte payloads plus a few bytes of ids each.
        assert!(buf.len() < 3 * 100 + 64, "{} bytes", buf.len());
    }

    #[test]
    fn kinds_round_trip() {
        for k in 1..=9u8 {
            assert_eq!(StreamKind::from_u8(k).map(|k| k as u8), Some(k));
        }
        assert!(StreamKind::from_u8(0).is_none());
        assert!(StreamKind::from_u8(10).is_none());
    }
}
