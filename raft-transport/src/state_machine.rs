//! The replicated state: the application's, applied synchronously in log order.
//!
//! This crate does not know what the entries mean. The application gives the state machine
//! an [`Application`] with its own entry type; each committed entry is decoded into that
//! type and applied as openraft applies it, under the state machine's lock, and the
//! application serialises its own state for a snapshot. A snapshot is
//! therefore exactly the application's state at the snapshot's log index, openraft's
//! snapshot policy builds it, and the log is purged behind it: memory is what the
//! application keeps, not the history of the log.
//!
//! With a data directory the latest snapshot is also written to disk, so that a restarted
//! replica whose log was purged up to the snapshot can rebuild its state.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, RaftSnapshotBuilder, StorageIOError};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::types::{
    Entry, LogId, NodeId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};

const SNAPSHOT_FILE: &str = "snapshot.bin";

/// One committed entry as a [`Journal`] keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommittedEntry {
    /// Raft log index; strictly increasing, but not dense (membership and blank entries
    /// take indexes too).
    pub index: u64,
    pub data: Bytes,
}

/// What the application replicates. Every method runs under the state machine's lock, on
/// openraft's storage task: keep them quick and never block on I/O; hand slow work (a
/// cell, a transfer) to tasks of the application's own.
pub trait Application: Send + 'static {
    /// What [`crate::ReplicaNode::propose`] puts in the log (postcard on the wire).
    type Entry: DeserializeOwned;

    /// Applies the committed entry at log index `index`.
    fn apply(&mut self, index: u64, entry: Self::Entry);

    /// A committed entry that does not decode as [`Application::Entry`]: proposed by a
    /// replica of another version, or corrupt. It is skipped.
    fn undecodable(&mut self, index: u64, error: String) {
        tracing::warn!(index, "skipping an undecodable log entry: {error}");
    }

    /// The voters changed (a membership entry was applied, or a snapshot installed).
    fn membership(&mut self, _voters: BTreeSet<NodeId>) {}

    /// The state after the last applied entry, for a snapshot.
    fn snapshot(&self) -> Result<Vec<u8>, String>;

    /// Replaces the state with a snapshot's, taken at log index `index`: a replica that
    /// lagged behind the purged log, or one restarting from its data directory.
    fn install(&mut self, index: u64, data: &[u8]) -> Result<(), String>;
}

/// An [`Application`] behind the bytes openraft stores.
trait Decoding: Send {
    fn apply_bytes(&mut self, index: u64, data: &[u8]);
    fn membership(&mut self, voters: BTreeSet<NodeId>);
    fn snapshot(&self) -> Result<Vec<u8>, String>;
    fn install(&mut self, index: u64, data: &[u8]) -> Result<(), String>;
}

impl<A: Application> Decoding for A {
    fn apply_bytes(&mut self, index: u64, data: &[u8]) {
        match postcard::from_bytes::<A::Entry>(data) {
            Ok(entry) => self.apply(index, entry),
            Err(e) => self.undecodable(index, e.to_string()),
        }
    }
    fn membership(&mut self, voters: BTreeSet<NodeId>) {
        Application::membership(self, voters)
    }
    fn snapshot(&self) -> Result<Vec<u8>, String> {
        Application::snapshot(self)
    }
    fn install(&mut self, index: u64, data: &[u8]) -> Result<(), String> {
        Application::install(self, index, data)
    }
}

struct State {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    app: Box<dyn Decoding>,
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

struct Shared {
    state: Mutex<State>,
    applied: tokio::sync::watch::Sender<u64>,
    dir: Option<PathBuf>,
}

/// openraft's state machine; clones share state.
#[derive(Clone)]
pub struct StateMachineStore {
    shared: Arc<Shared>,
}

fn voters(m: &StoredMembership) -> BTreeSet<NodeId> {
    m.membership().voter_ids().collect()
}

fn storage_error(e: impl ToString) -> io::Error {
    io::Error::other(e.to_string())
}

impl StateMachineStore {
    /// `dir`: where the latest snapshot is kept across restarts (`None`: memory only).
    pub fn new(app: impl Application, dir: Option<&Path>) -> io::Result<Self> {
        let mut state = State {
            last_applied: None,
            membership: StoredMembership::default(),
            app: Box::new(app),
            snapshot: None,
            snapshot_seq: 0,
        };
        if let Some(dir) = dir {
            std::fs::create_dir_all(dir)?;
            if let Some(file) = read_snapshot_file(&dir.join(SNAPSHOT_FILE))? {
                let index = file.meta.last_log_id.map_or(0, |l| l.index);
                state
                    .app
                    .install(index, &file.data)
                    .map_err(storage_error)?;
                state.app.membership(voters(&file.meta.last_membership));
                tracing::info!(last = ?file.meta.last_log_id, "loaded snapshot from disk");
                state.last_applied = file.meta.last_log_id;
                state.membership = file.meta.last_membership.clone();
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
                state: Mutex::new(state),
                applied,
                dir: dir.map(Path::to_path_buf),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Index of the last applied log entry (0 before any).
    pub fn last_applied_index(&self) -> u64 {
        *self.shared.applied.borrow()
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

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let stored = {
            let mut state = self.lock();
            state.snapshot_seq += 1;
            let data = state
                .app
                .snapshot()
                .map_err(|e| StorageIOError::read_state_machine(&storage_error(e)))?;
            let last = state.last_applied;
            let snapshot_id = match last {
                Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, state.snapshot_seq),
                None => format!("empty-{}", state.snapshot_seq),
            };
            let stored = StoredSnapshot {
                meta: SnapshotMeta {
                    last_log_id: last,
                    last_membership: state.membership.clone(),
                    snapshot_id,
                },
                data: Arc::new(data),
            };
            state.snapshot = Some(stored.clone());
            stored
        };
        self.persist_snapshot(&stored)?;
        tracing::debug!(snapshot = %stored.meta.snapshot_id, bytes = stored.data.len(), "built snapshot");
        Ok(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(stored.data.as_ref().clone()),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let state = self.lock();
        Ok((state.last_applied, state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<u64>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut responses = Vec::new();
        let last = {
            let mut state = self.lock();
            for entry in entries {
                let index = entry.log_id.index;
                match entry.payload {
                    EntryPayload::Blank => {}
                    EntryPayload::Normal(data) => state.app.apply_bytes(index, &data),
                    EntryPayload::Membership(m) => {
                        state.membership = StoredMembership::new(Some(entry.log_id), m);
                        let voters = voters(&state.membership);
                        state.app.membership(voters);
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
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: Arc::new(*snapshot),
        };
        let last = {
            let mut state = self.lock();
            let index = meta.last_log_id.map_or(0, |l| l.index);
            state.app.install(index, &stored.data).map_err(|e| {
                StorageIOError::read_snapshot(Some(meta.signature()), &storage_error(e))
            })?;
            state.app.membership(voters(&meta.last_membership));
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
        let state = self.lock();
        Ok(state.snapshot.as_ref().map(|s| Snapshot {
            meta: s.meta.clone(),
            snapshot: Box::new(s.data.as_ref().clone()),
        }))
    }
}

/// An [`Application`] whose entries are byte strings and which keeps every one: for tests,
/// benchmarks and tools that want the raw log. Its memory grows with the log; a real
/// application keeps its own, bounded state.
#[derive(Clone, Default)]
pub struct Journal {
    shared: Arc<JournalShared>,
}

#[derive(Default)]
struct JournalShared {
    entries: Mutex<Vec<CommittedEntry>>,
    appended: tokio::sync::Notify,
}

impl Journal {
    fn entries_lock(&self) -> MutexGuard<'_, Vec<CommittedEntry>> {
        self.shared
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of every entry applied so far.
    pub fn entries(&self) -> Vec<CommittedEntry> {
        self.entries_lock().clone()
    }

    /// A reader that yields every entry after log index `after`, in order.
    pub fn subscribe(&self, after: u64) -> CommittedEntries {
        CommittedEntries {
            journal: self.clone(),
            after,
        }
    }
}

impl Application for Journal {
    type Entry = Bytes;

    fn apply(&mut self, index: u64, data: Bytes) {
        self.entries_lock().push(CommittedEntry { index, data });
        self.shared.appended.notify_waiters();
    }

    fn snapshot(&self) -> Result<Vec<u8>, String> {
        postcard::to_stdvec(&*self.entries_lock()).map_err(|e| e.to_string())
    }

    fn install(&mut self, _index: u64, data: &[u8]) -> Result<(), String> {
        let entries: Vec<CommittedEntry> = postcard::from_bytes(data).map_err(|e| e.to_string())?;
        *self.entries_lock() = entries;
        self.shared.appended.notify_waiters();
        Ok(())
    }
}

/// A [`Journal`]'s entries in log order, starting after a given index.
pub struct CommittedEntries {
    journal: Journal,
    after: u64,
}

impl CommittedEntries {
    /// The next entry, waiting for it to be applied.
    pub async fn next(&mut self) -> CommittedEntry {
        let shared = self.journal.shared.clone();
        loop {
            let appended = shared.appended.notified();
            if let Some(e) = self.try_next() {
                return e;
            }
            appended.await;
        }
    }

    /// The next entry if one is already applied, without waiting.
    pub fn try_next(&mut self) -> Option<CommittedEntry> {
        let entries = self.journal.entries_lock();
        let at = entries.partition_point(|e| e.index <= self.after);
        let e = entries.get(at)?.clone();
        self.after = e.index;
        Some(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    fn entry(index: u64, data: &[u8]) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(
                postcard::to_stdvec(&Bytes::copy_from_slice(data)).unwrap(),
            ),
        }
    }

    #[tokio::test]
    async fn apply_subscribe_snapshot_install() {
        let journal = Journal::default();
        let mut sm = StateMachineStore::new(journal.clone(), None).unwrap();
        let mut sub = journal.subscribe(0);
        let blank = Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), 1),
            payload: EntryPayload::Blank,
        };
        let r = sm
            .apply(vec![blank, entry(2, b"a"), entry(3, b"b")])
            .await
            .unwrap();
        assert_eq!(r, vec![1, 2, 3]);
        assert_eq!(sub.next().await.data, Bytes::from_static(b"a"));
        assert_eq!(sub.next().await.index, 3);
        assert!(sub.try_next().is_none());

        let snap = sm.build_snapshot().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let other_journal = Journal::default();
        let mut other = StateMachineStore::new(other_journal.clone(), Some(dir.path())).unwrap();
        other
            .install_snapshot(&snap.meta, snap.snapshot)
            .await
            .unwrap();
        assert_eq!(other_journal.entries(), journal.entries());
        assert_eq!(other.last_applied_index(), 3);
        // A restarted replica reloads the snapshot it had installed.
        let reloaded = Journal::default();
        let sm = StateMachineStore::new(reloaded.clone(), Some(dir.path())).unwrap();
        assert_eq!(reloaded.entries(), journal.entries());
        assert_eq!(sm.last_applied_index(), 3);
    }

    /// An application whose state is one number: a snapshot holds that, not the log.
    struct Counter(u64);

    impl Application for Counter {
        type Entry = Bytes;

        fn apply(&mut self, _index: u64, _entry: Bytes) {
            self.0 += 1;
        }
        fn snapshot(&self) -> Result<Vec<u8>, String> {
            Ok(self.0.to_le_bytes().to_vec())
        }
        fn install(&mut self, _index: u64, data: &[u8]) -> Result<(), String> {
            let bytes: [u8; 8] = data.try_into().map_err(|_| "bad counter".to_string())?;
            self.0 = u64::from_le_bytes(bytes);
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_snapshot_is_the_applications_state_not_the_log() {
        let mut sm = StateMachineStore::new(Counter(0), None).unwrap();
        let entries: Vec<Entry> = (1..=10_000).map(|i| entry(i, &[0u8; 100])).collect();
        sm.apply(entries).await.unwrap();
        let snap = sm.build_snapshot().await.unwrap();
        assert_eq!(*snap.snapshot, 10_000u64.to_le_bytes().to_vec());
        assert_eq!(snap.meta.last_log_id.map(|l| l.index), Some(10_000));
    }

    #[tokio::test]
    async fn an_entry_that_does_not_decode_is_skipped() {
        struct Typed(Vec<u32>, usize);
        impl Application for Typed {
            type Entry = u32;
            fn apply(&mut self, _index: u64, entry: u32) {
                self.0.push(entry);
            }
            fn undecodable(&mut self, _index: u64, _error: String) {
                self.1 += 1;
            }
            fn snapshot(&self) -> Result<Vec<u8>, String> {
                Ok(Vec::new())
            }
            fn install(&mut self, _index: u64, _data: &[u8]) -> Result<(), String> {
                Ok(())
            }
        }
        let mut sm = StateMachineStore::new(Typed(Vec::new(), 0), None).unwrap();
        let good = Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), 1),
            payload: EntryPayload::Normal(postcard::to_stdvec(&7u32).unwrap()),
        };
        let bad = Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), 2),
            payload: EntryPayload::Normal(vec![0xff; 9]),
        };
        sm.apply(vec![good, bad]).await.unwrap();
        assert_eq!(
            sm.last_applied_index(),
            2,
            "a bad entry still counts as applied"
        );
    }
}
