//! The discrete-event engine: one workload, one way of running it.
//!
//! Every decision is the live code's: placement, migration and autoscaling
//! come from [`crate::cluster::policy`], and who runs a cell from the
//! replicas' own state machine, [`crate::replica::applier`], fed the same
//! entries the log would hold. The engine supplies only time and the
//! modelled costs ([`Costs`]).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};

use crate::cluster::policy::{ClusterView, Policy, PolicyError, Scale, ServerId, ServerView};
use crate::cluster::provider::{InProcess, Provider};
use crate::replica::applier::Applier;
use crate::replica::entry::{Entry, Frames};

use super::rng::Rng;
use super::workload::{Ms, Store, Workload, SECOND};

/// How sessions get GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
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
            Mode::Reservation => "Reservation".into(),
            Mode::Batch => "Batch (FCFS)".into(),
            Mode::NotebookOs { replicas } => format!("notebookos-{replicas}"),
        }
    }

    /// The policy this mode runs under, from the shared knobs.
    pub fn policy(&self, base: &Policy) -> Policy {
        match *self {
            // Holding GPUs for a session's life leaves nothing to oversubscribe.
            Mode::Reservation => Policy {
                replicas: 1,
                subscription_ratio: 1.0,
                min_servers: 1,
                pack: true,
                ..base.clone()
            },
            Mode::Batch => Policy {
                replicas: 1,
                min_servers: 1,
                pack: true,
                ..base.clone()
            },
            Mode::NotebookOs { replicas } => Policy {
                replicas,
                min_servers: base.min_servers.max(replicas),
                ..base.clone()
            },
        }
    }
}

/// Modelled costs; `docs/simulator.md` says where each number comes from.
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
}

impl Default for Costs {
    fn default() -> Self {
        Self {
            scale_out_delay: 90 * SECOND,
            commit_us: 2_500,
            replica_start: 2 * SECOND,
            container_start: 5 * SECOND,
            autoscale_every: 30 * SECOND,
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    pub mode: String,
    pub cells: usize,
    /// Server GPUs paid for (booting, serving or draining), GPU-ms.
    pub provisioned_gpu_ms: u128,
    /// GPUs bound to a session or cell (reserved, loading or running).
    pub held_gpu_ms: u128,
    /// GPUs running cells.
    pub used_gpu_ms: u128,
    /// Submission to start of execution, per cell, in workload order.
    pub delays: Vec<Ms>,
    pub migrations: usize,
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
    CellEnd { session: usize, cell: usize },
    ServerReady,
    SessionStart { session: usize },
    CellSubmit { session: usize, cell: usize },
    MigrateCheck { session: usize, cell: usize },
    SessionStop { session: usize },
    Autoscale,
}

#[derive(Debug)]
struct Server {
    gpus: u32,
    idle: u32,
    subscribed: u32,
    replicas: u32,
    draining: bool,
    ready_at: Ms,
    last_active: Ms,
}

#[derive(Debug, Default)]
struct SessionState {
    /// Servers of its replicas (notebookos), or of its reservation.
    hosts: Vec<ServerId>,
    placed: bool,
    /// When the current cell was submitted.
    submitted: Ms,
    /// The server running the current cell.
    running_on: Option<ServerId>,
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
            out: Outcome {
                mode: mode.name(),
                cells: workload.cells(),
                delays: vec![0; workload.cells()],
                ..Outcome::default()
            },
            policy,
        };
        engine.add_servers(engine.policy.min_servers, 0);
        for (i, s) in workload.sessions.iter().enumerate() {
            engine.at(s.start, Event::SessionStart { session: i });
            engine.at(s.stop, Event::SessionStop { session: i });
        }
        engine.at(0, Event::Autoscale);
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
        for s in self.servers.values_mut() {
            self.out.provisioned_gpu_ms += dt * u128::from(s.gpus);
            let held = s.gpus - s.idle;
            self.out.held_gpu_ms += dt * u128::from(held);
            if held > 0 && t >= s.ready_at {
                s.last_active = t;
            }
        }
        self.now = self.now.max(t);
    }

    fn record(&mut self) {
        let provisioned: u32 = self.servers.values().map(|s| s.gpus).sum();
        let held: u32 = self.servers.values().map(|s| s.gpus - s.idle).sum();
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
            Event::MigrateCheck { session, cell } => self.migrate_check(session, cell),
            Event::ServerReady => self.retry(),
            Event::Autoscale => {
                self.autoscale();
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
                    idle_gpus: s.idle,
                    subscribed: s.subscribed,
                    replicas: s.replicas,
                    draining: s.draining,
                    idle_for: if s.idle == s.gpus {
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

    // ---- sessions

    fn session_start(&mut self, session: usize) {
        match self.mode {
            Mode::Batch => self.sessions[session].placed = true,
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
            Mode::Batch if spec.gpus == 0 => {
                // CPU cells need a container, not a GPU: they never queue.
                let at = self.now + self.costs.container_start + self.load_ms(spec.state_bytes);
                self.start(session, cell, None, at);
            }
            Mode::Batch => {
                self.waiting.push_back((session, cell));
                self.retry();
            }
            Mode::Reservation if placed => {
                let host = self.sessions[session].hosts.first().cloned();
                self.start(session, cell, host, self.now);
            }
            Mode::NotebookOs { .. } if placed && self.elect(session, cell) => {}
            _ => {
                self.waiting.push_back((session, cell));
                if placed {
                    self.at(
                        self.now + ms(self.policy.migrate_after),
                        Event::MigrateCheck { session, cell },
                    );
                }
            }
        }
    }

    /// Runs the cell's election among the session's replicas, as the live
    /// replicas do: replica 1 puts its LEAD in the Request when it can take
    /// the GPUs; otherwise every replica bids and the first LEAD wins.
    fn elect(&mut self, session: usize, cell: usize) -> bool {
        let gpus = self.workload.sessions[session].cells[cell].gpus;
        let hosts = self.sessions[session].hosts.clone();
        let voters: BTreeSet<u64> = (1..=hosts.len() as u64).collect();
        // Replica 1 bids first; the others' bids commit in a random order.
        let mut order: Vec<u64> = voters.iter().copied().skip(1).collect();
        self.rng.shuffle(&mut order);
        order.insert(0, 1);
        // The live replicas' own state machine decides, from the same log.
        let mut log = Applier::new(1, 1, false);
        log.membership(voters);
        let mut winner = None;
        let mut index = 0;
        let mut apply = |log: &mut Applier, entry| {
            index += 1;
            log.apply(index, entry);
        };
        for id in order {
            let host = &hosts[(id - 1) as usize];
            let lead = self.servers.get(host).is_some_and(|s| s.idle >= gpus);
            let entry = if id == 1 {
                Entry::Request {
                    cell: "cell".into(),
                    request: Frames::default(),
                    lead: lead.then_some(1),
                }
            } else {
                Entry::Bid {
                    cell: "cell".into(),
                    replica: id,
                    lead,
                }
            };
            apply(&mut log, entry);
            if id == 1 && !lead {
                // Replica 1 answers its own Request with a YIELD, as the others do.
                apply(
                    &mut log,
                    Entry::Bid {
                        cell: "cell".into(),
                        replica: 1,
                        lead: false,
                    },
                );
            }
            winner = log.state().last_winner;
            if winner.is_some() {
                break;
            }
        }
        let Some(winner) = winner else {
            return false;
        };
        let host = hosts[(winner - 1) as usize].clone();
        self.take(&host, gpus);
        // The Request carrying replica 1's LEAD is one commit; anyone else's
        // LEAD is a second.
        let commits = if winner == 1 { 1 } else { 2 };
        let at = self.now + (commits * self.costs.commit_us).div_ceil(1000);
        self.start(session, cell, Some(host), at);
        true
    }

    fn start(&mut self, session: usize, cell: usize, host: Option<ServerId>, at: Ms) {
        let spec = &self.workload.sessions[session].cells[cell];
        let state = &mut self.sessions[session];
        self.out.delays[self.first_cell[session] + cell] = at - state.submitted;
        self.out.used_gpu_ms += u128::from(spec.gpus) * u128::from(spec.duration);
        state.running_on = host;
        self.at(at + spec.duration, Event::CellEnd { session, cell });
    }

    fn cell_end(&mut self, session: usize, cell: usize) {
        let cells = &self.workload.sessions[session].cells;
        let gpus = cells[cell].gpus;
        let next = cells.get(cell + 1).map(|c| c.submit);
        let state = &mut self.sessions[session];
        state.ended += 1;
        if let Some(host) = state.running_on.take() {
            if self.mode != Mode::Reservation {
                self.give(&host, gpus);
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
    /// has started and loaded the state.
    fn migrate_check(&mut self, session: usize, cell: usize) {
        if !self.waiting.contains(&(session, cell)) {
            return;
        }
        let gpus = self.workload.sessions[session].cells[cell].gpus;
        let hosts = self.sessions[session].hosts.clone();
        match self.policy.migrate(&self.view(false), gpus, &hosts) {
            Ok(m) => {
                self.waiting.retain(|&w| w != (session, cell));
                let kernel_gpus = self.workload.sessions[session].gpus();
                self.take(&m.to, gpus);
                self.subscribe(&m.to, kernel_gpus);
                self.unsubscribe(&m.from, kernel_gpus);
                for h in &mut self.sessions[session].hosts {
                    if *h == m.from {
                        *h = m.to.clone();
                    }
                }
                self.out.migrations += 1;
                let state_bytes = self.workload.sessions[session].cells[cell].state_bytes;
                let at = self.now + self.costs.replica_start + self.load_ms(state_bytes);
                self.start(session, cell, Some(m.to), at);
            }
            Err(_) => self.at(
                self.now + ms(self.policy.migrate_after),
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
                let at = self.now + self.costs.container_start + self.load_ms(spec.state_bytes);
                self.take(&host, gpus);
                self.start(session, cell, Some(host), at);
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
                self.now + ms(self.policy.migrate_after),
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
                    self.start(session, cell, host, self.now);
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
            .map(
                |&s| match self.policy.place(&view, self.workload.sessions[s].gpus()) {
                    Err(PolicyError::NotEnoughServers { wanted, found, .. }) => wanted - found,
                    _ => 0,
                },
            )
            .max()
            .unwrap_or(0);
        match self.policy.scale(&view, waiting_gpus, short) {
            Scale::Hold => {}
            Scale::Out(n) => {
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

    /// Moves every replica off `id` (each to a server the policy picks),
    /// then removes it; if one cannot move, the server stays.
    fn drain(&mut self, id: &ServerId) {
        if let Some(s) = self.servers.get_mut(id) {
            s.draining = true;
        }
        for session in 0..self.sessions.len() {
            if !self.sessions[session].hosts.contains(id) {
                continue;
            }
            let gpus = self.workload.sessions[session].gpus();
            let others: Vec<ServerId> = self.sessions[session]
                .hosts
                .iter()
                .filter(|h| *h != id)
                .cloned()
                .collect();
            match self.policy.replace(&self.view(false), gpus, &others) {
                Ok(to) => {
                    self.subscribe(&to, gpus);
                    self.unsubscribe(id, gpus);
                    for h in &mut self.sessions[session].hosts {
                        if h == id {
                            *h = to.clone();
                        }
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

    fn run(w: &Workload, mode: Mode, policy: &Policy) -> Outcome {
        Engine::new(w, mode, policy, Costs::default(), 1).run()
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
        assert_eq!(o.delays, vec![0]);
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
        assert_eq!(o.delays, vec![3]);
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
        assert_eq!(o.delays, vec![load, load + 10 * MINUTE + load]);
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
        assert_eq!(o.delays, vec![3, 5]);
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
        let o = run(&w, Mode::NotebookOs { replicas: 1 }, &fixed(2, 1));
        assert_eq!(o.migrations, 1);
        let migrated = 2 * SECOND + 2 * SECOND + 10 * SECOND;
        assert_eq!(o.delays, vec![3, 3, migrated]);
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
        let mut d = o.delays.clone();
        d.sort_unstable();
        assert!(d[3] >= Costs::default().scale_out_delay, "{d:?}");
        assert!(d[..3].iter().all(|&x| x < SECOND), "{d:?}");
    }

    #[test]
    fn same_seed_same_outcome() {
        let spec = crate::sim::workload::Synthetic {
            sessions: 200,
            ..Default::default()
        };
        let w = Workload::synthetic(&spec, 5);
        let modes = [
            Mode::Reservation,
            Mode::Batch,
            Mode::NotebookOs { replicas: 3 },
        ];
        let a = crate::sim::run(&w, &modes, &Policy::default(), &Costs::default(), 5);
        let b = crate::sim::run(&w, &modes, &Policy::default(), &Costs::default(), 5);
        assert_eq!(a, b);
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
