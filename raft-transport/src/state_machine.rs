//! The replicated state: every committed application entry, in log order.
//!
//! The application data is opaque to this crate, so the state machine simply keeps the
//! applied entries. That serves two purposes: subscribers ([`CommittedEntries`]) read them
//! in order at their own pace without ever missing one, and a snapshot is exactly this
//! list (postcard-encoded `Vec<CommittedEntry>`), so a replica that installs a snapshot
//! can still replay the application's history. The kernel layers its own typed entries
//! (and, later, its own compaction) on top.
//!
//! With a data directory the latest snapshot is also written to disk, so that a restarted
//! replica whose log was purged up to the snapshot can rebuild its state.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, RaftSnapshotBuilder, StorageIOError};
use serde::{Deserialize, Serialize};

use crate::types::{
    Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};

const SNAPSHOT_FILE: &str = "snapshot.bin";

/// One committed application entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommittedEntry {
    /// Raft log index; strictly increasing, but not dense (membership and blank entries
    /// take indexes too).
    pub index: u64,
    pub term: u64,
    pub data: Bytes,
}

#[derive(Default)]
struct State {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    entries: Vec<CommittedEntry>,
    snapshot: Option<StoredSnapshot>,
    snapshot_seq: u64,
}

#[derive(Clone)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    data: Arc<Vec<u8>>,
}

#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

pub(crate) struct Shared {
    state: RwLock<State>,
    applied: tokio::sync::watch::Sender<u64>,
    dir: Option<PathBuf>,
}

/// openraft's state machine; clones share state.
#[derive(Clone)]
pub struct StateMachineStore {
    shared: Arc<Shared>,
}

impl StateMachineStore {
    /// `dir`: where the latest snapshot is kept across restarts (`None`: memory only).
    pub fn new(dir: Option<&Path>) -> io::Result<Self> {
        let mut state = State::default();
        if let Some(dir) = dir {
            std::fs::create_dir_all(dir)?;
            if let Some(file) = read_snapshot_file(&dir.join(SNAPSHOT_FILE))? {
                let entries: Vec<CommittedEntry> =
                    postcard::from_bytes(&file.data).map_err(io::Error::other)?;
                tracing::info!(entries = entries.len(), last = ?file.meta.last_log_id, "loaded snapshot from disk");
                state.last_applied = file.meta.last_log_id;
                state.membership = file.meta.last_membership.clone();
                state.entries = entries;
                state.snapshot = Some(StoredSnapshot {
                    meta: file.meta,
                    data: Arc::new(file.data),
                });
            }
        }
        let last = state.last_applied.map_or(0, |l| l.index);
        let (applied, _) = tokio::sync::watch::channel(last);
        Ok(Self {
            shared: Arc::new(Shared {
                state: RwLock::new(state),
                applied,
                dir: dir.map(Path::to_path_buf),
            }),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.shared.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.shared.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Index of the last applied log entry (0 before any).
    pub fn last_applied_index(&self) -> u64 {
        *self.shared.applied.borrow()
    }

    /// A copy of all applied application entries.
    pub fn entries(&self) -> Vec<CommittedEntry> {
        self.read().entries.clone()
    }

    /// A reader that yields every committed entry after log index `after`, in order.
    pub fn subscribe(&self, after: u64) -> CommittedEntries {
        CommittedEntries {
            sm: self.clone(),
            after,
            applied: self.shared.applied.subscribe(),
            buf: Default::default(),
        }
    }

    // openraft's StorageError is large; it is what the storage traits return anyway.
    #[allow(clippy::result_large_err)]
    fn persist_snapshot(&self, snap: &StoredSnapshot) -> Result<(), StorageError> {
        let Some(dir) = &self.shared.dir else {
            return Ok(());
        };
        let file = SnapshotFile {
            meta: snap.meta.clone(),
            data: snap.data.as_ref().clone(),
        };
        let write = || -> io::Result<()> {
            let bytes = postcard::to_stdvec(&file).map_err(io::Error::other)?;
            let tmp = dir.join("snapshot.tmp");
            std::fs::write(&tmp, bytes)?;
            std::fs::rename(tmp, dir.join(SNAPSHOT_FILE))
        };
        write().map_err(|e| StorageIOError::write_snapshot(Some(snap.meta.signature()), &e).into())
    }
}

fn read_snapshot_file(path: &Path) -> io::Result<Option<SnapshotFile>> {
    match std::fs::read(path) {
        Ok(b) => postcard::from_bytes(&b).map(Some).map_err(io::Error::other),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Committed application entries in log order, starting after a given index.
///
/// Never skips or reorders entries: it reads from the state machine's list rather than
/// from a bounded channel, so a slow subscriber only lags, it does not lose data.
pub struct CommittedEntries {
    sm: StateMachineStore,
    after: u64,
    applied: tokio::sync::watch::Receiver<u64>,
    buf: std::collections::VecDeque<CommittedEntry>,
}

impl CommittedEntries {
    /// The next committed entry; `None` once the replica has shut down.
    pub async fn next(&mut self) -> Option<CommittedEntry> {
        loop {
            if let Some(e) = self.buf.pop_front() {
                self.after = e.index;
                return Some(e);
            }
            {
                let state = self.sm.read();
                let start = state.entries.partition_point(|e| e.index <= self.after);
                // Hand out bounded batches to keep the read lock short.
                self.buf
                    .extend(state.entries[start..].iter().take(1024).cloned());
            }
            if self.buf.is_empty() {
                // Wait for the applied index to move; an error means the node is gone.
                self.applied.changed().await.ok()?;
            }
        }
    }

    /// Returns the next entry if one is already committed, without waiting.
    pub fn try_next(&mut self) -> Option<CommittedEntry> {
        if self.buf.is_empty() {
            let state = self.sm.read();
            let start = state.entries.partition_point(|e| e.index <= self.after);
            self.buf
                .extend(state.entries[start..].iter().take(1024).cloned());
        }
        let e = self.buf.pop_front()?;
        self.after = e.index;
        Some(e)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let (meta, data) = {
            let mut state = self.write();
            state.snapshot_seq += 1;
            let data = postcard::to_stdvec(&state.entries)
                .map_err(|e| StorageIOError::read_state_machine(&io::Error::other(e)))?;
            let last = state.last_applied;
            let snapshot_id = match last {
                Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, state.snapshot_seq),
                None => format!("empty-{}", state.snapshot_seq),
            };
            let meta = SnapshotMeta {
                last_log_id: last,
                last_membership: state.membership.clone(),
                snapshot_id,
            };
            let stored = StoredSnapshot {
                meta: meta.clone(),
                data: Arc::new(data),
            };
            state.snapshot = Some(stored.clone());
            (meta, stored)
        };
        self.persist_snapshot(&data)?;
        tracing::debug!(snapshot = %meta.snapshot_id, bytes = data.data.len(), "built snapshot");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(data.data.as_ref().clone()),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let state = self.read();
        Ok((state.last_applied, state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<u64>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut responses = Vec::new();
        let last = {
            let mut state = self.write();
            for entry in entries {
                let index = entry.log_id.index;
                match entry.payload {
                    EntryPayload::Blank => {}
                    EntryPayload::Normal(data) => state.entries.push(CommittedEntry {
                        index,
                        term: entry.log_id.leader_id.term,
                        data: Bytes::from(data),
                    }),
                    EntryPayload::Membership(m) => {
                        state.membership = StoredMembership::new(Some(entry.log_id), m);
                    }
                }
                state.last_applied = Some(entry.log_id);
                responses.push(index);
            }
            state.last_applied.map_or(0, |l| l.index)
        };
        self.shared.applied.send_replace(last);
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Vec<u8>>, StorageError> {
        Ok(Box::default())
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Vec<u8>>,
    ) -> Result<(), StorageError> {
        let entries: Vec<CommittedEntry> = postcard::from_bytes(&snapshot).map_err(|e| {
            StorageIOError::read_snapshot(Some(meta.signature()), &io::Error::other(e))
        })?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: Arc::new(*snapshot),
        };
        let last = {
            let mut state = self.write();
            state.entries = entries;
            state.last_applied = meta.last_log_id;
            state.membership = meta.last_membership.clone();
            state.snapshot = Some(stored.clone());
            state.last_applied.map_or(0, |l| l.index)
        };
        self.persist_snapshot(&stored)?;
        tracing::info!(snapshot = %meta.snapshot_id, "installed snapshot");
        self.shared.applied.send_replace(last);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let state = self.read();
        Ok(state.snapshot.as_ref().map(|s| Snapshot {
            meta: s.meta.clone(),
            snapshot: Box::new(s.data.as_ref().clone()),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    fn entry(index: u64, data: &[u8]) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(data.to_vec()),
        }
    }

    #[tokio::test]
    async fn apply_subscribe_snapshot_install() {
        let mut sm = StateMachineStore::new(None).unwrap();
        let mut sub = sm.subscribe(0);
        let blank = Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), 1),
            payload: EntryPayload::Blank,
        };
        let r = sm
            .apply(vec![blank, entry(2, b"a"), entry(3, b"b")])
            .await
            .unwrap();
        assert_eq!(r, vec![1, 2, 3]);
        assert_eq!(sub.next().await.unwrap().data, Bytes::from_static(b"a"));
        assert_eq!(sub.next().await.unwrap().index, 3);
        assert!(sub.try_next().is_none());

        let snap = sm.build_snapshot().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut other = StateMachineStore::new(Some(dir.path())).unwrap();
        other
            .install_snapshot(&snap.meta, snap.snapshot)
            .await
            .unwrap();
        assert_eq!(other.entries(), sm.entries());
        assert_eq!(other.last_applied_index(), 3);
        // A restarted replica reloads the snapshot it had installed.
        let reloaded = StateMachineStore::new(Some(dir.path())).unwrap();
        assert_eq!(reloaded.entries(), sm.entries());
    }
}
