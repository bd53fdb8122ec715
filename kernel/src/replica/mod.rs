//! The replicated kernel: every replica is this process's code with its own
//! Python; cells go through the Raft log of a [`raft_transport::ReplicaNode`]
//! group. See docs/architecture.md for the per-cell sequence.
//!
//! * [`entry`]: what goes in the log and in the replicas' mailboxes.
//! * [`election`]: who runs a cell, decided from the log alone.
//! * [`applier`]: the pure state machine over the log: entries in, effects out;
//!   its group state is what a Raft snapshot holds.
//! * `app`: the applier inside Raft's state machine; effects out in order.
//! * `core` (this file): what every replica holds, and proposing.
//! * `effects`: carrying the effects out, in log order.
//! * `bidding`: LEAD or YIELD, GPU grants, re-bids.
//! * `cell`: the front's request and the winner's run; interrupts.
//! * `deltas`: shipping and applying namespace changes.
//! * `membership`, `checkpoint`: joiners in, downed replicas out, catch-up.
//! * `mail`: direct messages between replicas.
//! * `shim`: `%notebookos` and `%notebookos verify`.
//! * `front`: what only the replica facing Jupyter does: forms the group,
//!   consumes the core's events (relayed output and input, queued cells),
//!   supervises and replaces the other replicas.
//! * `peer`: the `notebookos-kernel replica` process.
//! * `relay`: a peer's iopub and stdin, carried to the front.
//! * [`group`], [`spawn`]: on-disk group state and starting replicas.
//! * `statesync`: packing namespace deltas and checkpoints.

mod app;
pub mod applier;
mod bidding;
mod cell;
mod checkpoint;
mod deltas;
mod effects;
pub mod election;
pub mod entry;
pub mod front;
pub mod group;
mod mail;
mod membership;
pub mod peer;
mod relay;
mod remote;
mod shim;
pub mod spawn;
pub mod statesync;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use pyo3::types::PyAnyMethods;
use raft_transport::{BlobHash, NodeId, ReplicaNode};
use tokio::sync::{mpsc, oneshot, watch};

use crate::channels::iopub::Iopub;
use crate::python::Executor;
use app::Batch;
use applier::Applier;
use entry::{CellId, Entry, Frames};

pub use app::{replica_app, AppHandle, ReplicaApp};
pub use applier::CellResult;

pub use front::{Front, FrontError};

/// What the core reports to the replica facing Jupyter, which consumes these
/// in order (the core never calls the front).
#[derive(Debug)]
pub enum CoreEvent {
    /// Another replica is down.
    MemberDown { replica: NodeId },
    /// Cells' changes died with the only replica holding them.
    ChangesLost(applier::LostChanges),
    /// Every live replica yielded on a cell.
    Queued { cell: CellId, request: Frames },
    /// iopub messages a peer relayed, to publish; the peer waits for the
    /// receipt's drop, which must come after they are queued on iopub.
    Iopub {
        from: NodeId,
        msgs: Vec<Frames>,
        receipt: raft_transport::Receipt,
    },
    /// `input()` on a peer: ask the front-end.
    InputRequest { from: NodeId, request: Frames },
}

/// Entries between snapshots (a cell is about four), and how many of them stay
/// in the log behind a snapshot: enough for a follower that missed a few
/// seconds to catch up by log, few enough that a joiner's tail is short.
const SNAPSHOT_AFTER_ENTRIES: u64 = 500;
const KEEP_ENTRIES_AFTER_SNAPSHOT: u64 = 200;

/// How long proposals are retried while leadership moves.
const PROPOSE_PATIENCE: Duration = Duration::from_secs(20);

/// The transport settings of a kernel's replicas: a state delta (or a
/// checkpoint) is one blob, as large as what a cell created (a 10 GiB model),
/// so the transport's default 8 GiB cap would refuse it; memory is the limit.
pub fn replica_config(
    identity: raft_transport::NodeIdentity,
    listen: std::net::SocketAddr,
) -> raft_transport::ReplicaConfig {
    let mut config = raft_transport::ReplicaConfig::new(identity, listen);
    config.max_blob_size = 1 << 40;
    // A snapshot is the small group state, so take one often and keep the log
    // short; a follower that lags more than the kept tail catches up by snapshot.
    config.snapshot_after_entries = SNAPSHOT_AFTER_ENTRIES;
    config.keep_entries_after_snapshot = KEEP_ENTRIES_AFTER_SNAPSHOT;
    config
}

/// When a cell's changes reach the other replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// After the reply, in the background, in cell order (the default).
    Background,
    /// Before the reply (`NOTEBOOKOS_SYNC=strict`): a reply means every
    /// replica can have the cell's changes.
    Strict,
}

impl SyncMode {
    pub fn from_env() -> Self {
        match std::env::var("NOTEBOOKOS_SYNC").as_deref() {
            Ok("strict") => Self::Strict,
            Ok("background") | Err(_) => Self::Background,
            Ok(other) => {
                tracing::warn!(
                    value = other,
                    "NOTEBOOKOS_SYNC is 'background' or 'strict'; using background"
                );
                Self::Background
            }
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Background => "background",
            Self::Strict => "strict",
        }
    }
}

/// What every replica runs.
pub struct Core {
    pub id: NodeId,
    kernel_id: String,
    pub node: ReplicaNode,
    exec: Executor,
    iopub: Iopub,
    interrupt: Box<dyn Fn(Option<String>) + Send + Sync>,
    runtime: tokio::runtime::Handle,
    /// The group state as of the last committed entry (ahead of the effects
    /// carried out so far).
    applier: Arc<Mutex<Applier>>,
    effects: Mutex<Option<mpsc::UnboundedReceiver<Batch>>>,
    /// Holds the current namespace (a joiner: once its checkpoint is restored).
    ready: watch::Sender<bool>,
    /// A joiner whose checkpoint and replay are done here: it says so in the
    /// log (`Entry::Restored`) until the log has it.
    restored: std::sync::atomic::AtomicBool,
    /// Cells the front is waiting for.
    waiters: Mutex<HashMap<CellId, oneshot::Sender<CellResult>>>,
    /// Cells submitted here whose result has not come back yet (including
    /// those still waiting for the group to form, which have no id yet).
    submitting: std::sync::atomic::AtomicUsize,
    /// Digest requests of `%notebookos verify` running here.
    digests: Mutex<HashMap<String, mpsc::UnboundedSender<(NodeId, String)>>>,
    /// The last delta blob we made or applied, kept so a replica that joins
    /// mid-way (or missed the push) can fetch it from us.
    recent_blobs: Mutex<std::collections::VecDeque<(BlobHash, u64)>>,
    /// Log index of the last entry whose effects are carried out here.
    applied: std::sync::atomic::AtomicU64,
    /// Cells this replica is running, so a snapshot's `Run` never starts one twice.
    running: Mutex<BTreeSet<CellId>>,
    /// Joiners this replica is admitting (learner, checkpoint, voter) now.
    admitting: Mutex<BTreeSet<NodeId>>,
    /// Where events go on the replica facing Jupyter (`None` on peers).
    events: Option<mpsc::UnboundedSender<CoreEvent>>,
    /// GPU grants this replica holds, per cell it bid to lead.
    gpu: crate::gpu::Grants,
    /// The peer's stdin, answered through the mailbox.
    remote_stdin: OnceLock<Arc<relay::RemoteStdin>>,
    sync_mode: SyncMode,
    /// This replica's cells' changes, in the order they ran, to ship.
    outbound: mpsc::UnboundedSender<deltas::Outbound>,
    replication: Mutex<Option<mpsc::UnboundedReceiver<deltas::Outbound>>>,
    /// Bytes of changes captured here and not yet committed.
    unsynced_bytes: std::sync::atomic::AtomicU64,
    /// How many captured deltas may wait to be committed.
    backlog: Arc<statesync::Backlog>,
    stop: watch::Sender<bool>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere cannot leave these maps half-updated in a way that matters.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct CoreConfig {
    /// The kernel's id (the group's), under which the GPU agent accounts.
    pub kernel_id: String,
    pub node: ReplicaNode,
    pub exec: Executor,
    pub iopub: Iopub,
    pub interrupt: Box<dyn Fn(Option<String>) + Send + Sync>,
    pub joining: bool,
    pub app: AppHandle,
    /// Set on the replica facing Jupyter.
    pub events: Option<mpsc::UnboundedSender<CoreEvent>>,
}

/// Where a replica runs, for `%notebookos`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Place {
    pub pid: u32,
    pub host: Option<String>,
}

impl Core {
    pub fn new(cfg: CoreConfig) -> Arc<Self> {
        let (ready, _) = watch::channel(!cfg.joining);
        let (outbound, replication) = mpsc::unbounded_channel();
        Arc::new(Self {
            id: cfg.node.id(),
            kernel_id: cfg.kernel_id,
            node: cfg.node,
            exec: cfg.exec,
            iopub: cfg.iopub,
            interrupt: cfg.interrupt,
            runtime: tokio::runtime::Handle::current(),
            applier: cfg.app.applier,
            effects: Mutex::new(Some(cfg.app.effects)),
            ready,
            restored: std::sync::atomic::AtomicBool::new(false),
            waiters: Mutex::new(HashMap::new()),
            submitting: std::sync::atomic::AtomicUsize::new(0),
            digests: Mutex::new(HashMap::new()),
            recent_blobs: Mutex::new(std::collections::VecDeque::new()),
            applied: std::sync::atomic::AtomicU64::new(0),
            running: Mutex::new(BTreeSet::new()),
            admitting: Mutex::new(BTreeSet::new()),
            events: cfg.events,
            gpu: crate::gpu::Grants::from_env(),
            remote_stdin: OnceLock::new(),
            sync_mode: SyncMode::from_env(),
            outbound,
            replication: Mutex::new(Some(replication)),
            unsynced_bytes: std::sync::atomic::AtomicU64::new(0),
            backlog: Arc::new(statesync::Backlog::from_env()),
            stop: watch::channel(false).0,
        })
    }

    /// Starts the applier and the mailbox reader.
    pub async fn start(self: &Arc<Self>) {
        // The baseline for the first cell's changes, taken before any cell runs.
        if let Err(e) = self
            .exec
            .run(|_py, k| k.getattr("statesync").map(drop))
            .await
        {
            tracing::error!("cannot start namespace replication: {e}");
        }
        if let Some(effects) = lock(&self.effects).take() {
            tokio::spawn(self.clone().effect_loop(effects));
        }
        if let Some(queue) = lock(&self.replication).take() {
            tokio::spawn(self.clone().replication_loop(queue));
        }
        tokio::spawn(self.clone().reconcile_membership());
        if let Some(inbox) = self.node.take_messages() {
            tokio::spawn(self.clone().mail_loop(inbox));
        }
    }

    /// Tells the front (if this replica is it); a front that is gone is stopping.
    fn emit(&self, event: CoreEvent) -> bool {
        match &self.events {
            Some(tx) => {
                if tx.send(event).is_err() {
                    tracing::debug!("the front is gone; event dropped");
                }
                true
            }
            None => false,
        }
    }

    pub fn front_id(&self) -> NodeId {
        lock(&self.applier).state().front
    }

    fn is_down(&self, replica: NodeId) -> bool {
        lock(&self.applier).state().elections.is_down(replica)
    }

    fn request_of(&self, cell: &str) -> Option<Frames> {
        let applier = lock(&self.applier);
        applier
            .state()
            .elections
            .get(cell)
            .map(|c| c.request.clone())
    }

    /// Resolves once this replica holds the current namespace.
    pub async fn wait_ready(&self) {
        let mut rx = self.ready.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    /// Resolves when the group told this replica to stop.
    pub async fn stopped(&self) {
        let mut rx = self.stop.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    pub fn members(&self) -> BTreeSet<NodeId> {
        let m = self.node.metrics();
        m.voters.union(&m.learners).copied().collect()
    }

    fn is_leader(&self) -> bool {
        self.node.metrics().leader == Some(self.id)
    }

    /// Proposes, retrying while no leader is known or leadership moves.
    /// Every entry is idempotent, so a retry that duplicates one is harmless.
    pub async fn propose(&self, entry: &Entry) -> Result<(), raft_transport::Error> {
        use raft_transport::Error as E;
        let deadline = tokio::time::Instant::now() + PROPOSE_PATIENCE;
        loop {
            match self.node.propose(entry).await {
                Ok(_) => return Ok(()),
                Err(
                    e @ (E::NotLeader { .. }
                    | E::Unreachable { .. }
                    | E::Timeout(_)
                    | E::UnknownPeer(_)),
                ) if tokio::time::Instant::now() < deadline && !*self.stop.borrow() => {
                    tracing::debug!(error = %e, "proposal failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn resolve(&self, cell: &str, result: CellResult) {
        if let Some(tx) = lock(&self.waiters).remove(cell) {
            if tx.send(result).is_err() {
                tracing::debug!(cell, "nobody waits for this cell any more");
            }
        }
    }

    /// Resolves once no replica holds changes the log does not have yet (or
    /// after `patience`, returning false).
    pub async fn wait_synced(&self, patience: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            if lock(&self.applier).state().unsynced.is_empty() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline || *self.stop.borrow() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The running cell's winner, if any (for interrupts).
    pub fn running_on(&self) -> Option<NodeId> {
        lock(&self.applier).state().last_winner
    }
}

/// Counts something in flight (a submitted cell, a request) for as long as
/// it lives.
pub(crate) struct InFlight<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> InFlight<'a> {
    pub(crate) fn new(count: &'a std::sync::atomic::AtomicUsize) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self(count)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}
