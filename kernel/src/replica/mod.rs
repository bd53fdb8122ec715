//! The replicated kernel: every replica is this process's code with its own
//! Python; cells go through the Raft log of a [`raft_transport::ReplicaNode`]
//! group. See docs/architecture.md for the per-cell sequence.
//!
//! * [`entry`]: what goes in the log and in the replicas' mailboxes.
//! * [`election`]: who runs a cell, decided from the log alone.
//! * [`applier`]: the pure state machine over the log: entries in, effects out;
//!   its group state is what a Raft snapshot holds.
//! * `core` (this file): the effects every replica carries out, the winner's
//!   side of a cell, and the hooks the shim calls (`%notebookos`, digests).
//! * `front`: what only the replica facing Jupyter does: proposes requests,
//!   publishes relayed output, supervises the other replicas.
//! * `peer`: the `notebookos-kernel replica` process.
//! * `relay`: a peer's iopub and stdin, carried to the front.
//! * [`group`], [`spawn`]: on-disk group state and starting replicas.
//! * `statesync`: packing namespace deltas and checkpoints.

pub mod applier;
pub mod election;
pub mod entry;
pub mod front;
pub mod group;
pub mod peer;
mod relay;
mod remote;
pub mod spawn;
pub mod statesync;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use pyo3::types::PyAnyMethods;
use raft_transport::{BlobHash, NodeId, ReplicaNode};
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};

use crate::channels::iopub::Iopub;
use crate::python::{Executor, Group};
use crate::wire::Message;
use applier::{Applier, CheckpointRef, DeltaRef, Effect};
use entry::{CellId, Delta, Entry, Frames, Mail};

pub use applier::CellResult;

pub use front::{Front, FrontError};

/// What the core reports to the replica facing Jupyter, which consumes these
/// in order (the core never calls the front).
#[derive(Debug)]
pub enum CoreEvent {
    /// Another replica is down.
    MemberDown { replica: NodeId },
    /// Every live replica yielded on a cell.
    Queued { cell: CellId, request: Frames },
    /// iopub messages a peer relayed, to publish.
    Iopub { from: NodeId, msgs: Vec<Frames> },
    /// `input()` on a peer: ask the front-end.
    InputRequest { from: NodeId, request: Frames },
}

/// How often the leader checks that downed replicas left Raft's membership.
const RECONCILE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

/// Delta blobs each replica keeps after applying them.
const RECENT_BLOBS: usize = 4;
const RECENT_BLOB_BYTES: u64 = 512 << 20;

/// Entries between snapshots (a cell is about four), and how many of them stay
/// in the log behind a snapshot.
const SNAPSHOT_AFTER_ENTRIES: u64 = 1000;
const KEEP_ENTRIES_AFTER_SNAPSHOT: u64 = 500;

/// Deltas up to this size travel inside the log entry; larger ones as blobs.
const INLINE_DELTA: usize = 64 << 10;
/// How often a replica that yielded checks whether it can lead now.
const REBID_INTERVAL: Duration = Duration::from_millis(200);
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

/// The effects of one applied entry (or installed snapshot), at its log index.
struct Batch {
    index: u64,
    effects: Vec<Effect>,
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
    applier: Arc<Mutex<Applier>>,
    effects: mpsc::UnboundedReceiver<Batch>,
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
    fn apply(&mut self, e: raft_transport::CommittedEntry) {
        let effects = match Entry::decode(&e.data) {
            Ok(entry) => {
                tracing::debug!(index = e.index, entry = entry.kind(), "apply");
                lock(&self.applier).apply(e.index, entry)
            }
            Err(err) => {
                tracing::warn!(index = e.index, "skipping log entry: {err}");
                Vec::new()
            }
        };
        self.emit(e.index, effects);
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

/// What every replica runs.
pub struct Core {
    pub id: NodeId,
    kernel_id: String,
    pub node: ReplicaNode,
    exec: Executor,
    iopub: Iopub,
    interrupt: Box<dyn Fn() + Send + Sync>,
    runtime: tokio::runtime::Handle,
    /// The group state as of the last committed entry (ahead of the effects
    /// carried out so far).
    applier: Arc<Mutex<Applier>>,
    effects: Mutex<Option<mpsc::UnboundedReceiver<Batch>>>,
    /// Holds the current namespace (a joiner: once its checkpoint is restored).
    ready: watch::Sender<bool>,
    /// Cells the front is waiting for.
    waiters: Mutex<HashMap<CellId, oneshot::Sender<CellResult>>>,
    /// Digest requests of `%notebookos verify` running here.
    digests: Mutex<HashMap<String, mpsc::UnboundedSender<(NodeId, String)>>>,
    /// The last delta blob we made or applied, kept so a replica that joins
    /// mid-way (or missed the push) can fetch it from us.
    recent_blobs: Mutex<std::collections::VecDeque<(BlobHash, u64)>>,
    /// Log index of the last entry whose effects are carried out here.
    applied: std::sync::atomic::AtomicU64,
    /// Cells this replica is running, so a snapshot's `Run` never starts one twice.
    running: Mutex<BTreeSet<CellId>>,
    /// Where events go on the replica facing Jupyter (`None` on peers).
    events: Option<mpsc::UnboundedSender<CoreEvent>>,
    /// Process and server of each replica, as the front last saw them.
    places: Mutex<HashMap<NodeId, Place>>,
    /// GPU grants this replica holds, per cell it bid to lead.
    gpu: crate::gpu::Grants,
    /// The peer's stdin, answered through the mailbox.
    remote_stdin: OnceLock<Arc<relay::RemoteStdin>>,
    stop: watch::Sender<bool>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere cannot leave these maps half-updated in a way that matters.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct CoreConfig {
    /// The kernel's id (the group's), under which the GPU agent accounts.
    pub kernel_id: String,
    pub node: ReplicaNode,
    pub exec: Executor,
    pub iopub: Iopub,
    pub interrupt: Box<dyn Fn() + Send + Sync>,
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
            waiters: Mutex::new(HashMap::new()),
            digests: Mutex::new(HashMap::new()),
            recent_blobs: Mutex::new(std::collections::VecDeque::new()),
            applied: std::sync::atomic::AtomicU64::new(0),
            running: Mutex::new(BTreeSet::new()),
            events: cfg.events,
            places: Mutex::new(HashMap::new()),
            gpu: crate::gpu::Grants::from_env(),
            remote_stdin: OnceLock::new(),
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

    /// Records where the replicas run (the front, whenever that changes).
    pub fn set_places(&self, places: HashMap<NodeId, Place>) {
        *lock(&self.places) = places;
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
        let data = entry.encode();
        let deadline = tokio::time::Instant::now() + PROPOSE_PATIENCE;
        loop {
            match self.node.propose(data.clone()).await {
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

    /// Catching up, or steered to yield (from the log, never from disk).
    pub(crate) fn must_yield(&self) -> bool {
        lock(&self.applier).must_yield() || !*self.ready.borrow()
    }

    /// Leader: removes from Raft's membership every replica the log has
    /// declared down, and promotes every learner whose checkpoint is in the
    /// log. A change refused because another is in flight, or lost to a
    /// change of leader, is retried here, so a dead voter never lingers to
    /// cost the group its quorum and a caught-up learner always votes.
    async fn reconcile_membership(self: Arc<Self>) {
        let mut stop = self.stop.subscribe();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(RECONCILE_INTERVAL) => {}
                _ = stop.wait_for(|s| *s) => return,
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
        }
    }

    /// Carries out the applier's effects in log order. Those that change the
    /// namespace are awaited, so deltas apply one at a time and in order; the
    /// rest are spawned or quick.
    async fn effect_loop(self: Arc<Self>, mut effects: mpsc::UnboundedReceiver<Batch>) {
        while let Some(batch) = effects.recv().await {
            for effect in batch.effects {
                self.carry_out(effect).await;
            }
            self.applied
                .store(batch.index, std::sync::atomic::Ordering::Release);
            if *self.stop.borrow() {
                return;
            }
        }
    }

    async fn carry_out(self: &Arc<Self>, effect: Effect) {
        match effect {
            Effect::Bid { cell } => {
                tokio::spawn(self.clone().bid(cell));
            }
            Effect::Run { cell, request } => {
                if lock(&self.running).insert(cell.clone()) {
                    tokio::spawn(self.clone().run_cell(cell, request));
                }
            }
            Effect::ReleaseGpus { cell } => {
                self.gpu.release(&cell, std::time::Duration::ZERO).await;
            }
            Effect::Queued { cell, request } => {
                self.emit(CoreEvent::Queued { cell, request });
            }
            Effect::Resolve { cell, result } => self.resolve(&cell, result),
            Effect::ApplyDelta(delta) => {
                if *self.ready.borrow() {
                    self.apply_delta(delta).await;
                }
            }
            Effect::Restore { checkpoint, replay } => self.restore_from(checkpoint, replay).await,
            Effect::DropBlob { blob } => {
                self.node.remove_blob(&BlobHash(blob));
            }
            Effect::AddMember { replica, addr } => {
                if self.is_leader() {
                    tokio::spawn(self.clone().add_member(replica, addr));
                }
            }
            Effect::AnswerVerify { nonce, to } => {
                tokio::spawn(self.clone().answer_verify(nonce, to));
            }
            Effect::MemberDown { replica } => {
                tracing::info!(replica, "replica down");
                // Removal from Raft's membership: `reconcile_membership`.
                self.emit(CoreEvent::MemberDown { replica });
            }
            Effect::Leave { reason } => {
                tracing::error!("{reason}; this replica leaves the group");
                self.leave();
            }
            Effect::Stop { shutdown } => {
                if !shutdown {
                    // Moved away, replaced, or unable to apply a delta.
                    tracing::warn!("this replica was removed from the group; exiting");
                    self.stop.send_replace(true);
                } else if self.events.is_none() {
                    self.stop.send_replace(true);
                }
            }
        }
    }

    /// GPUs the cell of `request` asks for.
    pub(crate) fn gpus_wanted(&self, request: &Frames) -> u32 {
        crate::gpu::wanted(&request_code(request), self.gpu.default_gpus())
    }

    /// Whether `cell` is open and nobody has won it yet.
    pub(crate) fn is_undecided(&self, cell: &str) -> bool {
        lock(&self.applier)
            .state()
            .elections
            .get(cell)
            .is_some_and(|c| c.winner.is_none())
    }

    /// Whether this replica can run `cell` now: not told to yield, not catching
    /// up, and (for a cell that needs GPUs) granted them by the agent; the grant
    /// is then held for the cell until it ends or the election is lost.
    pub(crate) async fn try_lead(self: &Arc<Self>, cell: &str, request: &Frames) -> bool {
        if self.must_yield() {
            return false;
        }
        let wanted = self.gpus_wanted(request);
        if wanted == 0 {
            return true;
        }
        self.gpu
            .acquire(&self.kernel_id, self.id, cell, wanted)
            .await
    }

    async fn bid(self: Arc<Self>, cell: CellId) {
        let Some(request) = self.request_of(&cell) else {
            return;
        };
        let lead = self.try_lead(&cell, &request).await;
        let bid = Entry::Bid {
            cell: cell.clone(),
            replica: self.id,
            lead,
        };
        if let Err(e) = self.propose(&bid).await {
            tracing::warn!(error = %e, "could not bid");
            return;
        }
        if lead {
            return;
        }
        // Yielded: lead as soon as we can, unless someone else does first.
        loop {
            tokio::time::sleep(REBID_INTERVAL).await;
            if !self.is_undecided(&cell) || *self.stop.borrow() {
                return;
            }
            if self.try_lead(&cell, &request).await {
                let bid = Entry::Bid {
                    cell,
                    replica: self.id,
                    lead: true,
                };
                if let Err(e) = self.propose(&bid).await {
                    tracing::warn!(error = %e, "could not bid");
                }
                return;
            }
        }
    }

    /// The winner's side: run, capture what changed, ship it, report Done.
    async fn run_cell(self: Arc<Self>, cell: CellId, request: Frames) {
        let binding = self.gpu.bind(&cell, &self.exec).await;
        let started = std::time::Instant::now();
        let reply = match request.to_message() {
            Ok(msg) => self.execute_here(&msg).await,
            Err(e) => error_reply("BadRequest", &e.to_string()),
        };
        let used = started.elapsed();
        // Device state goes to host memory before it is pickled for the others,
        // and the GPUs go back to the agent: bound only while the cell ran.
        if let Some(binding) = binding {
            binding.unbind(&self.exec).await;
        }
        self.gpu.release(&cell, used).await;
        let code = request_code(&request);
        let t = std::time::Instant::now();
        let packed = match statesync::capture_delta(&self.exec, code).await {
            Ok(p) => p,
            Err(e) => {
                // Other replicas keep the namespace as before this cell.
                tracing::error!("capturing the namespace changes failed: {e}");
                statesync::pack(b"", &[])
            }
        };
        let captured = t.elapsed();
        let bytes = packed.len();
        // Everything the cell printed reaches the front before its Done does.
        self.iopub.flush().await;
        let delta = self.ship_delta(packed).await;
        tracing::debug!(bytes, ?captured, shipped = ?(t.elapsed() - captured), "state delta sent");
        let done = Entry::Done {
            cell: cell.clone(),
            replica: self.id,
            reply,
            delta,
        };
        if let Err(e) = self.propose(&done).await {
            tracing::error!(error = %e, "could not report a finished cell");
        }
        lock(&self.running).remove(&cell);
    }

    async fn execute_here(&self, msg: &Message) -> String {
        match self.exec.call(msg).await {
            Ok(Some(json)) => json,
            Ok(None) => error_reply("KernelError", "execute returned no reply"),
            Err(e) => error_reply("KernelError", &e.to_string()),
        }
    }

    async fn ship_delta(self: &Arc<Self>, packed: Vec<u8>) -> Delta {
        if packed.len() <= INLINE_DELTA {
            return Delta::Inline(Bytes::from(packed));
        }
        let data = Bytes::from(packed);
        let len = data.len() as u64;
        // Kept here too, for a replica that joins mid-way and fetches it; hashing a
        // large delta takes a while, so not on a runtime thread.
        let core = self.clone();
        let published = tokio::task::spawn_blocking({
            let data = data.clone();
            move || core.node.publish_blob(data)
        });
        // To every other replica at once.
        let mut sends = tokio::task::JoinSet::new();
        for peer in self.members().into_iter().filter(|p| *p != self.id) {
            let (core, data) = (self.clone(), data.clone());
            sends.spawn(async move { (peer, core.node.send_blob(peer, data).await) });
        }
        while let Some(sent) = sends.join_next().await {
            if let Ok((peer, Err(e))) = sent {
                // It fetches from us when it applies the entry, or is replaced.
                tracing::warn!(peer, error = %e, "could not push a state delta");
            }
        }
        let hash = match published.await {
            Ok(h) => h,
            Err(_) => BlobHash::of(&data),
        };
        self.keep_recent_blob(hash, len);
        Delta::Blob { hash: hash.0, len }
    }

    /// The bytes of a delta: pushed to us, or fetched from the replica that
    /// made it or, if that one is gone, from any member that kept it. Kept
    /// here in turn until the next delta, for a replica that joins mid-way.
    async fn delta_bytes(&self, from: NodeId, delta: Delta) -> Option<Bytes> {
        let hash = match delta {
            Delta::Inline(b) => return Some(b),
            Delta::Blob { hash, .. } => BlobHash(hash),
        };
        if let Some(b) = self.node.blob(&hash) {
            self.keep_recent_blob(hash, b.len() as u64);
            return Some(b);
        }
        let others = self
            .members()
            .into_iter()
            .filter(|p| *p != self.id && *p != from);
        for peer in std::iter::once(from).chain(others) {
            match self.node.fetch_blob(peer, hash).await {
                Ok(b) => {
                    self.node.publish_blob(b.clone());
                    self.keep_recent_blob(hash, b.len() as u64);
                    return Some(b);
                }
                Err(e) => tracing::warn!(peer, error = %e, "could not fetch a state delta"),
            }
        }
        tracing::error!(from, "state delta unavailable from every member");
        None
    }

    /// Keeps the last few delta blobs fetchable from here (at most
    /// `RECENT_BLOBS`, and past the newest no more than `RECENT_BLOB_BYTES`):
    /// a replica that joins mid-way, or missed a push, may still need one.
    fn keep_recent_blob(&self, hash: BlobHash, len: u64) {
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

    async fn apply_delta(self: &Arc<Self>, delta: DeltaRef) {
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

    /// Our namespace differs from the group's: stop bidding, and ask to be
    /// removed (and so replaced). Through the log rather than by exiting, so that
    /// replicas failing alike leave one at a time and the rest keep a quorum.
    fn leave(self: &Arc<Self>) {
        lock(&self.applier).left();
        self.ready.send_replace(false);
        let core = self.clone();
        tokio::spawn(async move {
            if let Err(e) = core.propose(&Entry::MemberDown { replica: core.id }).await {
                tracing::error!(error = %e, "could not ask to leave the group");
            }
        });
    }

    fn resolve(&self, cell: &str, result: CellResult) {
        if let Some(tx) = lock(&self.waiters).remove(cell) {
            if tx.send(result).is_err() {
                tracing::debug!(cell, "nobody waits for this cell any more");
            }
        }
    }

    /// Leader: bring a new replica in: learner, checkpoint, voter.
    async fn add_member(self: Arc<Self>, replica: NodeId, addr: String) {
        let Ok(sock) = addr.parse() else {
            tracing::warn!(replica, addr, "new replica has an unusable address");
            return;
        };
        if let Err(e) = self.node.add_learner(replica, sock).await {
            tracing::warn!(replica, error = %e, "could not add replica");
            return;
        }
        // Everything applied so far is in the checkpoint; an entry being
        // applied meanwhile may be too, and replaying it is harmless.
        let upto = self.applied.load(std::sync::atomic::Ordering::Acquire);
        let packed = match statesync::checkpoint(&self.exec).await {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(replica, "checkpoint failed: {e}");
                return;
            }
        };
        let data = Bytes::from(packed);
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

    async fn restore_from(self: &Arc<Self>, checkpoint: CheckpointRef, replay: Vec<DeltaRef>) {
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
    }

    async fn answer_verify(self: Arc<Self>, nonce: String, to: NodeId) {
        let digest = match statesync::digest(&self.exec).await {
            Ok(d) => d,
            Err(e) => format!("error: {e}"),
        };
        let mail = Mail::Digest {
            nonce,
            replica: self.id,
            digest,
        };
        if to == self.id {
            self.on_mail(self.id, mail).await;
        } else if let Err(e) = self.node.send_message(to, mail.encode()).await {
            tracing::warn!(to, error = %e, "could not send digest");
        }
    }

    async fn mail_loop(self: Arc<Self>, mut inbox: mpsc::Receiver<(NodeId, Bytes)>) {
        while let Some((from, data)) = inbox.recv().await {
            match Mail::decode(&data) {
                Ok(mail) => self.on_mail(from, mail).await,
                Err(e) => tracing::warn!(from, "dropping mail: {e}"),
            }
        }
    }

    async fn on_mail(self: &Arc<Self>, from: NodeId, mail: Mail) {
        match mail {
            Mail::Iopub(msgs) => {
                if !self.emit(CoreEvent::Iopub { from, msgs }) {
                    tracing::warn!(
                        from,
                        "iopub relayed to a replica that does not face Jupyter"
                    );
                }
            }
            Mail::InputRequest { request } => {
                if !self.emit(CoreEvent::InputRequest { from, request }) {
                    tracing::warn!(
                        from,
                        "input request sent to a replica that does not face Jupyter"
                    );
                }
            }
            Mail::InputReply { value } => match self.remote_stdin.get() {
                Some(stdin) => stdin.answer(value),
                None => tracing::warn!(from, "input reply with no input pending"),
            },
            Mail::Interrupt => (self.interrupt)(),
            Mail::Comm { request } => match request.to_message() {
                Ok(msg) => {
                    if let Err(e) = self.exec.call(&msg).await {
                        tracing::warn!("{} failed: {e}", msg.header.msg_type);
                    }
                    self.iopub.flush().await;
                }
                Err(e) => tracing::warn!(from, "malformed relayed comm message: {e}"),
            },
            Mail::Digest {
                nonce,
                replica,
                digest,
            } => {
                let sent = lock(&self.digests)
                    .get(&nonce)
                    .map(|tx| tx.send((replica, digest)).is_ok());
                if sent != Some(true) {
                    tracing::debug!(from, "a digest arrived after its request ended");
                }
            }
        }
    }

    /// Sends mail to a replica; failures are logged (the receiver may be gone).
    pub async fn mail(&self, to: NodeId, mail: &Mail) {
        if let Err(e) = self.node.send_message(to, mail.encode()).await {
            tracing::warn!(to, error = %e, "could not deliver mail");
        }
    }

    /// The running cell's winner, if any (for interrupts).
    pub fn running_on(&self) -> Option<NodeId> {
        lock(&self.applier).state().last_winner
    }
}

impl Group for Core {
    fn peer_digests(&self) -> Result<Vec<(u64, String)>, String> {
        let nonce = uuid::Uuid::new_v4().to_string();
        let (tx, mut rx) = mpsc::unbounded_channel();
        lock(&self.digests).insert(nonce.clone(), tx);
        let want = self.members().len().saturating_sub(1);
        let entry = Entry::Verify {
            nonce: nonce.clone(),
            from: self.id,
        };
        let result = self.runtime.block_on(async {
            self.propose(&entry).await.map_err(|e| e.to_string())?;
            let mut got = Vec::new();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while got.len() < want {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(d)) => got.push(d),
                    _ => break,
                }
            }
            got.sort();
            Ok(got)
        });
        lock(&self.digests).remove(&nonce);
        result
    }

    fn placement(&self) -> String {
        let m = self.node.metrics();
        let front = self.front_id();
        let places = lock(&self.places).clone();
        let replicas: Vec<_> = m
            .voters
            .iter()
            .map(|id| (id, "voter"))
            .chain(m.learners.iter().map(|id| (id, "catching up")))
            .map(|(id, state)| {
                json!({
                    "id": id,
                    "role": if *id == front { "talks to Jupyter" } else { "peer" },
                    "state": state,
                    "leader": m.leader == Some(*id),
                    "pid": places.get(id).map(|p| p.pid),
                    "host": places.get(id).and_then(|p| p.host.clone()),
                })
            })
            .collect();
        let usage = self.runtime.block_on(async {
            let status =
                tokio::time::timeout(Duration::from_secs(1), self.gpu.agent_status()).await;
            match status {
                Ok(Some(s)) => s.usage.get(&self.kernel_id).cloned(),
                _ => None,
            }
        });
        json!({
            "self": self.id,
            "front": front,
            "replicas": replicas,
            "last_winner": self.running_on(),
            "gpu_usage": usage,
        })
        .to_string()
    }
}

fn error_reply(ename: &str, evalue: &str) -> String {
    json!({"status": "error", "ename": ename, "evalue": evalue, "traceback": [], "execution_count": 0})
        .to_string()
}

fn request_code(request: &Frames) -> String {
    serde_json::from_str::<serde_json::Value>(&request.content)
        .ok()
        .and_then(|c| c.get("code").and_then(|c| c.as_str()).map(str::to_owned))
        .unwrap_or_default()
}
