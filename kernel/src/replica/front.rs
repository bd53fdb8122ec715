//! What only the replica facing Jupyter does: forms (or rejoins) the group,
//! proposes the client's requests, publishes what the winner relays, answers
//! relayed `input()`, and replaces replicas that die.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use raft_transport::{KernelCa, NodeId, ReplicaNode};

use super::entry::{Entry, Frames, Mail};
use super::group::{self, Bootstrap, GroupError, GroupState, Member, StateDir};
use super::remote::ClusterPlacement;
use super::spawn::{self, AdoptedProcess, LocalSpawner, ReplicaProcess, Spawner};
use super::{lock, Core, CoreConfig};
use crate::channels::iopub::Iopub;
use crate::channels::Session;
use crate::python::{Executor, InputChannel};

/// How long a starting replica may take to listen (Python and IPython load first).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A replica process this replica started, and its id.
type Launched = (NodeId, Box<dyn ReplicaProcess>);
const SUPERVISE_INTERVAL: Duration = Duration::from_millis(200);
/// How long a restarted front keeps asking the survivors to take each of its
/// two entries (the old front down, itself in): they may first have to elect a
/// leader among themselves, which is slow on a loaded host.
const REJOIN_PATIENCE: Duration = Duration::from_secs(60);
/// How often a kernel between cells checks that one of its servers could
/// run its next cell now (`Front::rebalance`).
const REBALANCE_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum FrontError {
    #[error(transparent)]
    Group(#[from] GroupError),
    #[error("replica group: {0}")]
    Transport(#[from] raft_transport::Error),
    #[error("no surviving replica accepted this one back: {0}")]
    Rejoin(String),
}

/// Decided before Python starts: whether we rejoin survivors, and the hash seed.
pub struct Plan {
    state: StateDir,
    prior: Option<GroupState>,
    pub hash_seed: u32,
    replicas: usize,
}

/// The group this connection file's kernel left replicas of, if any is alive.
fn surviving_group(state: &StateDir) -> Option<GroupState> {
    match state.load() {
        Ok(p) => p.filter(|g| {
            g.members
                .iter()
                .any(|m| m.id != g.front && m.may_be_alive())
        }),
        Err(e) => {
            tracing::warn!("ignoring unreadable replica state: {e}");
            None
        }
    }
}

/// Every replica hashes strings alike: the survivors' seed when rejoining
/// them, else the one this process's Python was started with, else a new one.
fn hash_seed(prior: Option<&GroupState>) -> u32 {
    let from_env = || std::env::var("PYTHONHASHSEED").ok()?.trim().parse().ok();
    match prior {
        Some(g) => g.hash_seed,
        None => from_env().unwrap_or_else(|| {
            u32::from_le_bytes(
                uuid::Uuid::new_v4().as_bytes()[..4]
                    .try_into()
                    .unwrap_or([0; 4]),
            )
        }),
    }
}

/// The hash seed a kernel started with this connection file will give its
/// replicas, read before anything starts: a Python that runs the kernel
/// inside itself must have been started with it (see `python -m notebookos`).
pub fn hash_seed_for(connection_file: &Path) -> Result<u32, FrontError> {
    let state = StateDir::for_connection(connection_file)?;
    Ok(hash_seed(surviving_group(&state).as_ref()))
}

impl Plan {
    /// Whether this kernel rejoins replicas a previous one left running.
    pub fn rejoins(&self) -> bool {
        self.prior.is_some()
    }

    pub fn new(connection_file: &Path, replicas: usize) -> Result<Self, FrontError> {
        let state = StateDir::for_connection(connection_file)?;
        let prior = surviving_group(&state);
        if prior.is_none() {
            // Stale state from a kernel whose replicas are all gone.
            state.remove();
        }
        let state = StateDir::for_connection(connection_file)?;
        let hash_seed = hash_seed(prior.as_ref());
        Ok(Self {
            state,
            prior,
            hash_seed,
            replicas,
        })
    }
}

pub struct FrontOptions {
    pub exec: Executor,
    pub iopub: Iopub,
    pub stdin: Arc<dyn InputChannel>,
    pub session: Arc<Session>,
    pub interrupt: Box<dyn Fn(Option<String>) + Send + Sync>,
    pub argv: Vec<String>,
    pub listen_ip: String,
}

pub struct Front {
    core: Arc<Core>,
    iopub: Iopub,
    stdin: Arc<dyn InputChannel>,
    session: Arc<Session>,
    state: StateDir,
    group: Mutex<GroupState>,
    processes: Mutex<BTreeMap<NodeId, Box<dyn ReplicaProcess>>>,
    spawner: LocalSpawner,
    /// Set when the kernel's replicas go to a cluster's servers.
    cluster: Option<ClusterPlacement>,
    /// Which replica owns each comm (the one whose Python opened it).
    comm_owners: Mutex<HashMap<String, NodeId>>,
    /// What the user must hear of lost changes, told under the next cell
    /// (a log index each, so a loss heard twice is told once).
    losses: Mutex<BTreeMap<u64, String>>,
    losses_told: Mutex<std::collections::BTreeSet<u64>>,
    argv: Vec<String>,
    /// Where and with which environment replicas start: see [`Bootstrap::cwd`].
    launch: (Option<PathBuf>, Option<Vec<(String, String)>>),
    listen_ip: String,
    replicas: usize,
    stopping: AtomicBool,
    /// Held while a replica moves (a migration or a rebalancing move), so
    /// that two moves never pick the same replica or overlap.
    moves: tokio::sync::Mutex<()>,
}

impl Front {
    /// Forms the group (or rejoins the survivors).
    pub async fn start(plan: Plan, opts: FrontOptions) -> Result<Arc<Self>, FrontError> {
        let program =
            crate::program::Program::current().map_err(|e| GroupError::Start(e.to_string()))?;
        let (ca, mut gstate) = match &plan.prior {
            Some(g) => (
                KernelCa::from_pem(&g.kernel_id, &g.ca_pem).map_err(GroupError::from)?,
                g.clone(),
            ),
            None => {
                let kernel_id = uuid::Uuid::new_v4().to_string();
                let ca = KernelCa::generate(&kernel_id).map_err(GroupError::from)?;
                let g = GroupState {
                    kernel_id: kernel_id.clone(),
                    ca_pem: ca.to_pem(),
                    hash_seed: plan.hash_seed,
                    front: 1,
                    members: Vec::new(),
                    next_id: 1,
                };
                (ca, g)
            }
        };
        let me = gstate.next_id;
        gstate.next_id += 1;
        let identity = ca.issue_identity(me).map_err(GroupError::from)?;
        let cluster = ClusterPlacement::from_env(plan.hash_seed)?;
        let listen_ip = match &cluster {
            // Peers on other servers must reach us: this server's address.
            Some(c) => c.ip()?.to_string(),
            None => opts.listen_ip,
        };
        let listen: SocketAddr = format!("{listen_ip}:0")
            .parse()
            .map_err(|e| GroupError::Start(format!("replica listen address: {e}")))?;
        let rejoin = plan.prior.is_some();
        let (app, handle) = super::replica_app(me, me, rejoin);
        let node = ReplicaNode::start(super::replica_config(identity, listen), app).await?;
        let my_addr = node.addr().to_string();
        let old_front = gstate.front;

        let (events, events_rx) = tokio::sync::mpsc::unbounded_channel();
        let core = Core::new(CoreConfig {
            kernel_id: gstate.kernel_id.clone(),
            node,
            exec: opts.exec,
            iopub: opts.iopub.clone(),
            interrupt: opts.interrupt,
            joining: rejoin,
            app: handle,
            events: Some(events),
        });
        let front = Arc::new(Front {
            core: core.clone(),
            iopub: opts.iopub,
            stdin: opts.stdin,
            session: opts.session,
            state: plan.state.clone(),
            group: Mutex::new(gstate.clone()),
            processes: Mutex::new(BTreeMap::new()),
            spawner: LocalSpawner {
                state: plan.state.clone(),
                program,
                hash_seed: plan.hash_seed,
                env: Vec::new(),
            },
            cluster,
            comm_owners: Mutex::new(HashMap::new()),
            losses: Mutex::new(BTreeMap::new()),
            losses_told: Mutex::new(std::collections::BTreeSet::new()),
            argv: opts.argv,
            launch: group::launch_context(),
            listen_ip,
            replicas: plan.replicas,
            stopping: AtomicBool::new(false),
            moves: tokio::sync::Mutex::new(()),
        });
        // With a core for each replica, local peers start now, loading their
        // interpreters while ours finishes loading IPython (which
        // `core.start` waits for); with fewer, that would only slow ours.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let early = !rejoin && cores > plan.replicas;
        let mut launched = match early {
            true => front.launch_local_peers(&ca)?,
            false => Vec::new(),
        };
        core.start().await;
        if !rejoin && !early {
            launched = front.launch_local_peers(&ca)?;
        }
        tokio::spawn(front.clone().serve_events(events_rx));

        if rejoin {
            front.rejoin(old_front, &my_addr).await?;
        } else {
            front.form(&ca, &my_addr, launched).await?;
        }
        if let Some(cluster) = &front.cluster {
            cluster.register(&gstate.kernel_id, core.id).await?;
        }
        tokio::spawn(front.clone().supervise(ca));
        if front.cluster.is_some() {
            tokio::spawn(front.clone().rebalance());
        }
        Ok(front)
    }

    /// This replica's core.
    pub fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// Runs a cell through the group; losses of earlier cells' changes are
    /// told under it first (and those found while it ran, after it).
    pub async fn execute(
        &self,
        request: &crate::wire::Message,
        control: Option<&crate::wire::Message>,
    ) -> Result<super::CellResult, raft_transport::Error> {
        let frames = Frames::from_message(request);
        self.tell_losses(&frames).await;
        let result = self.core.execute(request, control, None).await;
        self.tell_losses(&frames).await;
        result
    }

    fn note_loss(&self, lost: &super::applier::LostChanges) {
        if lock(&self.losses_told).contains(&lost.index) {
            return;
        }
        let text = loss_notice(lost);
        tracing::warn!("{}", text.trim_end());
        lock(&self.losses).insert(lost.index, text);
    }

    async fn tell_losses(&self, request: &Frames) {
        let pending = std::mem::take(&mut *lock(&self.losses));
        for (index, text) in pending {
            lock(&self.losses_told).insert(index);
            self.tell(request, &text).await;
        }
    }

    /// What the core reports, in order.
    async fn serve_events(
        self: Arc<Self>,
        mut events: tokio::sync::mpsc::UnboundedReceiver<super::CoreEvent>,
    ) {
        use super::CoreEvent;
        while let Some(event) = events.recv().await {
            match event {
                CoreEvent::MemberDown { replica } => {
                    lock(&self.comm_owners).retain(|_, owner| *owner != replica);
                }
                CoreEvent::ChangesLost(lost) => self.note_loss(&lost),
                CoreEvent::Queued { cell, request } => self.report_queued(&cell, &request).await,
                CoreEvent::Iopub {
                    from,
                    msgs,
                    receipt,
                } => {
                    self.publish_relayed(from, msgs).await;
                    drop(receipt);
                }
                CoreEvent::InputRequest { from, request } => self.relay_input(from, request),
            }
        }
    }

    /// Starts the group's other replicas as processes of this host (none
    /// when a cluster places them).
    fn launch_local_peers(&self, ca: &KernelCa) -> Result<Vec<Launched>, FrontError> {
        if self.cluster.is_some() {
            return Ok(Vec::new());
        }
        (1..self.replicas).map(|_| self.launch(ca, false)).collect()
    }

    async fn form(
        &self,
        ca: &KernelCa,
        my_addr: &str,
        started: Vec<Launched>,
    ) -> Result<(), FrontError> {
        let core = &self.core;
        let mut members = BTreeMap::new();
        members.insert(
            core.id,
            my_addr
                .parse()
                .map_err(|e| GroupError::Start(format!("{e}")))?,
        );
        if let Some(cluster) = &self.cluster {
            let mut in_use = vec![cluster.me.clone()];
            let kernel_id = lock(&self.group).kernel_id.clone();
            // If it still lacks room, the start below says so.
            cluster
                .wait_for_room(&kernel_id, &in_use, self.replicas.saturating_sub(1))
                .await;
            for _ in 1..self.replicas {
                let (id, bootstrap) = self.bootstrap(ca, false)?;
                let (server, process, addr) = cluster.start(bootstrap, &in_use).await?;
                in_use.push(server);
                members.insert(id, parse_addr(id, &addr)?);
                self.adopt(id, addr, process);
            }
        }
        for (id, process) in started {
            let addr =
                spawn::wait_for_addr(&self.state, id, process.as_ref(), START_TIMEOUT).await?;
            members.insert(id, parse_addr(id, &addr)?);
            self.adopt(id, addr, process);
        }
        {
            let mut g = lock(&self.group);
            g.front = core.id;
            g.members.push(Member {
                id: core.id,
                addr: my_addr.to_owned(),
                pid: std::process::id(),
                host: self.cluster.as_ref().map(|c| c.me.clone()),
            });
            g.members.sort_by_key(|m| m.id);
        }
        self.save();
        core.node.initialize(members).await?;
        core.node.wait_for_leader(Duration::from_secs(10)).await?;
        Ok(())
    }

    /// Jupyter restarted us after replica 1 died: join the survivors, drop the dead front.
    async fn rejoin(&self, old_front: NodeId, my_addr: &str) -> Result<(), FrontError> {
        let core = &self.core;
        let survivors: Vec<Member> = {
            let g = lock(&self.group);
            g.members
                .iter()
                .filter(|m| m.id != old_front && m.may_be_alive())
                .cloned()
                .collect()
        };
        let join = Entry::MemberJoin {
            replica: core.id,
            addr: my_addr.to_owned(),
            front: true,
        };
        let down = Entry::MemberDown { replica: old_front };
        for entry in [down, join] {
            propose_via_any(&core.node, &survivors, &entry).await?;
        }
        let kernel_id = lock(&self.group).kernel_id.clone();
        for m in &survivors {
            let process: Box<dyn ReplicaProcess> = match (&m.host, &self.cluster) {
                (Some(server), Some(cluster)) => {
                    Box::new(cluster.adopt(server.clone(), kernel_id.clone(), m.id, m.pid))
                }
                _ => Box::new(AdoptedProcess { pid: m.pid }),
            };
            self.adopt(m.id, m.addr.clone(), process);
        }
        {
            let mut g = lock(&self.group);
            g.front = core.id;
            g.members.retain(|m| m.id != old_front);
            g.members.push(Member {
                id: core.id,
                addr: my_addr.to_owned(),
                pid: std::process::id(),
                host: self.cluster.as_ref().map(|c| c.me.clone()),
            });
        }
        self.save();
        tracing::info!(
            id = core.id,
            "rejoined the replica group; waiting for a checkpoint"
        );
        Ok(())
    }

    fn launch(
        &self,
        ca: &KernelCa,
        joining: bool,
    ) -> Result<(NodeId, Box<dyn ReplicaProcess>), FrontError> {
        let (id, bootstrap) = self.bootstrap(ca, joining)?;
        let process = self.spawner.spawn(&bootstrap)?;
        Ok((id, process))
    }

    /// A new replica's id and what it starts from.
    fn bootstrap(&self, ca: &KernelCa, joining: bool) -> Result<(NodeId, Bootstrap), FrontError> {
        let (id, front) = {
            let mut g = lock(&self.group);
            let id = g.next_id;
            g.next_id += 1;
            (id, g.front)
        };
        self.save();
        let identity = ca.issue_identity(id).map_err(GroupError::from)?;
        let mut argv = self.argv.clone();
        // The front's history holds every cell (stored when deltas are applied); a
        // second writer to the same history file would duplicate them. Disabled
        // rather than moved to `:memory:`, so `hist_file` reads as the user set it.
        argv.push("--HistoryManager.enabled=False".into());
        let (cwd, env) = self.launch.clone();
        let bootstrap = Bootstrap {
            cwd,
            env,
            id,
            kernel_id: lock(&self.group).kernel_id.clone(),
            identity_pem: identity.to_pem(),
            front,
            joining,
            addr_file: self.state.addr_file(id),
            argv,
            listen: format!("{}:0", self.listen_ip),
        };
        Ok((id, bootstrap))
    }

    /// The servers this kernel's live replicas use.
    fn hosts_in_use(&self, cluster: &ClusterPlacement) -> Vec<String> {
        let mut hosts: Vec<String> = lock(&self.processes)
            .values()
            .filter(|p| p.alive())
            .filter_map(|p| p.host())
            .collect();
        hosts.push(cluster.me.clone());
        hosts
    }

    fn adopt(&self, id: NodeId, addr: String, process: Box<dyn ReplicaProcess>) {
        let pid = process.pid();
        let host = process.host();
        lock(&self.processes).insert(id, process);
        let mut g = lock(&self.group);
        g.members.retain(|m| m.id != id);
        g.members.push(Member {
            id,
            addr,
            pid,
            host,
        });
        g.members.sort_by_key(|m| m.id);
    }

    fn save(&self) {
        if self.stopping.load(Ordering::Relaxed) {
            return;
        }
        let g = lock(&self.group).clone();
        if let Err(e) = self.state.save(&g) {
            tracing::warn!("cannot save replica state: {e}");
        }
    }

    /// Replaces replicas whose process is gone.
    async fn supervise(self: Arc<Self>, ca: KernelCa) {
        let core = self.core.clone();
        loop {
            tokio::time::sleep(SUPERVISE_INTERVAL).await;
            if self.stopping.load(Ordering::Relaxed) {
                return;
            }
            let dead: Vec<NodeId> = lock(&self.processes)
                .iter()
                .filter(|(_, p)| !p.alive())
                .map(|(id, _)| *id)
                .collect();
            for id in dead {
                lock(&self.processes).remove(&id);
                tracing::warn!(replica = id, "replica process is gone; replacing it");
                if let Err(e) = core.propose(&Entry::MemberDown { replica: id }).await {
                    tracing::error!(replica = id, error = %e, "could not report a dead replica");
                }
                lock(&self.group).members.retain(|m| m.id != id);
                self.save();
                if let Err(e) = self.replace(&ca).await {
                    tracing::error!("could not start a replacement replica: {e}");
                }
            }
        }
    }

    async fn replace(&self, ca: &KernelCa) -> Result<(), FrontError> {
        if self.stopping.load(Ordering::Relaxed) {
            return Ok(());
        }
        let (id, process, addr) = match &self.cluster {
            Some(cluster) => {
                let in_use = self.hosts_in_use(cluster);
                let (id, bootstrap) = self.bootstrap(ca, true)?;
                let (_, process, addr) = cluster.start(bootstrap, &in_use).await?;
                (id, process, addr)
            }
            None => {
                let (id, process) = self.launch(ca, true)?;
                let addr =
                    spawn::wait_for_addr(&self.state, id, process.as_ref(), START_TIMEOUT).await?;
                (id, process, addr)
            }
        };
        self.join(id, addr, process).await
    }

    /// Takes a started replica into the group: it then catches up from a
    /// checkpoint the leader sends.
    async fn join(
        &self,
        id: NodeId,
        addr: String,
        process: Box<dyn ReplicaProcess>,
    ) -> Result<(), FrontError> {
        self.adopt(id, addr.clone(), process);
        self.save();
        self.core
            .propose(&Entry::MemberJoin {
                replica: id,
                addr,
                front: false,
            })
            .await?;
        Ok(())
    }

    /// Clean shutdown: the replicas exit, their state goes. A
    /// shutdown_request stops the group before the kernel's own exit does;
    /// the second call has nothing left to do.
    pub async fn stop(&self) {
        let core = &self.core;
        if self.stopping.swap(true, Ordering::AcqRel) {
            return;
        }
        match tokio::time::timeout(Duration::from_secs(1), core.propose(&Entry::Shutdown)).await {
            Ok(Ok(())) => {}
            // The replicas are killed below either way.
            Ok(Err(e)) => tracing::warn!("could not tell the replicas to shut down: {e}"),
            Err(_) => tracing::warn!("the shutdown entry did not commit within 1 s"),
        }
        let processes: Vec<_> = std::mem::take(&mut *lock(&self.processes))
            .into_values()
            .collect();
        tokio::task::spawn_blocking(move || {
            // Give them a moment to exit on the Shutdown entry, then make sure.
            std::thread::sleep(Duration::from_millis(300));
            for p in processes {
                p.kill();
            }
        })
        .await
        .ok();
        self.state.remove();
        core.stop.send_replace(true);
        if let Err(e) = core.node.shutdown().await {
            tracing::debug!("replica shutdown: {e}");
        }
    }

    /// Every replica yielded: the user is told, and in a cluster one replica
    /// moves to a server with free GPUs if the cell still waits after
    /// `migrate_after`.
    async fn report_queued(self: &Arc<Self>, cell: &str, request: &Frames) {
        self.tell(
            request,
            "notebookos: no replica can run this cell now; it is queued until one can\n",
        )
        .await;
        if self.cluster.is_some() {
            let gpus = self.core.gpus_wanted(request);
            tokio::spawn(
                self.clone()
                    .migrate_for(cell.to_owned(), request.clone(), gpus),
            );
        }
    }

    /// A line on stderr under the cell's request.
    async fn tell(&self, request: &Frames, text: &str) {
        let parent = request.to_message().ok().map(|m| m.header);
        self.iopub.stream(parent, "stderr", text).await;
    }

    /// Moves one replica to the server the policy picks (idle GPUs, room),
    /// so `cell` runs there: the new replica joins and catches up from a
    /// checkpoint, then bids; the old one leaves. Replica 1 stays where
    /// Jupyter runs it.
    async fn migrate_for(self: Arc<Self>, cell: String, request: Frames, gpus: u32) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        let core = &self.core;
        tokio::time::sleep(cluster.migrate_after()).await;
        let _moving = self.moves.lock().await;
        // A rebalancing move that held the lock may have let the cell run.
        if !core.is_undecided(&cell) || self.stopping.load(Ordering::Relaxed) {
            return;
        }
        let (hosts, movable) = self.live_hosts();
        let plan = match cluster.plan_migration(gpus, &hosts, &movable).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(cell, "no migration: {e}");
                return;
            }
        };
        let Some(&(from_id, _)) = hosts
            .iter()
            .find(|(id, h)| *id != core.id && *h == plan.from)
        else {
            return;
        };
        self.tell(
            &request,
            &format!(
                "notebookos: migrating replica {from_id} from {} to {}, which has {gpus} free GPU(s), to run this cell\n",
                plan.from, plan.to
            ),
        )
        .await;
        if let Err(e) = self.move_replica(cluster, from_id, &plan.to).await {
            tracing::warn!(cell, "migration failed: {e}");
        }
    }

    /// Between cells, moves a replica off servers none of which could run
    /// the kernel's next cell now (every GPU taken by other kernels) to one
    /// that can, so that cell does not wait for a migration with the user
    /// watching ([`crate::cluster::policy::Policy::rebalance`]; the
    /// simulator models the same). The condition must hold at two checks in
    /// a row: GPUs freed a moment later are not worth moving a replica's
    /// state for.
    async fn rebalance(self: Arc<Self>) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        let mut blocked_before = false;
        loop {
            tokio::time::sleep(REBALANCE_EVERY).await;
            if self.stopping.load(Ordering::Relaxed) {
                return;
            }
            if !self.settled() {
                blocked_before = false;
                continue;
            }
            let (hosts, movable) = self.live_hosts();
            if hosts.len() < self.replicas {
                // A replacement is on its way: the group is not settled.
                blocked_before = false;
                continue;
            }
            let Some(plan) = cluster.plan_rebalance(&hosts, &movable).await else {
                blocked_before = false;
                continue;
            };
            if !blocked_before {
                blocked_before = true;
                continue;
            }
            blocked_before = false;
            let Ok(_moving) = self.moves.try_lock() else {
                continue; // a migration is under way
            };
            let Some(&(from_id, _)) = hosts
                .iter()
                .find(|(id, h)| *id != self.core.id && *h == plan.from)
            else {
                continue;
            };
            if !self.settled() || self.live_hosts().0 != hosts {
                continue; // a cell came, or the group changed, meanwhile
            }
            tracing::info!(
                replica = from_id,
                from = %plan.from,
                to = %plan.to,
                "moving a replica ahead of the next cell: no server of this kernel has its GPUs idle"
            );
            if let Err(e) = self.move_replica(cluster, from_id, &plan.to).await {
                tracing::warn!("rebalancing move failed: {e}");
            }
        }
    }

    /// Between cells with nothing in flight: no cell open or submitted, and
    /// every replica holding every change (a move must not take away the
    /// only copy of a cell's changes).
    fn settled(&self) -> bool {
        self.core.between_cells() && !self.core.has_submissions() && self.core.changes_synced()
    }

    /// The members whose process runs (with their servers), and the servers
    /// of those that may move (all but this one, where Jupyter runs it).
    fn live_hosts(&self) -> (Vec<(NodeId, String)>, Vec<String>) {
        let hosts: Vec<(NodeId, String)> = {
            let processes = lock(&self.processes);
            lock(&self.group)
                .members
                .iter()
                .filter(|m| m.id == self.core.id || processes.get(&m.id).is_some_and(|p| p.alive()))
                .filter_map(|m| Some((m.id, m.host.clone()?)))
                .collect()
        };
        let movable = hosts
            .iter()
            .filter(|(id, _)| *id != self.core.id)
            .map(|(_, h)| h.clone())
            .collect();
        (hosts, movable)
    }

    async fn move_replica(
        &self,
        cluster: &ClusterPlacement,
        from_id: NodeId,
        to: &str,
    ) -> Result<(), FrontError> {
        let ca = {
            let g = lock(&self.group);
            KernelCa::from_pem(&g.kernel_id, &g.ca_pem).map_err(GroupError::from)?
        };
        let (id, bootstrap) = self.bootstrap(&ca, true)?;
        let (process, addr) = cluster.start_on(bootstrap, to).await?;
        self.join(id, addr, process).await?;
        // The newcomer holds the state once its checkpoint is in; the group
        // keeps a quorum meanwhile (two voters of three, plus the learner).
        self.core
            .propose(&Entry::MemberDown { replica: from_id })
            .await?;
        if let Some(old) = lock(&self.processes).remove(&from_id) {
            tokio::task::spawn_blocking(move || old.kill());
        }
        lock(&self.group).members.retain(|m| m.id != from_id);
        self.save();
        Ok(())
    }

    /// A front-end's message on a comm, served by the replica whose Python
    /// holds the comm (learnt from its relayed `comm_open`; this one's own
    /// otherwise). Between cells it goes through the log as a request only
    /// that replica runs: in order with the cells around it, and what its
    /// handler changes (a widget's value) replicated as a cell's changes
    /// are. Beside a running cell, which may be awaiting it, it is mailed
    /// at once instead; `false` means it is this replica's to serve now.
    pub async fn comm(&self, request: &crate::wire::Message, beside_cell: bool) -> bool {
        let owner = request
            .content
            .get("comm_id")
            .and_then(|c| c.as_str())
            .and_then(|id| lock(&self.comm_owners).get(id).copied())
            .unwrap_or(self.core.id);
        if beside_cell {
            if owner == self.core.id {
                return false;
            }
            let mail = Mail::Comm {
                request: Frames::from_message(request),
            };
            let core = self.core.clone();
            tokio::spawn(async move { core.mail(owner, &mail).await });
            return true;
        }
        match self.core.execute(request, None, Some(owner)).await {
            Ok(super::CellResult::Reply(_)) => {}
            Ok(super::CellResult::Lost { replica }) => tracing::warn!(
                replica,
                "a comm message was dropped: the replica holding its comm is gone"
            ),
            Err(e) => tracing::warn!(error = %e, "a comm message was dropped"),
        }
        true
    }

    async fn publish_relayed(&self, from: NodeId, msgs: Vec<Frames>) {
        for frames in msgs {
            let mut msg = match frames.to_outgoing() {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(from, "dropping malformed relayed message: {e}");
                    continue;
                }
            };
            msg.header.session = self.session.id.clone();
            let comm_id = msg
                .content
                .get("comm_id")
                .and_then(|c| c.as_str())
                .map(str::to_owned);
            match (msg.header.msg_type.as_str(), comm_id) {
                ("comm_open", Some(id)) => {
                    lock(&self.comm_owners).insert(id, from);
                }
                ("comm_close", Some(id)) => {
                    lock(&self.comm_owners).remove(&id);
                }
                _ => {}
            }
            self.iopub.publish(msg).await;
        }
    }

    /// A replica's `input()`: ask the front-end on stdin, mail the answer back.
    fn relay_input(&self, from: NodeId, request: Frames) {
        let stdin = self.stdin.clone();
        let core = self.core.clone();
        tokio::task::spawn_blocking(move || {
            let Ok(msg) = request.to_outgoing() else {
                tracing::warn!(from, "malformed relayed input request");
                return;
            };
            let prompt = msg
                .content
                .get("prompt")
                .and_then(|p| p.as_str())
                .unwrap_or("")
                .to_owned();
            let password = msg
                .content
                .get("password")
                .and_then(|p| p.as_bool())
                .unwrap_or(false);
            let rx = stdin.request(
                &msg.identities,
                msg.parent_header.as_ref(),
                prompt,
                password,
            );
            // An interrupted input on the winner is cancelled there; the front-end's
            // late answer is then mailed to a waiter that is gone, which is harmless.
            let Ok(value) = rx.recv() else {
                return;
            };
            let rt = core.runtime.clone();
            rt.block_on(core.mail(from, &Mail::InputReply { value }));
        });
    }
}

/// What the shim asks of the group, answered with what the front knows of
/// the replicas' processes and servers.
impl crate::python::Group for Front {
    fn peer_digests(&self) -> Result<Vec<(u64, String)>, String> {
        self.core.peer_digests()
    }

    fn placement(&self) -> String {
        let places = lock(&self.group)
            .members
            .iter()
            .map(|m| {
                let place = super::Place {
                    pid: m.pid,
                    host: m.host.clone(),
                };
                (m.id, place)
            })
            .collect();
        self.core.placement_with(&places)
    }
}

/// What the user reads when changes died with their only holder: which
/// cells, and what the namespace is now.
fn loss_notice(lost: &super::applier::LostChanges) -> String {
    let cells: Vec<String> = lost
        .cells
        .iter()
        .map(|u| match (u.execution_count, u.comm) {
            (_, true) => "a widget change from the front-end".into(),
            (Some(n), false) => format!("In [{n}]"),
            (None, false) => "a cell without an execution count".into(),
        })
        .collect();
    let first = lost
        .cells
        .first()
        .filter(|u| !u.comm)
        .and_then(|u| u.execution_count);
    let now = match first {
        Some(n) if n > 1 => format!("as it was after In [{}]", n - 1),
        Some(_) => "as it was before In [1]".into(),
        None => "as it was before those changes".into(),
    };
    let redo = match (lost.cells.iter().all(|u| u.comm), cells.len()) {
        (true, _) => "Move those widgets again",
        (false, 1) => "Re-run that cell",
        (false, _) => "Re-run those cells",
    };
    format!(
        "notebookos: replica {} was lost before the changes of {} reached another replica; \
         those changes are lost and the namespace is {now}. {redo} to restore them.\n",
        lost.replica,
        cells.join(", "),
    )
}

/// Proposes through any reachable survivor, following leader hints.
async fn propose_via_any(
    node: &ReplicaNode,
    survivors: &[Member],
    entry: &Entry,
) -> Result<(), FrontError> {
    let deadline = tokio::time::Instant::now() + REJOIN_PATIENCE;
    let mut last = String::from("no survivors");
    while tokio::time::Instant::now() < deadline {
        for m in survivors {
            match node.propose_via(m.id, &m.addr, entry).await {
                Ok(_) => return Ok(()),
                Err(e) => last = e.to_string(),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(FrontError::Rejoin(last))
}

fn parse_addr(id: NodeId, addr: &str) -> Result<SocketAddr, FrontError> {
    addr.parse()
        .map_err(|e| GroupError::Start(format!("replica {id} address {addr}: {e}")).into())
}

pub fn default_listen_ip() -> String {
    std::env::var("NOTEBOOKOS_REPLICA_IP").unwrap_or_else(|_| "127.0.0.1".into())
}

#[cfg(test)]
mod tests {
    use super::super::applier::{LostChanges, Unsynced};
    use super::loss_notice;

    fn lost(cells: &[(Option<i64>, bool)]) -> LostChanges {
        LostChanges {
            index: 9,
            replica: 2,
            cells: cells
                .iter()
                .map(|&(execution_count, comm)| Unsynced {
                    cell: "c".into(),
                    replica: 2,
                    execution_count,
                    comm,
                })
                .collect(),
        }
    }

    #[test]
    fn a_loss_notice_names_the_cells_and_the_widget_changes_lost() {
        assert_eq!(
            loss_notice(&lost(&[(Some(4), false), (Some(5), false)])),
            "notebookos: replica 2 was lost before the changes of In [4], In [5] reached another \
             replica; those changes are lost and the namespace is as it was after In [3]. \
             Re-run those cells to restore them.\n"
        );
        assert_eq!(
            loss_notice(&lost(&[(None, true), (Some(7), false)])),
            "notebookos: replica 2 was lost before the changes of a widget change from the \
             front-end, In [7] reached another replica; those changes are lost and the \
             namespace is as it was before those changes. Re-run those cells to restore them.\n"
        );
        assert_eq!(
            loss_notice(&lost(&[(None, true)])),
            "notebookos: replica 2 was lost before the changes of a widget change from the \
             front-end reached another replica; those changes are lost and the namespace is \
             as it was before those changes. Move those widgets again to restore them.\n"
        );
    }
}
