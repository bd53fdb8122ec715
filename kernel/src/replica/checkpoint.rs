//! A joiner's catch-up: restore the checkpoint the leader pushed, then replay
//! the deltas committed after the log index it includes.

use std::sync::Arc;

use raft_transport::BlobHash;

use super::applier::{CheckpointRef, DeltaRef};
use super::entry::Entry;
use super::{lock, statesync, Core};

impl Core {
    /// Tells the group this replica's namespace is whole (see `Entry::Restored`).
    pub(super) async fn announce_restored(self: Arc<Self>) {
        if let Err(e) = self.propose(&Entry::Restored { replica: self.id }).await {
            tracing::warn!(error = %e, "could not announce the restored checkpoint; will retry");
        }
    }

    /// Restored here but not yet in the log (an announcement was lost).
    pub(super) fn restored_unannounced(&self) -> bool {
        self.restored.load(std::sync::atomic::Ordering::Acquire)
            && lock(&self.applier).state().restoring.contains(&self.id)
    }

    pub(super) async fn restore_from(
        self: &Arc<Self>,
        checkpoint: CheckpointRef,
        replay: Vec<DeltaRef>,
    ) {
        let hash = BlobHash(checkpoint.blob);
        let data = match self.node.remove_blob(&hash) {
            Some(d) => Ok(d),
            None => self
                .node
                .fetch_blob(checkpoint.from, hash)
                .await
                .map_err(|e| e.to_string()),
        };
        let restored = match data {
            Ok(d) => statesync::restore_checkpoint(&self.exec, d)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        if let Err(e) = restored {
            tracing::error!("restoring the checkpoint failed ({e}); this replica leaves the group");
            self.leave();
            return;
        }
        self.ready.send_replace(true);
        for delta in replay {
            self.apply_delta(delta).await;
        }
        if !*self.ready.borrow() {
            return; // a replayed delta failed: it left instead
        }
        tracing::info!(id = self.id, "caught up from checkpoint");
        self.restored
            .store(true, std::sync::atomic::Ordering::Release);
        // Spawned: the effects queued behind this one need not wait a commit's
        // round trip. If it is lost, the reconciler proposes it again.
        tokio::spawn(self.clone().announce_restored());
    }
}
