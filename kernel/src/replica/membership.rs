//! Membership: the leader keeps Raft's voters equal to the replicas the log
//! says are up, brings joiners in (learner, checkpoint, voter), and a
//! replica whose namespace diverged asks to leave.

use std::sync::Arc;

use raft_transport::NodeId;

use super::entry::Entry;
use super::{lock, statesync, Core};

/// How long a checkpoint for a joiner waits for changes still streaming.
const JOIN_SYNC_PATIENCE: std::time::Duration = std::time::Duration::from_secs(120);
/// How often the leader checks that downed replicas left Raft's membership.
const RECONCILE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

impl Core {
    /// Leader: removes from Raft's membership every replica the log has
    /// declared down, and promotes every learner whose checkpoint is in the
    /// log. A change refused because another is in flight, or lost to a
    /// change of leader, is retried here, so a dead voter never lingers to
    /// cost the group its quorum and a caught-up learner always votes.
    pub(super) async fn reconcile_membership(self: Arc<Self>) {
        let mut stop = self.stop.subscribe();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(RECONCILE_INTERVAL) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            if self.restored_unannounced() {
                self.clone().announce_restored().await;
            }
            if !self.is_leader() {
                continue;
            }
            let m = self.node.metrics();
            let stale: Vec<NodeId> = m
                .voters
                .iter()
                .chain(&m.learners)
                .copied()
                .filter(|id| self.is_down(*id))
                .collect();
            for replica in stale {
                match self.node.remove(replica).await {
                    Ok(()) => tracing::info!(replica, "removed a downed replica from the group"),
                    Err(e) => tracing::debug!(replica, error = %e, "removal will be retried"),
                }
            }
            let ready: Vec<NodeId> = {
                let applier = lock(&self.applier);
                let state = applier.state();
                m.learners
                    .iter()
                    .copied()
                    .filter(|id| state.checkpointed.contains(id) && !state.elections.is_down(*id))
                    .collect()
            };
            for replica in ready {
                match self.node.promote(replica).await {
                    Ok(()) => tracing::info!(replica, "replica joined"),
                    Err(e) => tracing::debug!(replica, error = %e, "promotion will be retried"),
                }
            }
            // A joiner whose admission failed, or began under an earlier leader.
            let joiners: Vec<(NodeId, String)> = {
                let applier = lock(&self.applier);
                let state = applier.state();
                state
                    .joining
                    .iter()
                    .filter(|(id, _)| !state.elections.is_down(**id))
                    .map(|(id, j)| (*id, j.addr.clone()))
                    .collect()
            };
            for (replica, addr) in joiners {
                self.admit(replica, addr);
            }
        }
    }

    /// Our namespace differs from the group's: stop bidding, and ask to be
    /// removed (and so replaced). Through the log rather than by exiting, so that
    /// replicas failing alike leave one at a time and the rest keep a quorum.
    pub(super) fn leave(self: &Arc<Self>) {
        lock(&self.applier).left();
        self.ready.send_replace(false);
        let core = self.clone();
        tokio::spawn(async move {
            if let Err(e) = core.propose(&Entry::MemberDown { replica: core.id }).await {
                tracing::error!(error = %e, "could not ask to leave the group");
            }
        });
    }

    /// Adds `replica` as a learner, retrying while Raft refuses because
    /// another membership change (typically the removal of the replica this
    /// one replaces) is still in flight. Gives up if this replica stops
    /// leading or the joiner is declared down; `reconcile_membership` starts
    /// again on whichever replica leads.
    async fn add_learner(&self, replica: NodeId, sock: std::net::SocketAddr) -> bool {
        let mut stop = self.stop.subscribe();
        loop {
            let err = match self.node.add_learner(replica, sock).await {
                Ok(()) => return true,
                Err(e) => e,
            };
            if !self.is_leader() || self.is_down(replica) {
                tracing::warn!(replica, error = %err, "could not add replica");
                return false;
            }
            tracing::debug!(replica, error = %err, "adding the replica will be retried");
            tokio::select! {
                _ = tokio::time::sleep(RECONCILE_INTERVAL) => {}
                _ = stop.wait_for(|s| *s) => return false,
            }
        }
    }

    /// Leader: starts admitting `replica` unless that is under way here.
    pub(super) fn admit(self: &Arc<Self>, replica: NodeId, addr: String) {
        if !lock(&self.admitting).insert(replica) {
            return;
        }
        let core = self.clone();
        tokio::spawn(async move {
            core.add_member(replica, addr).await;
            lock(&core.admitting).remove(&replica);
        });
    }

    /// Brings a new replica in: learner, checkpoint, voter.
    async fn add_member(self: &Arc<Self>, replica: NodeId, addr: String) {
        let Ok(sock) = addr.parse() else {
            tracing::warn!(replica, addr, "new replica has an unusable address");
            return;
        };
        if !*self.ready.borrow() || lock(&self.applier).state().restoring.contains(&self.id) {
            // Our own checkpoint is still on its way in (or we left): ours would
            // hand the joiner an empty or diverged namespace. The reconciler
            // admits it once we are restored, or whichever replica leads after us.
            tracing::debug!(replica, "not restored here yet; admission waits");
            return;
        }
        if !self.add_learner(replica, sock).await {
            return;
        }
        // A checkpoint holding changes the log does not have yet would give the
        // joiner a cell the others lose if their holder dies.
        if !self.wait_synced(JOIN_SYNC_PATIENCE).await {
            tracing::warn!(replica, "changes still streaming; checkpointing anyway");
        }
        // Everything applied so far is in the checkpoint; an entry being
        // applied meanwhile may be too, and replaying it is harmless.
        let upto = self.applied.load(std::sync::atomic::Ordering::Acquire);
        let data = match statesync::checkpoint(&self.exec).await {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(replica, "checkpoint failed: {e}");
                return;
            }
        };
        // Kept here too: if the push is lost (a dropped link), the joiner fetches it.
        let len = data.len() as u64;
        let kept = self.node.publish_blob(data.clone());
        self.keep_recent_blob(kept, len);
        let hash = match self.node.send_blob(replica, data).await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(replica, error = %e, "could not send checkpoint");
                return;
            }
        };
        let entry = Entry::Checkpoint {
            replica,
            from: self.id,
            blob: hash.0,
            upto,
        };
        if let Err(e) = self.propose(&entry).await {
            tracing::warn!(replica, error = %e, "could not propose checkpoint");
            return;
        }
        // Refused while another membership change is in flight: the
        // reconciler promotes it later.
        match self.node.promote(replica).await {
            Ok(()) => tracing::info!(replica, "replica joined"),
            Err(e) => tracing::debug!(replica, error = %e, "promotion will be retried"),
        }
    }
}
