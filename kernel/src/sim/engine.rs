//! The discrete-event engine: one workload, one way of running it.
//!
//! Every decision is the live code's: placement, migration and autoscaling
//! come from [`crate::cluster::policy`], and who runs a cell from the
//! replicas' own state machine, [`crate::replica::applier`], fed the same
//! entries the log would hold. The engine supplies only time and the
//! modelled costs ([`Costs`]).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};

use crate::cluster::policy::{
    ClusterView, KernelView, Policy, Pressure, Scale, ServerId, ServerView,
};
use crate::cluster::provider::{InProcess, Provider};
use crate::replica::applier::Applier;
use crate::replica::entry::{Entry, Frames};

use super::rng::Rng;
use super::workload::{Ms, Store, Workload, SECOND};

/// How sessions get GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The bound: GPUs provisioned exactly while cells run, second by
    /// second, and no cell waits.
    Oracle,
    /// Each session holds its GPUs on one server from start to stop.
    Reservation,
    /// Each cell is a container queued first-come first-served; it loads
    /// the session's state before it runs.
    Batch,
    /// Replicas on distinct servers bind GPUs only while a cell runs.
    NotebookOs { replicas: usize },
}

impl Mode {
    pub fn name(&self) -> String {
        match self {
            Mode::Oracle => "oracle".into(),
            Mode::Reservation => "Reservation".into(),
            Mode::Batch => "Batch (FCFS)".into(),
            Mode::NotebookOs { replicas } => format!("notebookos-{replicas}"),
        }
    }

    /// The policy this mode runs under. notebookos modes take the knobs
    /// given; the baselines take only the cluster's shape from them and keep
    /// the default autoscaler, so that tuning notebookos does not move the
    /// Reservation row every share is measured against.
    pub fn policy(&self, base: &Policy) -> Policy {
        let baseline = Policy {
            gpus_per_server: base.gpus_per_server,
            max_servers: base.max_servers,
            ..Policy::default()
        };
        match *self {
            Mode::Oracle => Policy {
                min_servers: 0,
                ..base.clone()
            },
            // Holding GPUs for a session's life leaves nothing to oversubscribe.
            Mode::Reservation => Policy {
                replicas: 1,
                subscription_ratio: 1.0,
                min_servers: 1,
                pack: true,
                ..baseline.clone()
            },
            Mode::Batch => Policy {
                replicas: 1,
                min_servers: 1,
                pack: true,
                ..baseline
            },
            Mode::NotebookOs { replicas } => Policy {
                replicas,
                min_servers: base.min_servers.max(replicas),
                ..base.clone()
            },
        }
    }
}

/// Modelled costs; `docs/simulator.md` says where each number comes from,
/// and [`super::calibration`] fills them from the live benchmarks.
#[derive(Debug, Clone, PartialEq)]
pub struct Costs {
    /// From asking the provider for a server to its agent taking work.
    pub scale_out_delay: Ms,
    /// One Raft commit among the replicas (measured with raft-transport).
    pub commit_us: u64,
    /// Starting a replica process before it loads state.
    pub replica_start: Ms,
    /// Starting a batch container before it loads state.
    pub container_start: Ms,
    /// How often the autoscaler looks.
    pub autoscale_every: Ms,
    /// A cell's changes reach the peers this long after its reply (fixed
    /// part, µs) ...
    pub delta_fixed_us: u64,
    /// ... plus their bytes at this rate (the replicas' bulk stream); a
    /// migrated replica's checkpoint comes from a peer at it too.
    pub delta_bytes_per_s: f64,
    /// Moving GPU state to host memory (a revoked or expired cached grant).
    pub offload_bytes_per_s: f64,
    /// Moving it back before a cell that did not find it on its GPUs.
    pub restore_bytes_per_s: f64,
    /// A cached grant unused this long is released (the kernel's
    /// `NOTEBOOKOS_GPU_CACHE_IDLE`); zero: GPU state leaves after every cell.
    pub cache_idle: Ms,
}

impl Default for Costs {
    fn default() -> Self {
        Self {
            scale_out_delay: 90 * SECOND,
            commit_us: 2_500,
            replica_start: 2 * SECOND,
            container_start: 5 * SECOND,
            autoscale_every: 30 * SECOND,
            delta_fixed_us: 20_000,
            delta_bytes_per_s: 0.2e9,
            offload_bytes_per_s: 25e9,
            restore_bytes_per_s: 25e9,
            cache_idle: 600 * SECOND,
        }
    }
}

impl Costs {
    fn bytes_ms(bytes: u64, rate: f64) -> Ms {
        if bytes == 0 || rate <= 0.0 {
            return 0;
        }
        (bytes as f64 / rate * 1000.0).ceil() as Ms
    }

    /// Reply to every peer holding a cell's changes of `bytes`.
    pub fn delta_ms(&self, bytes: u64) -> Ms {
        self.delta_fixed_us.div_ceil(1000) + Self::bytes_ms(bytes, self.delta_bytes_per_s)
    }

    /// GPU state of `bytes` spread over `gpus` GPUs, each with its own
    /// link to host memory, moving off them.
    pub fn offload_ms(&self, bytes: u64, gpus: u32) -> Ms {
        Self::bytes_ms(bytes, self.offload_bytes_per_s * f64::from(gpus.max(1)))
    }

    pub fn restore_ms(&self, bytes: u64, gpus: u32) -> Ms {
        Self::bytes_ms(bytes, self.restore_bytes_per_s * f64::from(gpus.max(1)))
    }
}

/// How often a cached grant hears of its revocation (the kernel's
/// `CACHED_RENEW`): the asker waits this on top of the offload.
const REVOKE_HEARD: Ms = 50;
/// How long a replica waits for GPUs being reclaimed before it yields
/// (the kernel's `RECLAIM_PATIENCE`).
const RECLAIM_PATIENCE: Ms = 30 * SECOND;

/// Where one cell's delay went (submission to start), in ms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delay {
    /// Raft commits of the election.
    pub election: Ms,
    /// Waiting for the winner to hold the newest state: the previous
    /// cell's changes, or a moved replica's checkpoint.
    pub sync: Ms,
    /// Waiting for others' cached GPUs to be moved off.
    pub reclaim: Ms,
    /// Moving this session's GPU state onto the GPUs.
    pub restore: Ms,
    /// Every replica yielded: queued until GPUs freed or a migration.
    pub queued: Ms,
    /// A migrated replica's start and state load (or a batch container's).
    pub migration: Ms,
}

impl Delay {
    pub fn total(&self) -> Ms {
        self.election + self.sync + self.reclaim + self.restore + self.queued + self.migration
    }
}

/// What one run measured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    pub mode: String,
    pub cells: usize,
    /// Server GPUs paid for (booting, serving or draining), GPU-ms.
    pub provisioned_gpu_ms: u128,
    /// GPUs bound to a session or cell (reserved, loading, running, cached).
    pub held_gpu_ms: u128,
    /// GPUs running cells.
    pub used_gpu_ms: u128,
    /// GPUs kept between cells with a session's state on them.
    pub cached_gpu_ms: u128,
    /// GPUs whose state was moving on or off them.
    pub moving_gpu_ms: u128,
    /// Submission to start of execution, per cell, in workload order.
    pub delays: Vec<Delay>,
    /// Cells whose GPU state was still on their GPUs.
    pub cache_hits: usize,
    /// Cached grants revoked for another kernel's cell.
    pub revocations: usize,
    pub migrations: usize,
    /// Replicas moved between cells, ahead of a migration.
    pub rebalance_moves: usize,
    pub servers_added: usize,
    pub servers_removed: usize,
    /// Replicas moved off servers being removed.
    pub drain_moves: usize,
    pub peak_servers: usize,
    /// (time, GPUs provisioned, GPUs held), at every change.
    pub timeline: Vec<(Ms, u32, u32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    // Ordered so that, at one instant, capacity frees before work arrives.
    CellEnd {
        session: usize,
        cell: usize,
    },
    CacheIdle {
        session: usize,
        replica: usize,
        since: Ms,
    },
    ServerReady,
    SessionStart {
        session: usize,
    },
    CellSubmit {
        session: usize,
        cell: usize,
    },
    MigrateCheck {
        session: usize,
        cell: usize,
    },
    SessionStop {
        session: usize,
    },
    Autoscale,
}

/// A grant kept after its cell with the session's GPU state on it.
#[derive(Debug, Clone)]
struct Cached {
    session: usize,
    replica: usize,
    gpus: u32,
    since: Ms,
    bytes: u64,
}

#[derive(Debug)]
struct Server {
    gpus: u32,
    /// Free: neither running a cell nor cached.
    idle: u32,
    cached: Vec<Cached>,
    subscribed: u32,
    replicas: u32,
    draining: bool,
    ready_at: Ms,
    /// When a cell last ran on it.
    last_active: Ms,
}

impl Server {
    fn cached_gpus(&self) -> u32 {
        self.cached.iter().map(|c| c.gpus).sum()
    }

    fn running(&self) -> u32 {
        self.gpus - self.idle - self.cached_gpus()
    }
}

/// How a replica would get a cell's GPUs on its server, as its agent
/// decides (`agent::grants::Grants::grant`).
#[derive(Debug, Clone, PartialEq)]
struct Acquire {
    /// Its own cached grant of as many GPUs: the state is in place.
    from_cache: bool,
    /// Others' cached grants revoked for it, oldest first (indices).
    revoke: Vec<usize>,
    /// Until the revoked state is off their GPUs.
    wait: Ms,
}

#[derive(Debug, Default)]
struct SessionState {
    /// Servers of its replicas (notebookos), or of its reservation.
    hosts: Vec<ServerId>,
    placed: bool,
    /// When the current cell was submitted.
    submitted: Ms,
    /// The server running the current cell, and the replica (index).
    running_on: Option<(ServerId, usize)>,
    /// The replica that ran the last cell and when its changes reach the
    /// others: until then only it may lead.
    holder: Option<usize>,
    synced_at: Ms,
    /// A replica moved ahead of its next cell, and when it has restored
    /// the checkpoint (until then it yields).
    moving: Option<(usize, Ms)>,
    /// Cells that have ended.
    ended: usize,
    stopped: bool,
    done: bool,
}

pub struct Engine<'w> {
    workload: &'w Workload,
    mode: Mode,
    policy: Policy,
    costs: Costs,
    rng: Rng,
    now: Ms,
    events: BinaryHeap<Reverse<(Ms, Event, u64)>>,
    seq: u64,
    servers: BTreeMap<ServerId, Server>,
    provider: InProcess,
    sessions: Vec<SessionState>,
    /// Cells waiting for a GPU, oldest first.
    waiting: VecDeque<(usize, usize)>,
    /// Sessions whose replicas (or reservation) found no server yet.
    unplaced: BTreeSet<usize>,
    live_sessions: usize,
    /// Index of each session's first cell in `Outcome::delays`.
    first_cell: Vec<usize>,
    /// The oracle's GPUs running cells.
    running: u32,
    last_scale_out: Option<Ms>,
    /// The last scale-out asked for while kernels waited for servers.
    last_placement_out: Option<Ms>,
    /// Since when too few servers are wholly idle (`Policy::idle_short`).
    idle_short_since: Option<Ms>,
    out: Outcome,
}

impl<'w> Engine<'w> {
    pub fn new(workload: &'w Workload, mode: Mode, base: &Policy, costs: Costs, seed: u64) -> Self {
        let policy = mode.policy(base);
        let mut engine = Self {
            workload,
            mode,
            costs,
            rng: Rng::new(seed),
            now: 0,
            events: BinaryHeap::new(),
            seq: 0,
            servers: BTreeMap::new(),
            provider: InProcess::default(),
            sessions: workload
                .sessions
                .iter()
                .map(|_| SessionState::default())
                .collect(),
            waiting: VecDeque::new(),
            unplaced: BTreeSet::new(),
            live_sessions: workload.sessions.len(),
            first_cell: workload
                .sessions
                .iter()
                .scan(0, |n, s| {
                    let first = *n;
                    *n += s.cells.len();
                    Some(first)
                })
                .collect(),
            running: 0,
            last_scale_out: None,
            last_placement_out: None,
            idle_short_since: None,
            out: Outcome {
                mode: mode.name(),
                cells: workload.cells(),
                delays: vec![Delay::default(); workload.cells()],
                ..Outcome::default()
            },
            policy,
        };
        engine.add_servers(engine.policy.min_servers, 0);
        for (i, s) in workload.sessions.iter().enumerate() {
            engine.at(s.start, Event::SessionStart { session: i });
            engine.at(s.stop, Event::SessionStop { session: i });
        }
        if mode != Mode::Oracle {
            engine.at(0, Event::Autoscale);
        }
        engine
    }

    pub fn run(mut self) -> Outcome {
        self.record();
        while self.live_sessions > 0 {
            let Some(Reverse((t, event, _))) = self.events.pop() else {
                break;
            };
            self.advance(t);
            self.handle(event);
            self.record();
        }
        self.out
    }

    fn at(&mut self, t: Ms, event: Event) {
        self.seq += 1;
        self.events
            .push(Reverse((t.max(self.now), event, self.seq)));
    }

    /// Integrates GPU accounting up to `t`.
    fn advance(&mut self, t: Ms) {
        let dt = u128::from(t.saturating_sub(self.now));
        if self.mode == Mode::Oracle {
            self.out.provisioned_gpu_ms += dt * u128::from(self.running);
            self.out.held_gpu_ms += dt * u128::from(self.running);
        }
        for s in self.servers.values_mut() {
            self.out.provisioned_gpu_ms += dt * u128::from(s.gpus);
            self.out.held_gpu_ms += dt * u128::from(s.gpus - s.idle);
            self.out.cached_gpu_ms += dt * u128::from(s.cached_gpus());
            if s.running() > 0 && t >= s.ready_at {
                s.last_active = t;
            }
        }
        self.now = self.now.max(t);
    }

    fn record(&mut self) {
        let (provisioned, held) = if self.mode == Mode::Oracle {
            (self.running, self.running)
        } else {
            (
                self.servers.values().map(|s| s.gpus).sum(),
                self.servers.values().map(|s| s.gpus - s.idle).sum(),
            )
        };
        if self.out.timeline.last().map(|&(_, p, h)| (p, h)) != Some((provisioned, held)) {
            self.out.timeline.push((self.now, provisioned, held));
        }
        self.out.peak_servers = self.out.peak_servers.max(self.servers.len());
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::SessionStart { session } => self.session_start(session),
            Event::SessionStop { session } => {
                self.sessions[session].stopped = true;
                self.maybe_end(session);
            }
            Event::CellSubmit { session, cell } => self.cell_submit(session, cell),
            Event::CellEnd { session, cell } => self.cell_end(session, cell),
            Event::CacheIdle {
                session,
                replica,
                since,
            } => self.cache_idle(session, replica, since),
            Event::MigrateCheck { session, cell } => self.migrate_check(session, cell),
            Event::ServerReady => self.retry(),
            Event::Autoscale => {
                self.autoscale();
                self.rebalance();
                self.at(self.now + self.costs.autoscale_every, Event::Autoscale);
            }
        }
    }

    // ---- the cluster as the policy sees it

    fn view(&self, with_booting: bool) -> ClusterView {
        ClusterView {
            servers: self
                .servers
                .iter()
                .filter(|(_, s)| with_booting || s.ready_at <= self.now)
                .map(|(id, s)| ServerView {
                    id: id.clone(),
                    gpus: s.gpus,
                    // As the agents report it: cached grants are revocable,
                    // so they count as free (`agent::Agent::gpu_report`).
                    idle_gpus: s.idle + s.cached_gpus(),
                    subscribed: s.subscribed,
                    replicas: s.replicas,
                    draining: s.draining,
                    idle_for: if s.running() == 0 {
                        std::time::Duration::from_millis(self.now.saturating_sub(s.last_active))
                    } else {
                        std::time::Duration::ZERO
                    },
                })
                .collect(),
        }
    }

    /// Asks the provider for `n` servers, taking work from `ready_at`;
    /// returns how many came.
    fn add_servers(&mut self, n: usize, ready_at: Ms) -> usize {
        let Ok(ids) = self.provider.add(n) else {
            return 0;
        };
        let added = ids.len();
        for id in ids {
            self.servers.insert(
                id,
                Server {
                    gpus: self.policy.gpus_per_server,
                    idle: self.policy.gpus_per_server,
                    cached: Vec::new(),
                    subscribed: 0,
                    replicas: 0,
                    draining: false,
                    ready_at,
                    last_active: ready_at,
                },
            );
        }
        if ready_at > self.now {
            self.at(ready_at, Event::ServerReady);
        }
        added
    }

    fn take(&mut self, id: &str, gpus: u32) {
        if let Some(s) = self.servers.get_mut(id) {
            s.idle -= gpus;
        }
    }

    fn give(&mut self, id: &str, gpus: u32) {
        if let Some(s) = self.servers.get_mut(id) {
            s.idle += gpus;
            s.last_active = self.now;
        }
    }

    fn subscribe(&mut self, id: &str, gpus: u32) {
        if let Some(s) = self.servers.get_mut(id) {
            s.subscribed += gpus;
            s.replicas += 1;
        }
    }

    fn unsubscribe(&mut self, id: &str, gpus: u32) {
        if let Some(s) = self.servers.get_mut(id) {
            s.subscribed -= gpus;
            s.replicas -= 1;
        }
    }

    // ---- cached grants (the agent's `Grants`, modelled)

    /// How replica `replica` of `session` would get `gpus` on `host` now, if
    /// it can: its own cached grant of as many, free GPUs, or others' cached
    /// grants revoked oldest first, if they are off within the patience.
    fn acquire(&self, host: &str, session: usize, replica: usize, gpus: u32) -> Option<Acquire> {
        let s = self.servers.get(host)?;
        if s.ready_at > self.now {
            return None;
        }
        let own = |c: &Cached| c.session == session && c.replica == replica;
        if s.cached.iter().any(|c| own(c) && c.gpus == gpus) {
            return Some(Acquire {
                from_cache: true,
                revoke: Vec::new(),
                wait: 0,
            });
        }
        if s.idle >= gpus {
            return Some(Acquire {
                from_cache: false,
                revoke: Vec::new(),
                wait: 0,
            });
        }
        let mut oldest: Vec<usize> = (0..s.cached.len()).collect();
        oldest.sort_by_key(|&i| (s.cached[i].since, i));
        let mut free = s.idle;
        let mut revoke = Vec::new();
        let mut wait = 0;
        for i in oldest {
            if free >= gpus {
                break;
            }
            free += s.cached[i].gpus;
            wait =
                wait.max(self.costs.offload_ms(s.cached[i].bytes, s.cached[i].gpus) + REVOKE_HEARD);
            revoke.push(i);
        }
        (free >= gpus && wait <= RECLAIM_PATIENCE).then_some(Acquire {
            from_cache: false,
            revoke,
            wait,
        })
    }

    /// Carries out an [`Acquire`]: the revoked grants' GPUs go to the asker
    /// as their state leaves; returns the GPUs now held for the cell.
    fn commit_acquire(
        &mut self,
        host: &str,
        session: usize,
        replica: usize,
        gpus: u32,
        a: &Acquire,
    ) {
        let Some(s) = self.servers.get_mut(host) else {
            return;
        };
        if a.from_cache {
            if let Some(i) = s
                .cached
                .iter()
                .position(|c| c.session == session && c.replica == replica && c.gpus == gpus)
            {
                s.cached.remove(i);
            }
            self.out.cache_hits += 1;
            return;
        }
        let mut revoke = a.revoke.clone();
        revoke.sort_unstable_by(|a, b| b.cmp(a));
        for i in revoke {
            let c = s.cached.remove(i);
            s.idle += c.gpus;
            self.out.moving_gpu_ms +=
                u128::from(c.gpus) * u128::from(self.costs.offload_ms(c.bytes, c.gpus));
            self.out.revocations += 1;
        }
        s.idle -= gpus;
    }

    /// Drops a replica's cached grants (its state goes to host memory).
    fn uncache(&mut self, session: usize, replica: Option<usize>, host: Option<&str>) {
        for (id, s) in self.servers.iter_mut() {
            if host.is_some_and(|h| h != id) {
                continue;
            }
            let mut kept = Vec::with_capacity(s.cached.len());
            for c in s.cached.drain(..) {
                if c.session == session && replica.is_none_or(|r| r == c.replica) {
                    s.idle += c.gpus;
                    self.out.moving_gpu_ms +=
                        u128::from(c.gpus) * u128::from(self.costs.offload_ms(c.bytes, c.gpus));
                } else {
                    kept.push(c);
                }
            }
            s.cached = kept;
        }
    }

    fn cache_idle(&mut self, session: usize, replica: usize, since: Ms) {
        for s in self.servers.values_mut() {
            if let Some(i) = s
                .cached
                .iter()
                .position(|c| c.session == session && c.replica == replica && c.since == since)
            {
                let c = s.cached.remove(i);
                s.idle += c.gpus;
                self.out.moving_gpu_ms +=
                    u128::from(c.gpus) * u128::from(self.costs.offload_ms(c.bytes, c.gpus));
            }
        }
        self.retry();
    }

    // ---- sessions

    fn session_start(&mut self, session: usize) {
        match self.mode {
            Mode::Batch | Mode::Oracle => self.sessions[session].placed = true,
            _ => {
                if !self.try_place(session) {
                    self.unplaced.insert(session);
                }
            }
        }
        if let Some(first) = self.workload.sessions[session].cells.first() {
            self.at(first.submit, Event::CellSubmit { session, cell: 0 });
        }
    }

    /// Places a session's replicas (notebookos) or its reservation.
    fn try_place(&mut self, session: usize) -> bool {
        let gpus = self.workload.sessions[session].gpus();
        if self.mode == Mode::Reservation && gpus == 0 {
            // Nothing to reserve: its cells run on CPU.
            self.sessions[session].placed = true;
            return true;
        }
        let Ok(hosts) = self.policy.place(&self.view(false), gpus) else {
            return false;
        };
        for h in &hosts {
            self.subscribe(h, gpus);
            if self.mode == Mode::Reservation {
                self.take(h, gpus);
            }
        }
        let state = &mut self.sessions[session];
        state.hosts = hosts;
        state.placed = true;
        true
    }

    fn maybe_end(&mut self, session: usize) {
        let state = &self.sessions[session];
        let all_ended = state.ended == self.workload.sessions[session].cells.len();
        if !state.stopped || !all_ended || state.done {
            return;
        }
        let gpus = self.workload.sessions[session].gpus();
        self.uncache(session, None, None);
        let hosts = std::mem::take(&mut self.sessions[session].hosts);
        for h in &hosts {
            self.unsubscribe(h, gpus);
            if self.mode == Mode::Reservation {
                self.give(h, gpus);
            }
        }
        self.sessions[session].done = true;
        self.unplaced.remove(&session);
        self.live_sessions -= 1;
        self.retry();
    }

    // ---- cells

    fn cell_submit(&mut self, session: usize, cell: usize) {
        self.sessions[session].submitted = self.now;
        let spec = &self.workload.sessions[session].cells[cell];
        let placed = self.sessions[session].placed;
        let mode = self.mode;
        match mode {
            Mode::Oracle => {
                self.running += spec.gpus;
                self.start(session, cell, None, Delay::default());
            }
            Mode::Batch if spec.gpus == 0 => {
                // CPU cells need a container, not a GPU: they never queue.
                let delay = Delay {
                    migration: self.costs.container_start + self.load_ms(spec.state_bytes),
                    ..Delay::default()
                };
                self.start(session, cell, None, delay);
            }
            Mode::Batch => {
                self.waiting.push_back((session, cell));
                self.retry();
            }
            Mode::Reservation if placed => {
                let host = self.sessions[session].hosts.first().cloned();
                self.start(session, cell, host.map(|h| (h, 0)), Delay::default());
            }
            Mode::NotebookOs { .. } if placed && self.elect(session, cell) => {}
            _ => {
                self.waiting.push_back((session, cell));
                if placed {
                    self.at(
                        self.now + self.migrate_wait(),
                        Event::MigrateCheck { session, cell },
                    );
                }
            }
        }
    }

    /// Whether `replica` of `session` holds every change by `t`.
    fn may_lead(&self, session: usize, replica: usize, t: Ms) -> bool {
        let s = &self.sessions[session];
        let restored = s.moving.is_none_or(|(r, at)| r != replica || t >= at);
        restored && (s.holder.is_none_or(|h| h == replica) || t >= s.synced_at)
    }

    /// From when `replica` may lead: now, or once it has the last cell's
    /// changes and (if it was moved) its checkpoint.
    fn leads_from(&self, session: usize, replica: usize) -> Ms {
        let s = &self.sessions[session];
        let mut t = self.now;
        if s.holder.is_some_and(|h| h != replica) {
            t = t.max(s.synced_at);
        }
        if let Some((r, at)) = s.moving {
            if r == replica {
                t = t.max(at);
            }
        }
        t
    }

    /// Runs the cell's election among the session's replicas, as the live
    /// replicas do: replica 1 puts its LEAD in the Request when it holds
    /// every change and its agent grants the GPUs (waiting for cached ones
    /// being reclaimed); otherwise every replica bids once it holds every
    /// change, and the first LEAD applied wins.
    fn elect(&mut self, session: usize, cell: usize) -> bool {
        let spec = &self.workload.sessions[session].cells[cell];
        let (gpus, gpu_bytes) = (spec.gpus, spec.gpu_bytes);
        let hosts = self.sessions[session].hosts.clone();
        let grant = |engine: &Self, r: usize| {
            if gpus == 0 {
                return Some(Acquire {
                    from_cache: false,
                    revoke: Vec::new(),
                    wait: 0,
                });
            }
            engine.acquire(&hosts[r], session, r, gpus)
        };
        let voters: BTreeSet<u64> = (1..=hosts.len() as u64).collect();
        // The live replicas' own state machine decides, from the same log.
        let mut log = Applier::new(1, 1, false);
        log.membership(voters);
        let mut index = 0;
        let mut apply = |log: &mut Applier, entry| {
            index += 1;
            log.apply(index, entry);
        };
        let first = self
            .may_lead(session, 0, self.now)
            .then(|| grant(self, 0))
            .flatten();
        apply(
            &mut log,
            Entry::Request {
                cell: "cell".into(),
                request: Frames::default(),
                lead: first.is_some().then_some(1),
                control: None,
                only: None,
            },
        );
        // (replica, when its bid commits, its grant): replica 1's rides in
        // the Request; the others' (and replica 1's, if it could not lead
        // then) follow once each holds every change, the order among equal
        // times random.
        let (winner, ready, acquire, commits) = if let Some(a) = first {
            (0, self.now + a.wait, a, 1)
        } else {
            let mut rank: Vec<usize> = (0..hosts.len()).collect();
            self.rng.shuffle(&mut rank);
            let mut bids: Vec<(Ms, usize, usize, Option<Acquire>)> = (0..hosts.len())
                .map(|r| {
                    let from = self.leads_from(session, r);
                    let a = grant(self, r);
                    let at = from + a.as_ref().map_or(0, |a| a.wait);
                    (at, rank[r], r, a)
                })
                .collect();
            bids.sort_by_key(|b| (b.0, b.1));
            let mut decided = None;
            for (at, _, r, a) in bids {
                apply(
                    &mut log,
                    Entry::Bid {
                        cell: "cell".into(),
                        replica: r as u64 + 1,
                        lead: a.is_some(),
                    },
                );
                if log.state().last_winner == Some(r as u64 + 1) {
                    decided = a.map(|a| (r, at, a, 2));
                    break;
                }
            }
            let Some(d) = decided else {
                return false;
            };
            d
        };
        let host = hosts[winner].clone();
        self.commit_acquire(&host, session, winner, gpus, &acquire);
        let sync = ready.saturating_sub(self.now + acquire.wait);
        let restore = if gpus > 0 && !acquire.from_cache {
            self.costs.restore_ms(gpu_bytes, gpus)
        } else {
            0
        };
        self.out.moving_gpu_ms += u128::from(gpus) * u128::from(restore);
        let delay = Delay {
            election: (commits * self.costs.commit_us).div_ceil(1000),
            sync,
            reclaim: acquire.wait,
            restore,
            ..Delay::default()
        };
        self.start(session, cell, Some((host, winner)), delay);
        true
    }

    /// Starts a cell `delay` after now, plus the time it already queued.
    fn start(
        &mut self,
        session: usize,
        cell: usize,
        on: Option<(ServerId, usize)>,
        mut delay: Delay,
    ) {
        let spec = &self.workload.sessions[session].cells[cell];
        let state = &mut self.sessions[session];
        delay.queued = self.now - state.submitted;
        let at = self.now + delay.total() - delay.queued;
        self.out.delays[self.first_cell[session] + cell] = delay;
        self.out.used_gpu_ms += u128::from(spec.gpus) * u128::from(spec.duration);
        state.running_on = on;
        self.at(at + spec.duration, Event::CellEnd { session, cell });
    }

    fn cell_end(&mut self, session: usize, cell: usize) {
        let cells = &self.workload.sessions[session].cells;
        let spec = &cells[cell];
        let (gpus, gpu_bytes) = (spec.gpus, spec.gpu_bytes);
        let next = cells.get(cell + 1).map(|c| c.submit);
        let replicated = matches!(self.mode, Mode::NotebookOs { replicas } if replicas > 1);
        let delta = self.costs.delta_ms(gpu_bytes);
        let state = &mut self.sessions[session];
        state.ended += 1;
        if self.mode == Mode::Oracle {
            self.running -= gpus;
        }
        if let Some((host, replica)) = state.running_on.take() {
            if replicated {
                // The reply does not wait: the changes stream in the background.
                state.holder = Some(replica);
                state.synced_at = self.now + delta;
            }
            match self.mode {
                Mode::NotebookOs { .. } if gpus > 0 && self.costs.cache_idle > 0 => {
                    // A replica keeps one cached grant: a new one drops the old.
                    self.uncache(session, Some(replica), None);
                    if let Some(s) = self.servers.get_mut(&host) {
                        s.cached.push(Cached {
                            session,
                            replica,
                            gpus,
                            since: self.now,
                            bytes: gpu_bytes,
                        });
                        s.last_active = self.now;
                    }
                    self.at(
                        self.now + self.costs.cache_idle,
                        Event::CacheIdle {
                            session,
                            replica,
                            since: self.now,
                        },
                    );
                }
                Mode::NotebookOs { .. } => {
                    self.out.moving_gpu_ms +=
                        u128::from(gpus) * u128::from(self.costs.offload_ms(gpu_bytes, gpus));
                    self.give(&host, gpus);
                }
                Mode::Batch => self.give(&host, gpus),
                Mode::Reservation | Mode::Oracle => {}
            }
        }
        if let Some(submit) = next {
            self.at(
                submit.max(self.now),
                Event::CellSubmit {
                    session,
                    cell: cell + 1,
                },
            );
        }
        self.maybe_end(session);
        self.retry();
    }

    /// Moves one replica of a session whose cell every replica yielded on
    /// to a server with idle GPUs; the cell runs there once the new replica
    /// has started and restored a checkpoint from a peer.
    /// How long a waiting cell waits before its replicas are looked at
    /// again; at least 1 ms, or a cell no server can take would be
    /// rechecked forever at the same instant.
    fn migrate_wait(&self) -> Ms {
        ms(self.policy.migrate_after).max(1)
    }

    fn migrate_check(&mut self, session: usize, cell: usize) {
        if !self.waiting.contains(&(session, cell)) {
            return;
        }
        let spec = &self.workload.sessions[session].cells[cell];
        let (gpus, state_bytes) = (spec.gpus, spec.state_bytes);
        let hosts = self.sessions[session].hosts.clone();
        match self.policy.migrate(&self.view(false), gpus, &hosts) {
            Ok(m) => {
                let Some(replica) = hosts.iter().position(|h| *h == m.from) else {
                    return;
                };
                let Some(a) = self.acquire(&m.to, session, replica, gpus) else {
                    self.at(
                        self.now + self.migrate_wait(),
                        Event::MigrateCheck { session, cell },
                    );
                    return;
                };
                self.waiting.retain(|&w| w != (session, cell));
                let kernel_gpus = self.workload.sessions[session].gpus();
                self.uncache(session, Some(replica), None);
                self.commit_acquire(&m.to, session, replica, gpus, &a);
                self.subscribe(&m.to, kernel_gpus);
                self.unsubscribe(&m.from, kernel_gpus);
                self.sessions[session].hosts[replica] = m.to.clone();
                self.out.migrations += 1;
                let delay = Delay {
                    reclaim: a.wait,
                    migration: self.costs.replica_start
                        + Costs::bytes_ms(state_bytes, self.costs.delta_bytes_per_s),
                    ..Delay::default()
                };
                self.start(session, cell, Some((m.to, replica)), delay);
            }
            Err(_) => self.at(
                self.now + self.migrate_wait(),
                Event::MigrateCheck { session, cell },
            ),
        }
    }

    /// Time to load `bytes` of state from the remote store.
    fn load_ms(&mut self, bytes: u64) -> Ms {
        let store: &Store = &self.workload.store;
        let spread = store.variance_pct / 100.0;
        let rate = store.download_bytes_per_s * (1.0 + spread * (2.0 * self.rng.uniform() - 1.0));
        (bytes as f64 / rate * 1000.0).ceil() as Ms
    }

    /// Capacity changed: place waiting sessions, start waiting cells.
    fn retry(&mut self) {
        if self.mode == Mode::Batch {
            // First come, first served: the head blocks those behind it.
            while let Some(&(session, cell)) = self.waiting.front() {
                let spec = &self.workload.sessions[session].cells[cell];
                let Some(host) =
                    self.policy
                        .pick_idle(&self.view(false), spec.gpus, &BTreeSet::new())
                else {
                    break;
                };
                self.waiting.pop_front();
                let gpus = spec.gpus;
                let delay = Delay {
                    migration: self.costs.container_start + self.load_ms(spec.state_bytes),
                    ..Delay::default()
                };
                self.take(&host, gpus);
                self.start(session, cell, Some((host, 0)), delay);
            }
            return;
        }
        let unplaced: Vec<usize> = self.unplaced.iter().copied().collect();
        let mut newly_placed = BTreeSet::new();
        for session in unplaced {
            if self.try_place(session) {
                self.unplaced.remove(&session);
                newly_placed.insert(session);
            }
        }
        // Cells that waited for their session's placement may migrate too.
        let checks: Vec<(usize, usize)> = self
            .waiting
            .iter()
            .filter(|(s, _)| newly_placed.contains(s))
            .copied()
            .collect();
        for (session, cell) in checks {
            self.at(
                self.now + self.migrate_wait(),
                Event::MigrateCheck { session, cell },
            );
        }
        let waiting: Vec<(usize, usize)> = self.waiting.iter().copied().collect();
        for (session, cell) in waiting {
            if !self.sessions[session].placed {
                continue;
            }
            let started = match self.mode {
                Mode::Reservation => {
                    let host = self.sessions[session].hosts.first().cloned();
                    self.start(session, cell, host.map(|h| (h, 0)), Delay::default());
                    true
                }
                _ => self.elect(session, cell),
            };
            if started {
                self.waiting.retain(|&w| w != (session, cell));
            }
        }
    }

    // ---- autoscaling

    fn autoscale(&mut self) {
        let waiting_gpus: u32 = self
            .waiting
            .iter()
            .map(|&(s, c)| self.workload.sessions[s].cells[c].gpus)
            .sum();
        let view = self.view(true);
        let short = self
            .unplaced
            .iter()
            .map(|&s| {
                let gpus = self.workload.sessions[s].gpus();
                self.policy
                    .servers_missing(&view, gpus, self.policy.replicas, &[])
            })
            .max()
            .unwrap_or(0);
        if !self.policy.idle_short(&view) {
            self.idle_short_since = None;
        } else if self.idle_short_since.is_none() {
            self.idle_short_since = Some(self.now);
        }
        let since = |t: Ms| std::time::Duration::from_millis(self.now - t);
        let pressure = Pressure {
            waiting_gpus,
            unplaceable: short,
            since_out: self.last_scale_out.map(since),
            since_placement_out: self.last_placement_out.map(since),
            idle_short_for: self.idle_short_since.map(since).unwrap_or_default(),
        };
        match self.policy.scale(&view, pressure) {
            Scale::Hold => {}
            Scale::Out(n) => {
                self.last_scale_out = Some(self.now);
                if short > 0 {
                    self.last_placement_out = Some(self.now);
                }
                self.out.servers_added +=
                    self.add_servers(n, self.now + self.costs.scale_out_delay);
            }
            Scale::In(ids) => {
                for id in ids {
                    self.drain(&id);
                }
            }
        }
    }

    /// Moves a replica of each kernel between cells whose servers could not
    /// run its next cell now (`Policy::rebalance`); the moved replica starts
    /// and restores a checkpoint from a peer while the user thinks.
    fn rebalance(&mut self) {
        if !matches!(self.mode, Mode::NotebookOs { .. }) || self.policy.rebalance_moves == 0 {
            return;
        }
        let mut idle = Vec::new();
        let mut kernels = Vec::new();
        for (i, st) in self.sessions.iter().enumerate() {
            if st.ended >= self.workload.sessions[i].cells.len() {
                continue;
            }
            let between_cells = st.placed
                && !st.done
                && st.running_on.is_none()
                && st.moving.is_none_or(|(_, at)| at <= self.now)
                && !self.waiting.iter().any(|&(s, _)| s == i);
            // What the kernel asks for, not what its next cell will: the
            // live policy cannot see the future.
            let gpus = self.workload.sessions[i].gpus();
            if between_cells && gpus > 0 {
                idle.push(i);
                kernels.push(KernelView {
                    gpus,
                    hosts: st.hosts.clone(),
                });
            }
        }
        for (k, m) in self.policy.rebalance(&self.view(false), &kernels) {
            let session = idle[k];
            let Some(replica) = self.sessions[session]
                .hosts
                .iter()
                .position(|h| *h == m.from)
            else {
                continue;
            };
            let kernel_gpus = self.workload.sessions[session].gpus();
            self.uncache(session, Some(replica), None);
            self.subscribe(&m.to, kernel_gpus);
            self.unsubscribe(&m.from, kernel_gpus);
            let ready = self.moved_ready(session);
            let st = &mut self.sessions[session];
            st.hosts[replica] = m.to;
            st.moving = Some((replica, ready));
            self.out.rebalance_moves += 1;
        }
    }

    /// When a replica of `session` moved now has started and restored a
    /// checkpoint of the state its next cell works on.
    fn moved_ready(&self, session: usize) -> Ms {
        let bytes = self.workload.sessions[session]
            .cells
            .get(self.sessions[session].ended)
            .map_or(0, |c| c.state_bytes);
        self.now + self.costs.replica_start + Costs::bytes_ms(bytes, self.costs.delta_bytes_per_s)
    }

    /// Moves every replica off `id` (each to a server the policy picks),
    /// then removes it; if one cannot move, the server stays. A moved
    /// replica leads only once it has started and restored its checkpoint.
    fn drain(&mut self, id: &ServerId) {
        if let Some(s) = self.servers.get_mut(id) {
            s.draining = true;
        }
        for session in 0..self.sessions.len() {
            let Some(replica) = self.sessions[session].hosts.iter().position(|h| h == id) else {
                continue;
            };
            let gpus = self.workload.sessions[session].gpus();
            let others: Vec<ServerId> = self.sessions[session]
                .hosts
                .iter()
                .filter(|h| *h != id)
                .cloned()
                .collect();
            match self.policy.replace(&self.view(false), gpus, &others) {
                Ok(to) => {
                    self.uncache(session, Some(replica), Some(id));
                    self.subscribe(&to, gpus);
                    self.unsubscribe(id, gpus);
                    let ready = self.moved_ready(session);
                    let st = &mut self.sessions[session];
                    st.hosts[replica] = to;
                    // One move is tracked per kernel; one still under way
                    // keeps its replica yielding until it lands.
                    if st.moving.is_none_or(|(_, at)| at <= self.now) {
                        st.moving = Some((replica, ready));
                    }
                    self.out.drain_moves += 1;
                }
                Err(_) => {
                    if let Some(s) = self.servers.get_mut(id) {
                        s.draining = false;
                    }
                    return;
                }
            }
        }
        if self.provider.remove(id).is_ok() {
            self.servers.remove(id);
            self.out.servers_removed += 1;
        }
    }
}

fn ms(d: std::time::Duration) -> Ms {
    d.as_millis() as Ms
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::workload::{Cell, Session, MINUTE};
    use std::time::Duration;

    const GB: u64 = 1_000_000_000;

    fn workload(sessions: Vec<Session>) -> Workload {
        Workload {
            name: "hand-made".into(),
            sessions,
            store: Store {
                download_bytes_per_s: 200e6,
                upload_bytes_per_s: 125e6,
                variance_pct: 0.0,
            },
        }
    }

    fn session(id: &str, start: Ms, stop: Ms, cells: &[(Ms, Ms, u32)]) -> Session {
        Session {
            id: id.into(),
            start,
            stop,
            cells: cells
                .iter()
                .map(|&(submit, duration, gpus)| Cell {
                    submit,
                    duration,
                    gpus,
                    state_bytes: 2 * GB,
                    gpu_bytes: 0,
                })
                .collect(),
        }
    }

    /// `servers` servers of `gpus` GPUs, never scaled.
    fn fixed(servers: usize, gpus: u32) -> Policy {
        Policy {
            gpus_per_server: gpus,
            min_servers: servers,
            max_servers: servers,
            headroom_gpus: 0,
            ..Policy::default()
        }
    }

    /// The original model's costs: checkpoints at the store's rate, no
    /// caching between cells (the tests below that need them say so).
    fn costs() -> Costs {
        Costs {
            delta_bytes_per_s: 200e6,
            cache_idle: 0,
            ..Costs::default()
        }
    }

    fn run(w: &Workload, mode: Mode, policy: &Policy) -> Outcome {
        Engine::new(w, mode, policy, costs(), 1).run()
    }

    fn totals(o: &Outcome) -> Vec<Ms> {
        o.delays.iter().map(Delay::total).collect()
    }

    const H: u128 = 3_600_000;

    #[test]
    fn reservation_holds_a_sessions_gpus_for_its_life() {
        let w = workload(vec![session(
            "a",
            0,
            60 * MINUTE,
            &[(MINUTE, 10 * MINUTE, 2)],
        )]);
        let o = run(&w, Mode::Reservation, &fixed(1, 8));
        assert_eq!(o.held_gpu_ms, 2 * H);
        assert_eq!(o.used_gpu_ms, 2 * H / 6);
        assert_eq!(o.provisioned_gpu_ms, 8 * H);
        assert_eq!(totals(&o), vec![0]);
    }

    #[test]
    fn notebookos_binds_gpus_only_while_a_cell_runs() {
        let w = workload(vec![session(
            "a",
            0,
            60 * MINUTE,
            &[(MINUTE, 10 * MINUTE, 2)],
        )]);
        let o = run(&w, Mode::NotebookOs { replicas: 3 }, &fixed(3, 8));
        // Replica 1 leads in the Request: one commit, 2.5 ms rounded up.
        assert_eq!(totals(&o), vec![3]);
        assert_eq!(o.used_gpu_ms, 2 * 10 * u128::from(MINUTE));
        assert_eq!(o.held_gpu_ms, 2 * (10 * u128::from(MINUTE) + 3));
        assert_eq!(o.provisioned_gpu_ms, 3 * 8 * H);
        assert_eq!(o.migrations, 0);
    }

    #[test]
    fn batch_queues_and_loads_state_per_cell() {
        // Two 8-GPU cells at once on one 8-GPU server: the second waits for
        // the first, then both pay container start plus 2 GB at 200 MB/s.
        let w = workload(vec![
            session("a", 0, 60 * MINUTE, &[(MINUTE, 10 * MINUTE, 8)]),
            session("b", 0, 60 * MINUTE, &[(MINUTE, 10 * MINUTE, 8)]),
        ]);
        let o = run(&w, Mode::Batch, &fixed(1, 8));
        let load = 5 * SECOND + 10 * SECOND;
        assert_eq!(totals(&o), vec![load, load + 10 * MINUTE + load]);
        assert_eq!(o.used_gpu_ms, 2 * 8 * 10 * u128::from(MINUTE));
        assert_eq!(o.held_gpu_ms, 2 * 8 * u128::from(10 * MINUTE + load));
    }

    #[test]
    fn two_kernels_racing_for_the_last_gpu_of_a_server() {
        // Both kernels' replicas sit on the same 3 servers; both ask for all 8
        // GPUs of a server at the same instant. The second's replica 1 yields,
        // another replica wins: two commits.
        let w = workload(vec![
            session("a", 0, 60 * MINUTE, &[(MINUTE, 10 * MINUTE, 8)]),
            session("b", 0, 60 * MINUTE, &[(MINUTE, 10 * MINUTE, 8)]),
        ]);
        let o = run(&w, Mode::NotebookOs { replicas: 3 }, &fixed(3, 8));
        assert_eq!(totals(&o), vec![3, 5]);
        assert_eq!(o.migrations, 0);
    }

    #[test]
    fn a_cell_whose_replicas_are_all_busy_migrates() {
        // One replica per kernel, two 1-GPU servers: a and c share s0. c's
        // cell finds s0 busy, waits `migrate_after`, moves to s1, starts a
        // replica there and loads 2 GB.
        let w = workload(vec![
            session("a", 0, 200 * MINUTE, &[(MINUTE, 100 * MINUTE, 1)]),
            session("b", 0, 200 * MINUTE, &[(150 * MINUTE, MINUTE, 1)]),
            session("c", 0, 200 * MINUTE, &[(2 * MINUTE, MINUTE, 1)]),
        ]);
        let policy = Policy {
            rebalance_moves: 0,
            ..fixed(2, 1)
        };
        let o = run(&w, Mode::NotebookOs { replicas: 1 }, &policy);
        assert_eq!(o.migrations, 1);
        let migrated = 2 * SECOND + 2 * SECOND + 10 * SECOND;
        assert_eq!(totals(&o), vec![3, 3, migrated]);
    }

    #[test]
    fn rebalancing_moves_a_blocked_replica_before_its_next_cell() {
        // As above, but c's replica moves to s1 while a's cell runs, before
        // c submits: c's cell starts there like any other.
        let w = workload(vec![
            session("a", 0, 200 * MINUTE, &[(MINUTE, 100 * MINUTE, 1)]),
            session("b", 0, 200 * MINUTE, &[(150 * MINUTE, MINUTE, 1)]),
            session("c", 0, 200 * MINUTE, &[(2 * MINUTE, MINUTE, 1)]),
        ]);
        let o = run(&w, Mode::NotebookOs { replicas: 1 }, &fixed(2, 1));
        assert_eq!(o.migrations, 0);
        assert_eq!(o.rebalance_moves, 1);
        assert_eq!(totals(&o), vec![3, 3, 3]);
    }

    #[test]
    fn the_oracle_provisions_exactly_the_running_gpus() {
        let w = workload(vec![session(
            "a",
            0,
            60 * MINUTE,
            &[(MINUTE, 10 * MINUTE, 2), (20 * MINUTE, 5 * MINUTE, 4)],
        )]);
        let o = run(&w, Mode::Oracle, &fixed(3, 8));
        let gpu_minutes = u128::from(MINUTE) * (2 * 10 + 4 * 5);
        assert_eq!(o.provisioned_gpu_ms, gpu_minutes);
        assert_eq!(o.held_gpu_ms, gpu_minutes);
        assert_eq!(o.used_gpu_ms, gpu_minutes);
        assert_eq!(totals(&o), vec![0, 0]);
    }

    fn with_gpu_state(mut w: Workload, bytes: u64) -> Workload {
        for c in w.sessions.iter_mut().flat_map(|s| s.cells.iter_mut()) {
            c.gpu_bytes = bytes;
        }
        w
    }

    #[test]
    fn a_cached_grant_serves_the_next_cell_without_a_restore() {
        let w = with_gpu_state(
            workload(vec![session(
                "a",
                0,
                60 * MINUTE,
                &[(MINUTE, 10 * MINUTE, 2), (12 * MINUTE, 5 * MINUTE, 2)],
            )]),
            50 * GB,
        );
        let costs = Costs {
            cache_idle: 10 * MINUTE,
            ..costs()
        };
        let o = Engine::new(&w, Mode::NotebookOs { replicas: 3 }, &fixed(3, 8), costs, 1).run();
        // 50 GB over two GPUs at 25 GB/s each: 1 s in, then none.
        assert_eq!(totals(&o), vec![3 + SECOND, 3]);
        assert_eq!(o.cache_hits, 1);
        // Cached between the cells, then for `cache_idle` after the last.
        let first_end = MINUTE + 3 + SECOND + 10 * MINUTE;
        let gap = 12 * MINUTE - first_end;
        assert_eq!(o.cached_gpu_ms, 2 * u128::from(gap + 10 * MINUTE));
    }

    #[test]
    fn another_kernels_cell_revokes_a_cached_grant_and_waits_for_its_offload() {
        let mut w = workload(vec![
            session("a", 0, 60 * MINUTE, &[(MINUTE, MINUTE, 8)]),
            session("b", 0, 60 * MINUTE, &[(5 * MINUTE, MINUTE, 8)]),
        ]);
        w.sessions[0].cells[0].gpu_bytes = 50 * GB;
        let costs = Costs {
            cache_idle: 10 * MINUTE,
            ..costs()
        };
        let o = Engine::new(&w, Mode::NotebookOs { replicas: 1 }, &fixed(1, 8), costs, 1).run();
        // a restores 50 GB over 8 GPUs (250 ms); b waits for that offload
        // plus the revocation's notice.
        assert_eq!(totals(&o), vec![3 + 250, 3 + 250 + REVOKE_HEARD]);
        assert_eq!(o.delays[1].reclaim, 250 + REVOKE_HEARD);
        assert_eq!(o.revocations, 1);
        assert_eq!(o.cache_hits, 0);
    }

    #[test]
    fn only_the_replica_that_ran_the_last_cell_leads_before_its_changes_arrive() {
        // Three 1-GPU servers hold both kernels' replicas. a's first cell
        // changes 20 GB (100 s to stream); b then takes s0, where a's
        // holder is. a's next cell must wait for a peer to be in sync.
        let mut w = workload(vec![
            session(
                "a",
                0,
                60 * MINUTE,
                &[(MINUTE, MINUTE, 1), (2 * MINUTE + 2 * SECOND, MINUTE, 1)],
            ),
            session(
                "b",
                0,
                60 * MINUTE,
                &[(2 * MINUTE + SECOND, 10 * MINUTE, 1)],
            ),
        ]);
        for c in &mut w.sessions[0].cells {
            c.gpu_bytes = 20 * GB;
        }
        let o = run(&w, Mode::NotebookOs { replicas: 3 }, &fixed(3, 1));
        let restore = 800;
        let first_end = MINUTE + 3 + restore + MINUTE;
        let synced_at = first_end + 20 + 100 * SECOND;
        let sync = synced_at - (2 * MINUTE + 2 * SECOND);
        assert_eq!(o.delays[1].sync, sync);
        assert_eq!(o.delays[1].total(), 5 + sync + restore);
        assert_eq!(o.migrations, 0);
    }

    #[test]
    fn full_cluster_scales_out_then_removes_idle_servers() {
        let policy = Policy {
            gpus_per_server: 8,
            min_servers: 3,
            headroom_gpus: 0,
            ..Policy::default()
        };
        // Four 8-GPU cells at once on three servers: one waits for a new server.
        let sessions = (0..4)
            .map(|i| {
                session(
                    &format!("k{i}"),
                    0,
                    300 * MINUTE,
                    &[(MINUTE, 30 * MINUTE, 8)],
                )
            })
            .collect();
        let o = run(
            &workload(sessions),
            Mode::NotebookOs { replicas: 3 },
            &policy,
        );
        assert!(o.servers_added >= 1, "{o:?}");
        assert!(o.servers_removed >= 1, "idle servers go after the cells");
        let mut d = totals(&o);
        d.sort_unstable();
        assert!(d[3] >= Costs::default().scale_out_delay, "{d:?}");
        assert!(d[..3].iter().all(|&x| x < SECOND), "{d:?}");
    }

    #[test]
    fn a_drained_replica_yields_until_its_checkpoint_is_restored() {
        // One replica each, 1-GPU servers: b's first cell finds s0 busy with
        // a's and migrates to a new server; once both are idle, that server
        // is drained and b's replica moves back with 200 GB of state (1,000 s
        // at 200 MB/s). b's second cell, submitted while it moves, waits.
        let policy = Policy {
            gpus_per_server: 1,
            min_servers: 1,
            headroom_gpus: 0,
            idle_servers: 0,
            scale_in_room: 0.0,
            scale_in_cooldown: Duration::ZERO,
            ..Policy::default()
        };
        let mut w = workload(vec![
            session("a", 0, 60 * MINUTE, &[(MINUTE, 10 * MINUTE, 1)]),
            session(
                "b",
                0,
                60 * MINUTE,
                &[(2 * MINUTE, MINUTE, 1), (20 * MINUTE, MINUTE, 1)],
            ),
        ]);
        w.sessions[1].cells[1].state_bytes = 200 * GB;
        let o = run(&w, Mode::NotebookOs { replicas: 1 }, &policy);
        assert_eq!(o.drain_moves, 1, "{o:?}");
        let moved = o.delays[2];
        assert!(moved.sync >= 5 * MINUTE, "{moved:?}");
        assert!(moved.total() < 1_000 * SECOND, "{moved:?}");
    }

    #[test]
    fn a_short_cell_on_the_idle_server_brings_no_new_server() {
        // One server, one kernel: while one of its 1-GPU cells runs no server
        // is wholly idle, for a minute at a time.
        let grace = Policy {
            min_servers: 1,
            headroom_gpus: 0,
            ..Policy::default()
        };
        let eager = Policy {
            idle_server_grace: Duration::ZERO,
            ..grace.clone()
        };
        let cells: Vec<_> = (1..=5).map(|i| (i * 10 * MINUTE, MINUTE, 1)).collect();
        let w = workload(vec![session("k", 0, 60 * MINUTE, &cells)]);
        let mode = Mode::NotebookOs { replicas: 1 };
        let eager = run(&w, mode, &eager);
        assert!(eager.servers_added >= 1, "{eager:?}");
        let o = run(&w, mode, &grace);
        assert_eq!(o.servers_added, 0, "{o:?}");
        assert!(totals(&o).iter().all(|&d| d < SECOND), "{o:?}");
        // A shortage that lasts does bring one.
        let long = vec![(MINUTE, 2 * grace.idle_server_grace.as_millis() as Ms, 1)];
        let o = run(
            &workload(vec![session("k", 0, 60 * MINUTE, &long)]),
            mode,
            &grace,
        );
        assert_eq!(o.servers_added, 1, "{o:?}");
    }

    #[test]
    fn servers_added_to_place_a_kernel_stay_for_the_placement_cooldown() {
        // Ratio 1: a's replicas fill the three servers' subscriptions, so b
        // waits for three more. b ends at 30 minutes; its servers go after
        // the ordinary hour's cool-down, or after the placement one.
        let policy = Policy {
            gpus_per_server: 8,
            min_servers: 3,
            subscription_ratio: 1.0,
            headroom_gpus: 0,
            idle_servers: 0,
            scale_in_room: 0.0,
            ..Policy::default()
        };
        let quick = Policy {
            placement_cooldown: Duration::ZERO,
            ..policy.clone()
        };
        let w = workload(vec![
            session("a", 0, 360 * MINUTE, &[(MINUTE, MINUTE, 8)]),
            session("b", 2 * MINUTE, 30 * MINUTE, &[(3 * MINUTE, MINUTE, 8)]),
        ]);
        // When the cluster was back to its three servers.
        let shrunk = |o: &Outcome| {
            let last_big = o.timeline.iter().rposition(|&(_, gpus, _)| gpus > 24);
            o.timeline[last_big.expect("servers were added") + 1].0
        };
        let mode = Mode::NotebookOs { replicas: 3 };
        let o = run(&w, mode, &quick);
        assert_eq!((o.servers_added, o.servers_removed), (3, 3), "{o:?}");
        assert!(shrunk(&o) < 120 * MINUTE, "{}", shrunk(&o));
        let o = run(&w, mode, &policy);
        assert_eq!((o.servers_added, o.servers_removed), (3, 3), "{o:?}");
        assert!(shrunk(&o) >= 242 * MINUTE, "{}", shrunk(&o));
    }

    fn synthetic(sessions: usize, seed: u64) -> Workload {
        let spec = crate::sim::workload::Synthetic {
            sessions,
            ..Default::default()
        };
        Workload::synthetic(&spec, seed)
    }

    #[test]
    fn same_seed_same_outcome() {
        let w = synthetic(200, 5);
        let modes = [
            Mode::Reservation,
            Mode::Batch,
            Mode::NotebookOs { replicas: 3 },
        ];
        let a = crate::sim::run(&w, &modes, &Policy::default(), &Costs::default(), 5);
        let b = crate::sim::run(&w, &modes, &Policy::default(), &Costs::default(), 5);
        assert_eq!(a, b);
    }

    #[test]
    fn notebookos_knobs_do_not_move_the_baselines() {
        let w = synthetic(100, 3);
        let modes = [Mode::Reservation, Mode::Batch];
        let tuned = Policy {
            headroom_gpus: 0,
            idle_servers: 0,
            scale_in_after: Duration::from_secs(30),
            scale_in_cooldown: Duration::ZERO,
            subscription_ratio: 3.0,
            ..Policy::default()
        };
        let a = crate::sim::run(&w, &modes, &Policy::default(), &costs(), 3);
        let b = crate::sim::run(&w, &modes, &tuned, &costs(), 3);
        assert_eq!(a, b);
        // The knobs do reach notebookos.
        let n = [Mode::NotebookOs { replicas: 3 }];
        let a = crate::sim::run(&w, &n, &Policy::default(), &costs(), 3);
        let b = crate::sim::run(&w, &n, &tuned, &costs(), 3);
        assert_ne!(a[0].provisioned_gpu_ms, b[0].provisioned_gpu_ms);
    }

    /// The production trace, from `$NOTEBOOKOS_TRACES` or `../shared/traces`.
    #[test]
    fn session_trace_replays_deterministically() {
        let traces = std::env::var_os("NOTEBOOKOS_TRACES").map_or_else(
            || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/traces"),
            std::path::PathBuf::from,
        );
        let path = traces.join("adobe_sensei_june_1-2_2021_sessions.json");
        if !path.exists() {
            eprintln!("SKIPPED: {} is absent", path.display());
            return;
        }
        let w = Workload::from_session_trace(&path).unwrap();
        assert_eq!(w.sessions.len(), 59);
        assert_eq!(w.cells(), 790);
        let modes = [
            Mode::Reservation,
            Mode::Batch,
            Mode::NotebookOs { replicas: 1 },
            Mode::NotebookOs { replicas: 3 },
        ];
        let a = crate::sim::run(&w, &modes, &Policy::default(), &Costs::default(), 42);
        let b = crate::sim::run(&w, &modes, &Policy::default(), &Costs::default(), 42);
        assert_eq!(a, b);
        // Every mode runs the same cells: used GPU-hours are the trace's.
        let used: u128 = w
            .sessions
            .iter()
            .flat_map(|s| &s.cells)
            .map(|c| u128::from(c.gpus) * u128::from(c.duration))
            .sum();
        assert!(a.iter().all(|o| o.used_gpu_ms == used));
    }
}
