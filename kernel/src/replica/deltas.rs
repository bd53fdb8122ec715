//! Shipping a cell's namespace changes to the other replicas and applying
//! theirs: small deltas inside the log entry, large ones as blobs pushed to
//! every peer before the entry, fetched from any member that kept them.
//!
//! By default the winner replies first and replicates after: its cells'
//! captures go through one ordered queue ([`Outbound`]), each shipped and
//! then committed as a `Synced` once the cell's `Done` is in the log, so the
//! others apply them in the order the cells ran.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use raft_transport::{BlobHash, NodeId};

use super::applier::DeltaRef;
use super::entry::{CellId, Delta, Entry};
use super::{lock, statesync, Core};
use crate::python::PythonError;

/// A cell's packed changes, being captured on the Python thread.
pub(super) type Capture = Pin<Box<dyn Future<Output = Result<Bytes, PythonError>> + Send>>;

/// A delta on its way into the log.
pub(super) struct Shipped {
    pub delta: Delta,
    pub bytes: u64,
    pub pushed_to_all: bool,
}

/// One cell's changes on their way to the others.
pub(super) struct Outbound {
    pub cell: CellId,
    pub captured: Capture,
    /// Whether the cell's `Done` was committed (a `Synced` may follow only then).
    pub committed: tokio::sync::oneshot::Receiver<bool>,
}

/// Delta blobs each replica keeps after applying them.
const RECENT_BLOBS: usize = 4;
const RECENT_BLOB_BYTES: u64 = 512 << 20;

/// Deltas up to this size travel inside the log entry; larger ones as blobs.
const INLINE_DELTA: usize = 64 << 10;

impl Core {
    /// Queues a cell's changes behind the earlier cells'.
    pub(super) fn replicate(&self, out: Outbound) {
        if self.outbound.send(out).is_err() {
            tracing::warn!("replication has stopped; a cell's changes stay on this replica");
        }
    }

    /// Ships queued changes one cell at a time, in the order the cells ran.
    pub(super) async fn replication_loop(
        self: Arc<Self>,
        mut queue: tokio::sync::mpsc::UnboundedReceiver<Outbound>,
    ) {
        while let Some(out) = queue.recv().await {
            let shipped = self.sync_changes(out.captured).await;
            if out.committed.await == Ok(true) {
                let synced = Entry::Synced {
                    cell: out.cell,
                    replica: self.id,
                    delta: shipped.delta.clone(),
                };
                if let Err(e) = self.propose(&synced).await {
                    // The others can no longer lead; Raft's own failure handling follows.
                    tracing::error!(error = %e, "could not commit a cell's changes");
                }
            }
            self.shipped(shipped);
        }
    }

    /// Waits for a cell's capture and ships it; its bytes count as not yet on
    /// a peer until [`Core::shipped`].
    pub(super) async fn sync_changes(self: &Arc<Self>, captured: Capture) -> Shipped {
        let t = std::time::Instant::now();
        let packed = match captured.await {
            Ok(p) => p,
            Err(e) => {
                // Other replicas keep the namespace as before this cell.
                tracing::error!("capturing the namespace changes failed: {e}");
                statesync::pack(b"", &[])
            }
        };
        let captured = t.elapsed();
        let bytes = packed.len() as u64;
        self.unsynced_bytes.fetch_add(bytes, Ordering::Relaxed);
        let (delta, pushed_to_all) = self.ship_delta(packed).await;
        tracing::debug!(bytes, ?captured, shipped = ?(t.elapsed() - captured), "state delta sent");
        Shipped {
            delta,
            bytes,
            pushed_to_all,
        }
    }

    /// The entry holding a shipped delta is committed: a blob every peer got
    /// is dropped here (they hold it now), one a peer missed stays fetchable
    /// among the last few. No replica keeps other copies of a cell's values.
    pub(super) fn shipped(&self, shipped: Shipped) {
        self.unsynced_bytes
            .fetch_sub(shipped.bytes, Ordering::Relaxed);
        self.backlog.leave();
        if let Delta::Blob { hash, len } = shipped.delta {
            if shipped.pushed_to_all {
                self.node.remove_blob(&BlobHash(hash));
            } else {
                self.keep_recent_blob(BlobHash(hash), len);
            }
        }
    }

    /// The delta for the log, and whether every peer got its blob.
    pub(super) async fn ship_delta(self: &Arc<Self>, data: Bytes) -> (Delta, bool) {
        if data.len() <= INLINE_DELTA {
            return (Delta::Inline(data), true);
        }
        let len = data.len() as u64;
        // Kept here too, for a replica that joins mid-way and fetches it; hashing a
        // large delta takes a while, so not on a runtime thread.
        let core = self.clone();
        let mut published = Some(tokio::task::spawn_blocking({
            let data = data.clone();
            move || core.node.publish_blob(data)
        }));
        // A shared-memory blob is offered to peers on this host by its hash: take
        // it once, before the offers, rather than on each side at once.
        let mut hash = None;
        if raft_transport::shm::handle(&data).is_some() {
            if let Some(p) = published.take() {
                hash = p.await.ok();
            }
        }
        // To every other replica at once.
        let mut sends = tokio::task::JoinSet::new();
        for peer in self.members().into_iter().filter(|p| *p != self.id) {
            let (core, data) = (self.clone(), data.clone());
            sends.spawn(async move { (peer, core.node.send_blob(peer, data).await) });
        }
        let mut pushed_to_all = true;
        while let Some(sent) = sends.join_next().await {
            match sent {
                Ok((_, Ok(_))) => {}
                Ok((peer, Err(e))) => {
                    // It fetches from us when it applies the entry, or is replaced.
                    tracing::warn!(peer, error = %e, "could not push a state delta");
                    pushed_to_all = false;
                }
                Err(_) => pushed_to_all = false,
            }
        }
        if let Some(p) = published {
            hash = p.await.ok();
        }
        let hash = hash.unwrap_or_else(|| BlobHash::of(&data));
        (Delta::Blob { hash: hash.0, len }, pushed_to_all)
    }

    /// The bytes of a delta: pushed to us, or fetched from the replica that
    /// made it or, if that one is gone, from any member that kept them. Taken
    /// out of the blob store, so the namespace's arrays can be built on these
    /// very bytes (the only copy here).
    pub(super) async fn delta_bytes(&self, from: NodeId, delta: Delta) -> Option<Bytes> {
        let hash = match delta {
            Delta::Inline(b) => return Some(b),
            Delta::Blob { hash, .. } => BlobHash(hash),
        };
        if let Some(b) = self.node.blob(&hash) {
            self.node.remove_blob(&hash);
            return Some(b);
        }
        let others = self
            .members()
            .into_iter()
            .filter(|p| *p != self.id && *p != from);
        for peer in std::iter::once(from).chain(others) {
            match self.node.fetch_blob(peer, hash).await {
                Ok(b) => return Some(b),
                Err(e) => tracing::warn!(peer, error = %e, "could not fetch a state delta"),
            }
        }
        tracing::error!(from, "state delta unavailable from every member");
        None
    }

    /// Keeps the last few delta blobs fetchable from here (at most
    /// `RECENT_BLOBS`, and past the newest no more than `RECENT_BLOB_BYTES`):
    /// a replica that joins mid-way, or missed a push, may still need one.
    pub(super) fn keep_recent_blob(&self, hash: BlobHash, len: u64) {
        let mut recent = lock(&self.recent_blobs);
        if recent.iter().any(|(h, _)| *h == hash) {
            return;
        }
        recent.push_back((hash, len));
        loop {
            let total: u64 = recent.iter().map(|(_, l)| l).sum();
            if recent.len() <= 1 || (recent.len() <= RECENT_BLOBS && total <= RECENT_BLOB_BYTES) {
                break;
            }
            if let Some((old, _)) = recent.pop_front() {
                self.node.remove_blob(&old);
            }
        }
    }

    pub(super) async fn apply_delta(self: &Arc<Self>, delta: DeltaRef) {
        let t = std::time::Instant::now();
        let applied = match self.delta_bytes(delta.from, delta.delta).await {
            Some(data) => statesync::apply_delta(&self.exec, data)
                .await
                .map_err(|e| e.to_string()),
            None => Err("delta unavailable".into()),
        };
        tracing::debug!(elapsed = ?t.elapsed(), index = delta.index, "state delta applied");
        if let Err(e) = applied {
            tracing::error!("applying a state delta failed ({e}); this replica leaves the group");
            self.leave();
        }
    }
}
