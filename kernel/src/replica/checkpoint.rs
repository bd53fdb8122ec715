//! A joiner's catch-up: restore the checkpoint the leader pushed, then replay
//! the deltas committed after the log index it includes.

use std::sync::Arc;

use raft_transport::BlobHash;

use super::applier::{CheckpointRef, DeltaRef};
use super::entry::Entry;
use super::{statesync, Core};

impl Core {
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
        tracing::info!(id = self.id, "caught up from checkpoint");
        // Not awaited here: the commit is applied through this effect loop.
        let core = self.clone();
        tokio::spawn(async move {
            if let Err(e) = core.propose(&Entry::Restored { replica: core.id }).await {
                tracing::warn!(error = %e, "could not announce the restored checkpoint");
            }
        });
    }
}
