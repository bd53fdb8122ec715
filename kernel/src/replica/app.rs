//! Raft's view of a replica's application: committed entries go through the
//! pure [`Applier`] as openraft applies them, under the state machine's lock,
//! and the effects go in order to the [`Core`](super::Core)'s executor.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use raft_transport::NodeId;
use tokio::sync::mpsc;

use super::applier::{Applier, Effect};
use super::entry::Entry;
use super::lock;

/// The effects of one applied entry (or installed snapshot), at its log index.
pub(super) struct Batch {
    pub(super) index: u64,
    pub(super) effects: Vec<Effect>,
}

/// Raft's view of this replica's application: entries are applied by the
/// [`Applier`] as they commit, under the state machine's lock; the effects go,
/// in order, to [`Core`]'s executor.
pub struct ReplicaApp {
    applier: Arc<Mutex<Applier>>,
    effects: mpsc::UnboundedSender<Batch>,
}

/// [`Core`]'s end of a [`ReplicaApp`].
pub struct AppHandle {
    pub(super) applier: Arc<Mutex<Applier>>,
    pub(super) effects: mpsc::UnboundedReceiver<Batch>,
}

/// The application to start a replica's [`ReplicaNode`] with, and the handle
/// its [`Core`] takes.
pub fn replica_app(me: NodeId, front: NodeId, joining: bool) -> (ReplicaApp, AppHandle) {
    let applier = Arc::new(Mutex::new(Applier::new(me, front, joining)));
    let (tx, rx) = mpsc::unbounded_channel();
    (
        ReplicaApp {
            applier: applier.clone(),
            effects: tx,
        },
        AppHandle {
            applier,
            effects: rx,
        },
    )
}

impl ReplicaApp {
    fn emit(&self, index: u64, effects: Vec<Effect>) {
        if self.effects.send(Batch { index, effects }).is_err() {
            // The executor is gone: the replica is stopping.
            tracing::debug!(index, "effects dropped at shutdown");
        }
    }
}

impl raft_transport::Application for ReplicaApp {
    type Entry = Entry;

    fn apply(&mut self, index: u64, entry: Entry) {
        tracing::debug!(index, entry = entry.kind(), "apply");
        let effects = lock(&self.applier).apply(index, entry);
        self.emit(index, effects);
    }

    fn undecodable(&mut self, index: u64, error: String) {
        tracing::warn!(
            index,
            "skipping a log entry this version cannot read: {error}"
        );
        // Still a log position: effects so far are carried out up to here.
        self.emit(index, Vec::new());
    }

    fn membership(&mut self, voters: BTreeSet<NodeId>) {
        lock(&self.applier).membership(voters);
    }

    fn snapshot(&self) -> Result<Vec<u8>, String> {
        Ok(lock(&self.applier).snapshot())
    }

    fn install(&mut self, index: u64, data: &[u8]) -> Result<(), String> {
        let effects = lock(&self.applier)
            .install(index, data)
            .map_err(|e| e.to_string())?;
        self.emit(index, effects);
        Ok(())
    }
}
