//! Content-addressed blobs on their own QUIC streams.
//!
//! Each blob travels on a fresh bidirectional stream, never on a Raft RPC stream, so the
//! only thing it shares with heartbeats is the congestion window, and Raft streams are
//! sent at a higher priority. Back-pressure is QUIC's own flow control: the sender's
//! writes wait while the receiver's stream window is full, and the receiver reads only as
//! fast as it can store. A blob is named by the SHA-256 of its content.
//!
//! ```text
//! PutBlob: [ver][5][len u64][bytes …][sha256 32B]  ->  [status u8]
//! GetBlob: [ver][6][sha256 32B]                    ->  [status u8][len u64][bytes …]
//! ```
//!
//! The hash of a pushed blob is a trailer, so the sender hashes while it sends and a
//! 1 GiB blob is not read twice before the first byte leaves.
//!
//! A peer on this host (a loopback address) is first offered a sealed shared-memory
//! blob ([`crate::shm`]) by its handle, and maps it instead of receiving a copy:
//!
//! ```text
//! PutShared: [ver][9][shm handle 32B][sha256 32B]  ->  [status u8]
//! ```
//!
//! If it cannot map it (another pid namespace, say), the bytes follow on a `PutBlob`.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::connection::Transport;
use crate::error::{Error, Result};
use crate::rpc::{self, StreamKind, WireError};
use crate::types::NodeId;

/// Chunk size for writes: large enough to amortise per-call overhead, small enough that
/// flow-control waits are fine-grained.
const CHUNK: usize = 1 << 20;

/// Most a receiver allocates before the data has actually arrived.
const INITIAL_CAPACITY: usize = 64 << 20;

const STATUS_MISMATCH: u8 = 2;
const STATUS_TOO_LARGE: u8 = 3;
const STATUS_NOT_FOUND: u8 = 4;
const STATUS_UNMAPPABLE: u8 = 5;

/// SHA-256 of a blob's content.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobHash(pub [u8; 32]);

impl BlobHash {
    pub fn of(data: &[u8]) -> Self {
        Self(Sha256::digest(data).into())
    }
}

impl fmt::Display for BlobHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for BlobHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobHash({self})")
    }
}

/// Blobs received from peers or published locally, in memory.
#[derive(Default)]
pub struct BlobStore {
    blobs: Mutex<HashMap<BlobHash, Bytes>>,
    added: tokio::sync::Notify,
}

impl BlobStore {
    pub fn insert(&self, data: Bytes) -> BlobHash {
        let hash = crate::shm::sealed_hash(&data).unwrap_or_else(|| BlobHash::of(&data));
        self.insert_verified(hash, data);
        hash
    }

    fn insert_verified(&self, hash: BlobHash, data: Bytes) {
        self.blobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(hash, data);
        self.added.notify_waiters();
    }

    pub fn get(&self, hash: &BlobHash) -> Option<Bytes> {
        self.blobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(hash)
            .cloned()
    }

    pub fn remove(&self, hash: &BlobHash) -> Option<Bytes> {
        self.blobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(hash)
    }

    /// Waits until `hash` is present (e.g. a peer is pushing it to us).
    pub async fn wait_for(&self, hash: &BlobHash) -> Bytes {
        loop {
            let added = self.added.notified();
            if let Some(b) = self.get(hash) {
                return b;
            }
            added.await;
        }
    }
}

/// Below this size a blob is hashed inline; above it on a blocking thread, in parallel
/// with the transfer, so that SHA-256 does not cap the stream's throughput.
const HASH_OFFLOAD: usize = 4 << 20;

/// Hashes chunks as they arrive, on the caller's task or on a blocking thread.
enum StreamingHasher {
    Inline(Sha256),
    Offloaded {
        tx: std::sync::mpsc::Sender<Bytes>,
        done: tokio::task::JoinHandle<BlobHash>,
    },
}

impl StreamingHasher {
    fn new(expected_len: usize) -> Self {
        if expected_len < HASH_OFFLOAD {
            return Self::Inline(Sha256::new());
        }
        let (tx, rx) = std::sync::mpsc::channel::<Bytes>();
        let done = tokio::task::spawn_blocking(move || {
            let mut h = Sha256::new();
            for chunk in rx {
                h.update(&chunk);
            }
            BlobHash(h.finalize().into())
        });
        Self::Offloaded { tx, done }
    }

    fn update(&mut self, chunk: &Bytes) {
        match self {
            Self::Inline(h) => h.update(chunk),
            // The receiver only goes away if the hashing thread panicked; finish() reports it.
            Self::Offloaded { tx, .. } => {
                let _ = tx.send(chunk.clone());
            }
        }
    }

    async fn finish(self) -> Option<BlobHash> {
        match self {
            Self::Inline(h) => Some(BlobHash(h.finalize().into())),
            Self::Offloaded { tx, done } => {
                drop(tx);
                done.await.ok()
            }
        }
    }
}

/// Reads `[len u64][bytes]`, refusing lengths above `max`; hashes the bytes if asked.
pub(crate) async fn read_sized(
    recv: &mut quinn::RecvStream,
    max: u64,
    hash: bool,
) -> Result<(Vec<u8>, Option<BlobHash>), WireError> {
    let mut len = [0u8; 8];
    recv.read_exact(&mut len).await?;
    let len = u64::from_le_bytes(len);
    if len > max {
        return Err(WireError::TooLarge(len));
    }
    let len = len as usize;
    let mut hasher = hash.then(|| StreamingHasher::new(len));
    // Grow with the data rather than trusting the declared length up front; large
    // reallocations are remaps, not copies.
    let mut data = Vec::with_capacity(len.min(INITIAL_CAPACITY));
    while data.len() < len {
        let Some(chunk) = recv.read_chunk(len - data.len(), true).await? else {
            return Err(WireError::Read(quinn::ReadExactError::FinishedEarly(
                data.len(),
            )));
        };
        if let Some(h) = hasher.as_mut() {
            h.update(&chunk.bytes);
        }
        data.extend_from_slice(&chunk.bytes);
    }
    let digest = match hasher {
        Some(h) => Some(
            h.finish()
                .await
                .ok_or(WireError::Remote("hashing failed".into()))?,
        ),
        None => None,
    };
    Ok((data, digest))
}

/// Writes `[len u64][bytes]` in chunks without copying.
async fn write_sized(send: &mut quinn::SendStream, data: &Bytes) -> Result<(), WireError> {
    send.write_all(&(data.len() as u64).to_le_bytes()).await?;
    let mut off = 0;
    while off < data.len() {
        let end = (off + CHUNK).min(data.len());
        send.write_chunk(data.slice(off..end)).await?;
        off = end;
    }
    Ok(())
}

fn wire(peer: NodeId) -> impl Fn(WireError) -> Error {
    move |e| match e {
        WireError::Remote(reason) => Error::Protocol { peer, reason },
        other => Error::Unreachable {
            peer,
            reason: other.to_string(),
        },
    }
}

/// Pushes `data` to `peer`; returns its hash once the peer has verified and stored it
/// (or, for a shared-memory blob and a peer on this host, mapped it).
pub(crate) async fn send_blob(
    transport: &Arc<Transport>,
    peer: NodeId,
    addr: &str,
    data: Bytes,
) -> Result<BlobHash> {
    let on_this_host = addr
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|a| a.ip().is_loopback());
    if let Some(handle) = crate::shm::handle(&data).filter(|_| on_this_host) {
        match offer_shared(transport, peer, addr, handle, &data).await {
            Ok(Some(hash)) => return Ok(hash),
            Ok(None) => tracing::debug!(peer, "peer could not map a shared blob; sending a copy"),
            Err(e) => return Err(e),
        }
    }
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (send, recv, conn) = transport.open_bi(peer, addr).await?;
        match put_once(peer, send, recv, &data).await {
            // The connection lost a duplicate-dial tie-break under us: once more.
            Err(_) if attempt < 2 && transport.retry_after_failure(peer, &conn) => continue,
            other => return other,
        }
    }
}

/// Offers a sealed blob by handle: its hash once the peer mapped it, `None` if it could not.
async fn offer_shared(
    transport: &Arc<Transport>,
    peer: NodeId,
    addr: &str,
    handle: crate::shm::Handle,
    data: &Bytes,
) -> Result<Option<BlobHash>> {
    let hash = {
        let data = data.clone();
        tokio::task::spawn_blocking(move || {
            crate::shm::sealed_hash(&data).unwrap_or_else(|| BlobHash::of(&data))
        })
        .await
        .map_err(|_| Error::Protocol {
            peer,
            reason: "hashing failed".into(),
        })?
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (mut send, mut recv, conn) = transport.open_bi(peer, addr).await?;
        let exchange = async {
            let mut req = rpc::header(StreamKind::PutShared).to_vec();
            req.extend_from_slice(&handle.encode());
            req.extend_from_slice(&hash.0);
            send.write_all(&req).await?;
            send.finish()?;
            let mut status = [0u8; 1];
            recv.read_exact(&mut status).await?;
            Ok::<u8, WireError>(status[0])
        };
        match exchange.await {
            Ok(rpc::STATUS_OK) => return Ok(Some(hash)),
            Ok(_) => return Ok(None),
            Err(_) if attempt < 2 && transport.retry_after_failure(peer, &conn) => continue,
            Err(e) => return Err(wire(peer)(e)),
        }
    }
}

async fn put_once(
    peer: NodeId,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    data: &Bytes,
) -> Result<BlobHash> {
    let _ = send.set_priority(-1);
    // Hash on another thread while the bytes are on their way; the hash is the trailer.
    let mut hasher = StreamingHasher::new(data.len());
    hasher.update(data);
    let written = async {
        send.write_all(&rpc::header(StreamKind::PutBlob)).await?;
        write_sized(&mut send, data).await?;
        let hash = hasher
            .finish()
            .await
            .ok_or(WireError::Remote("hashing failed".into()))?;
        send.write_all(&hash.0).await?;
        send.finish()?;
        Ok(hash)
    }
    .await;
    let (status, hash) = answer(peer, written, &mut recv).await?;
    match status {
        rpc::STATUS_OK => hash.ok_or(Error::Protocol {
            peer,
            reason: "blob accepted before it was sent".into(),
        }),
        STATUS_MISMATCH => Err(Error::BlobHashMismatch),
        STATUS_TOO_LARGE => Err(Error::BlobTooLarge {
            size: data.len() as u64,
            limit: 0,
        }),
        s => Err(Error::Protocol {
            peer,
            reason: format!("blob refused with status {s}"),
        }),
    }
}

/// The peer's one-byte answer to a request. A peer that refuses a request
/// part-way (too large) stops our stream and answers at once, so our write
/// may fail first: after a failed write the answer is read all the same, and
/// the write's error stands only when no answer comes.
async fn answer<T>(
    peer: NodeId,
    written: Result<T, WireError>,
    recv: &mut quinn::RecvStream,
) -> Result<(u8, Option<T>)> {
    // Only a stream the peer stopped can have an answer waiting.
    let written = match written {
        Err(e) if !matches!(e, WireError::Write(_) | WireError::Closed(_)) => {
            return Err(wire(peer)(e))
        }
        other => other,
    };
    let mut status = [0u8; 1];
    match (recv.read_exact(&mut status).await, written) {
        (Ok(()), written) => Ok((status[0], written.ok())),
        (Err(_), Err(e)) => Err(wire(peer)(e)),
        (Err(e), Ok(_)) => Err(wire(peer)(e.into())),
    }
}

/// Delivers `data` to `peer`'s mailbox; returns once the peer's application has
/// handled it (see [`crate::mailbox`]). Messages one task sends to one peer
/// arrive in the order sent.
pub(crate) async fn send_message(
    transport: &Arc<Transport>,
    peer: NodeId,
    addr: &str,
    data: Bytes,
) -> Result<()> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (send, recv, conn) = transport.open_bi(peer, addr).await?;
        match message_once(peer, send, recv, &data).await {
            Err(_) if attempt < 2 && transport.retry_after_failure(peer, &conn) => continue,
            other => return other,
        }
    }
}

async fn message_once(
    peer: NodeId,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    data: &Bytes,
) -> Result<()> {
    let written = async {
        send.write_all(&rpc::header(StreamKind::Message)).await?;
        write_sized(&mut send, data).await?;
        send.finish()?;
        Ok(())
    }
    .await;
    match answer(peer, written, &mut recv).await?.0 {
        rpc::STATUS_OK => Ok(()),
        STATUS_TOO_LARGE => Err(Error::BlobTooLarge {
            size: data.len() as u64,
            limit: 0,
        }),
        s => Err(Error::Protocol {
            peer,
            reason: format!("message refused with status {s}"),
        }),
    }
}

/// Stops reading a stream whose length is over the limit and tells its sender.
async fn refuse_oversized(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) -> Result<(), WireError> {
    let _ = recv.stop(0u32.into());
    send.write_all(&[STATUS_TOO_LARGE]).await?;
    send.finish()?;
    Ok(())
}

pub(crate) async fn serve_message(
    transport: &Arc<Transport>,
    peer: NodeId,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<(), WireError> {
    let data = {
        let Ok(_permit) = transport.blob_streams.clone().acquire_owned().await else {
            return Ok(());
        };
        match read_sized(&mut recv, transport.max_blob_size, false).await {
            Ok((d, _)) => d,
            Err(WireError::TooLarge(n)) => {
                tracing::warn!(peer, bytes = n, "refusing oversized message");
                return refuse_oversized(&mut send, &mut recv).await;
            }
            Err(e) => return Err(e),
        }
    };
    // Waiting here pushes back on the sender until the application has
    // handled the message; the stream permit is not held meanwhile.
    let (message, handled) = crate::Message::new(peer, Bytes::from(data));
    let status = match transport.inbox.send(message).await {
        Ok(()) => {
            let _ = handled.await;
            rpc::STATUS_OK
        }
        Err(_) => rpc::STATUS_ERR,
    };
    send.write_all(&[status]).await?;
    send.finish()?;
    Ok(())
}

/// Fetches the blob named `hash` from `peer` and checks its content.
pub(crate) async fn fetch_blob(
    transport: &Arc<Transport>,
    peer: NodeId,
    addr: &str,
    hash: BlobHash,
) -> Result<Bytes> {
    let max = transport.max_blob_size;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (send, recv, conn) = transport.open_bi(peer, addr).await?;
        match get_once(peer, send, recv, hash, max).await {
            Err(_) if attempt < 2 && transport.retry_after_failure(peer, &conn) => continue,
            other => return other,
        }
    }
}

async fn get_once(
    peer: NodeId,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    hash: BlobHash,
    max: u64,
) -> Result<Bytes> {
    let mut req = rpc::header(StreamKind::GetBlob).to_vec();
    req.extend_from_slice(&hash.0);
    send.write_all(&req)
        .await
        .map_err(|e| wire(peer)(e.into()))?;
    send.finish().map_err(|e| wire(peer)(e.into()))?;
    let mut status = [0u8; 1];
    recv.read_exact(&mut status)
        .await
        .map_err(|e| wire(peer)(e.into()))?;
    match status[0] {
        rpc::STATUS_OK => {}
        STATUS_NOT_FOUND => return Err(Error::BlobNotFound(hash)),
        s => {
            return Err(Error::Protocol {
                peer,
                reason: format!("fetch refused with status {s}"),
            })
        }
    }
    let (data, got) = read_sized(&mut recv, max, true).await.map_err(wire(peer))?;
    if got != Some(hash) {
        return Err(Error::BlobHashMismatch);
    }
    Ok(Bytes::from(data))
}

pub(crate) async fn serve_put(
    transport: &Arc<Transport>,
    peer: NodeId,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<(), WireError> {
    // Bounding concurrent blob streams bounds memory; a waiting stream is not read, so
    // its sender stalls on flow control: back-pressure all the way to the producer.
    let Ok(_permit) = transport.blob_streams.clone().acquire_owned().await else {
        return Ok(());
    };
    let (data, hash) = match read_sized(&mut recv, transport.max_blob_size, true).await {
        Ok((d, Some(h))) => (d, h),
        Ok((_, None)) => return Err(WireError::Remote("hashing failed".into())),
        Err(WireError::TooLarge(n)) => {
            tracing::warn!(peer, bytes = n, "refusing oversized blob");
            return refuse_oversized(&mut send, &mut recv).await;
        }
        Err(e) => return Err(e),
    };
    let mut claimed = [0u8; 32];
    recv.read_exact(&mut claimed).await?;
    if hash.0 != claimed {
        tracing::warn!(peer, "blob hash mismatch");
        send.write_all(&[STATUS_MISMATCH]).await?;
    } else {
        tracing::debug!(peer, %hash, bytes = data.len(), "stored blob");
        transport.blobs.insert_verified(hash, Bytes::from(data));
        send.write_all(&[rpc::STATUS_OK]).await?;
    }
    send.finish()?;
    Ok(())
}

/// Maps a blob that a peer on this host offers by handle (see [`crate::shm`]).
pub(crate) async fn serve_put_shared(
    transport: &Arc<Transport>,
    peer: NodeId,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<(), WireError> {
    let mut raw = [0u8; crate::shm::Handle::WIRE_LEN];
    recv.read_exact(&mut raw).await?;
    let mut hash = [0u8; 32];
    recv.read_exact(&mut hash).await?;
    let handle = crate::shm::Handle::decode(&raw);
    let status = if handle.len > transport.max_blob_size {
        STATUS_TOO_LARGE
    } else {
        // The content is sealed: its hash was taken by the maker over these very pages.
        match tokio::task::spawn_blocking(move || crate::shm::open_private(&handle)).await {
            Ok(Ok(data)) => {
                tracing::debug!(peer, ?handle, "mapped a shared blob");
                transport.blobs.insert_verified(BlobHash(hash), data);
                rpc::STATUS_OK
            }
            Ok(Err(e)) => {
                tracing::debug!(peer, ?handle, error = %e, "cannot map a shared blob");
                STATUS_UNMAPPABLE
            }
            Err(_) => STATUS_UNMAPPABLE,
        }
    };
    send.write_all(&[status]).await?;
    send.finish()?;
    Ok(())
}

pub(crate) async fn serve_get(
    transport: &Arc<Transport>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<(), WireError> {
    let mut hash = [0u8; 32];
    recv.read_exact(&mut hash).await?;
    let _ = send.set_priority(-1);
    match transport.blobs.get(&BlobHash(hash)) {
        Some(data) => {
            send.write_all(&[rpc::STATUS_OK]).await?;
            write_sized(&mut send, &data).await?;
        }
        None => send.write_all(&[STATUS_NOT_FOUND]).await?,
    }
    send.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_display_is_hex() {
        let h = BlobHash::of(b"abc");
        assert_eq!(
            h.to_string(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[tokio::test]
    async fn store_wait_for() {
        let store = Arc::new(BlobStore::default());
        let h = BlobHash::of(b"x");
        let s2 = store.clone();
        let waiter = tokio::spawn(async move { s2.wait_for(&h).await });
        tokio::task::yield_now().await;
        assert_eq!(store.insert(Bytes::from_static(b"x")), h);
        assert_eq!(&waiter.await.unwrap()[..], b"x");
    }
}
