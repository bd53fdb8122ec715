//! The Raft log: an in-memory map, optionally mirrored to an append-only file.
//!
//! The file lets a replica that restarts on the same host recover its vote, its
//! committed index and its log, and so catch up from its own log instead of needing a
//! snapshot from the leader. Each change is one record `[len u32 LE][postcard Record]`;
//! truncation and purge are records too, so the file is only ever appended to. On open the
//! file is replayed, a torn tail (crash mid-write) is dropped, and the file is rewritten
//! compactly with just the live state.
//!
//! Durability: with `fsync = false` a record reaches the OS before openraft is told it is
//! flushed, which survives a process crash but not a power loss; `fsync = true` also
//! survives the latter at the cost of one `fdatasync` per append batch.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, RaftLogId, RaftLogReader};
use serde::{Deserialize, Serialize};

use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};

const LOG_FILE: &str = "raft-log.bin";

#[derive(Serialize, Deserialize)]
enum Record {
    Entry(Entry),
    /// Delete entries at index >= this.
    Truncate(u64),
    Purge(LogId),
    Vote(Vote),
    Committed(Option<LogId>),
}

#[derive(Default)]
struct LogState_ {
    entries: BTreeMap<u64, Entry>,
    last_purged: Option<LogId>,
    vote: Option<Vote>,
    committed: Option<LogId>,
}

struct Inner {
    state: LogState_,
    disk: Option<DiskLog>,
}

/// Cheap to clone; clones share the log (openraft wants a separate reader handle).
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Mutex<Inner>>,
}

impl Default for LogStore {
    fn default() -> Self {
        Self::in_memory()
    }
}

impl LogStore {
    pub fn in_memory() -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                state: LogState_::default(),
                disk: None,
            })),
        }
    }

    /// Opens (or creates) the log in `dir`, replaying what a previous run left there.
    pub fn open(dir: &Path, fsync: bool) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(LOG_FILE);
        let state = replay(&path)?;
        let disk = DiskLog::rewrite(&path, &state, fsync)?;
        tracing::info!(
            path = %path.display(),
            entries = state.entries.len(),
            last = ?state.entries.keys().next_back(),
            "opened raft log"
        );
        Ok(Self {
            inner: Arc::new(Mutex::new(Inner {
                state,
                disk: Some(disk),
            })),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn io_err(subject: ErrorSubject<u64>, verb: ErrorVerb, e: io::Error) -> StorageError {
    StorageError::from_io_error(subject, verb, e)
}

impl Inner {
    // openraft's StorageError is large; it is what the storage traits return anyway.
    #[allow(clippy::result_large_err)]
    fn persist(
        &mut self,
        records: &[Record],
        subject: ErrorSubject<u64>,
    ) -> Result<(), StorageError> {
        if let Some(disk) = self.disk.as_mut() {
            disk.append(records)
                .map_err(|e| io_err(subject, ErrorVerb::Write, e))?;
        }
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let inner = self.lock();
        Ok(inner
            .state
            .entries
            .range(range)
            .map(|(_, e)| e.clone())
            .collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let inner = self.lock();
        let last_purged = inner.state.last_purged;
        let last = inner
            .state
            .entries
            .values()
            .next_back()
            .map(|e| *e.get_log_id())
            .or(last_purged);
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let mut inner = self.lock();
        inner.persist(&[Record::Vote(*vote)], ErrorSubject::Vote)?;
        inner.state.vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(self.lock().state.vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        let mut inner = self.lock();
        // Losing the committed index is harmless (it is re-learned from the leader), so
        // it is written without forcing a sync of its own.
        inner.persist(&[Record::Committed(committed)], ErrorSubject::Store)?;
        inner.state.committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.lock().state.committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut inner = self.lock();
        let entries: Vec<Entry> = entries.into_iter().collect();
        if inner.disk.is_some() {
            let records: Vec<Record> = entries.iter().cloned().map(Record::Entry).collect();
            if let Err(e) = inner.persist(&records, ErrorSubject::Logs) {
                callback.log_io_completed(Err(io::Error::other(e.to_string())));
                return Err(e);
            }
        }
        for e in entries {
            inner.state.entries.insert(e.log_id.index, e);
        }
        // The records are written (and synced if configured) before we report the flush.
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut inner = self.lock();
        inner.persist(&[Record::Truncate(log_id.index)], ErrorSubject::Logs)?;
        inner.state.entries.split_off(&log_id.index);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut inner = self.lock();
        inner.persist(&[Record::Purge(log_id)], ErrorSubject::Logs)?;
        let keep = inner.state.entries.split_off(&(log_id.index + 1));
        inner.state.entries = keep;
        inner.state.last_purged = Some(log_id);
        Ok(())
    }
}

struct DiskLog {
    file: BufWriter<File>,
    fsync: bool,
}

impl DiskLog {
    /// Writes a compact copy of `state` next to `path` and atomically replaces it.
    fn rewrite(path: &Path, state: &LogState_, fsync: bool) -> io::Result<Self> {
        let tmp: PathBuf = path.with_extension("tmp");
        {
            let mut w = BufWriter::new(File::create(&tmp)?);
            let mut put = |r: &Record| write_record(&mut w, r);
            if let Some(v) = state.vote {
                put(&Record::Vote(v))?;
            }
            if let Some(p) = state.last_purged {
                put(&Record::Purge(p))?;
            }
            put(&Record::Committed(state.committed))?;
            for e in state.entries.values() {
                put(&Record::Entry(e.clone()))?;
            }
            w.flush()?;
            w.get_ref().sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        let file = OpenOptions::new().append(true).open(path)?;
        Ok(Self {
            file: BufWriter::with_capacity(1 << 20, file),
            fsync,
        })
    }

    fn append(&mut self, records: &[Record]) -> io::Result<()> {
        for r in records {
            write_record(&mut self.file, r)?;
        }
        self.file.flush()?;
        if self.fsync {
            self.file.get_ref().sync_data()?;
        }
        Ok(())
    }
}

fn write_record(w: &mut impl Write, r: &Record) -> io::Result<()> {
    let body = postcard::to_stdvec(r).map_err(io::Error::other)?;
    w.write_all(&(body.len() as u32).to_le_bytes())?;
    w.write_all(&body)
}

fn replay(path: &Path) -> io::Result<LogState_> {
    let mut state = LogState_::default();
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut f) => {
            f.read_to_end(&mut bytes)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(state),
        Err(e) => return Err(e),
    }
    let mut off = 0;
    while off + 4 <= bytes.len() {
        let len = u32::from_le_bytes([bytes[off], bytes[off + 1], bytes[off + 2], bytes[off + 3]])
            as usize;
        let Some(body) = bytes.get(off + 4..off + 4 + len) else {
            break;
        };
        let Ok(record) = postcard::from_bytes::<Record>(body) else {
            break;
        };
        match record {
            Record::Entry(e) => {
                state.entries.insert(e.log_id.index, e);
            }
            Record::Truncate(i) => {
                state.entries.split_off(&i);
            }
            Record::Purge(id) => {
                state.entries = state.entries.split_off(&(id.index + 1));
                state.last_purged = Some(id);
            }
            Record::Vote(v) => state.vote = Some(v),
            Record::Committed(c) => state.committed = c,
        }
        off += 4 + len;
    }
    if off != bytes.len() {
        tracing::warn!(path = %path.display(), dropped = bytes.len() - off, "dropping torn tail of raft log");
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(term: u64, index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Normal(vec![index as u8; 10]),
        }
    }

    fn write_direct(store: &LogStore, records: &[Record], apply: impl FnOnce(&mut LogState_)) {
        let mut inner = store.lock();
        inner.persist(records, ErrorSubject::Logs).unwrap();
        apply(&mut inner.state);
    }

    #[test]
    fn disk_log_replays_truncate_purge_vote_and_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = LogStore::open(dir.path(), false).unwrap();
            let recs: Vec<Record> = (1..=10).map(|i| Record::Entry(entry(1, i))).collect();
            write_direct(&store, &recs, |_| {});
            write_direct(
                &store,
                &[
                    Record::Truncate(8),
                    Record::Entry(entry(2, 8)),
                    Record::Purge(LogId::new(CommittedLeaderId::new(1, 1), 3)),
                ],
                |_| {},
            );
            write_direct(&store, &[Record::Vote(Vote::new(2, 1))], |_| {});
        }
        // Simulate a crash in the middle of a record.
        let path = dir.path().join(LOG_FILE);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2]).unwrap();
        drop(f);

        let store = LogStore::open(dir.path(), false).unwrap();
        let inner = store.lock();
        let idx: Vec<u64> = inner.state.entries.keys().copied().collect();
        assert_eq!(idx, vec![4, 5, 6, 7, 8]);
        assert_eq!(inner.state.entries[&8].log_id.leader_id.term, 2);
        assert_eq!(inner.state.last_purged.map(|l| l.index), Some(3));
        assert_eq!(inner.state.vote, Some(Vote::new(2, 1)));
    }
}
