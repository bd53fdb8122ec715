//! The scheduling policy: where replicas go, where one moves when none can
//! run a cell, and when servers are added or removed.
//!
//! Pure and deterministic: it reads a [`ClusterView`] (a snapshot the caller
//! builds from agent reports, or the simulator from its model) and returns
//! decisions; time is passed in. The live cluster and the simulator call
//! these same functions, so what the simulator measures is this policy.
//!
//! Terms:
//! * a server's **subscription** is the sum, over the replicas it hosts, of
//!   the GPUs their kernel may ask for. It may exceed the server's GPUs up to
//!   `subscription_ratio` times: replicas hold GPUs only while a cell runs.
//! * a server's **idle** GPUs are those no running cell holds right now.
//! * **committed demand** is the GPUs running cells hold plus those that
//!   waiting cells ask for.

use std::collections::BTreeSet;
use std::time::Duration;

pub type ServerId = String;

/// One server as the policy sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerView {
    pub id: ServerId,
    pub gpus: u32,
    /// GPUs not held by a running cell.
    pub idle_gpus: u32,
    /// Sum of the GPUs the kernels of its replicas may ask for.
    pub subscribed: u32,
    pub replicas: u32,
    /// Being emptied before removal: receives nothing new.
    pub draining: bool,
    /// How long no cell has run on it (zero while one runs).
    pub idle_for: Duration,
}

impl ServerView {
    pub fn new(id: impl Into<ServerId>, gpus: u32) -> Self {
        Self {
            id: id.into(),
            gpus,
            idle_gpus: gpus,
            subscribed: 0,
            replicas: 0,
            draining: false,
            idle_for: Duration::ZERO,
        }
    }

    fn subscription_after(&self, extra: u32) -> f64 {
        if self.gpus == 0 {
            return f64::INFINITY;
        }
        f64::from(self.subscribed + extra) / f64::from(self.gpus)
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterView {
    pub servers: Vec<ServerView>,
}

impl ClusterView {
    pub fn get(&self, id: &str) -> Option<&ServerView> {
        self.servers.iter().find(|s| s.id == id)
    }

    fn get_mut(&mut self, id: &str) -> Option<&mut ServerView> {
        self.servers.iter_mut().find(|s| s.id == id)
    }

    /// GPUs of the servers that take work (not draining).
    pub fn capacity(&self) -> u32 {
        self.servers
            .iter()
            .filter(|s| !s.draining)
            .map(|s| s.gpus)
            .sum()
    }

    /// GPUs held by running cells, on every server.
    pub fn busy(&self) -> u32 {
        self.servers.iter().map(|s| s.gpus - s.idle_gpus).sum()
    }

    /// Records a placement, so the next decision on this view sees it.
    pub fn add_replica(&mut self, server: &str, kernel_gpus: u32) {
        if let Some(s) = self.get_mut(server) {
            s.replicas += 1;
            s.subscribed += kernel_gpus;
        }
    }

    pub fn remove_replica(&mut self, server: &str, kernel_gpus: u32) {
        if let Some(s) = self.get_mut(server) {
            s.replicas = s.replicas.saturating_sub(1);
            s.subscribed = s.subscribed.saturating_sub(kernel_gpus);
        }
    }

    /// Records GPUs taken by a cell (`take`) or given back.
    pub fn take_gpus(&mut self, server: &str, n: u32) {
        if let Some(s) = self.get_mut(server) {
            s.idle_gpus = s.idle_gpus.saturating_sub(n);
            s.idle_for = Duration::ZERO;
        }
    }

    pub fn give_gpus(&mut self, server: &str, n: u32) {
        if let Some(s) = self.get_mut(server) {
            s.idle_gpus = (s.idle_gpus + n).min(s.gpus);
        }
    }

    pub fn remove_server(&mut self, id: &str) {
        self.servers.retain(|s| s.id != id);
    }
}

/// Servers, not draining, with every GPU idle.
fn whole_idle(view: &ClusterView) -> usize {
    view.servers
        .iter()
        .filter(|s| !s.draining && s.idle_gpus == s.gpus)
        .count()
}

/// The knobs; defaults follow the NotebookOS paper where it gives one.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Replicas per kernel, each on a distinct server.
    pub replicas: usize,
    /// Most a server may be subscribed, as a multiple of its GPUs (paper: 7).
    pub subscription_ratio: f64,
    /// GPUs of a server the autoscaler adds (paper: 8).
    pub gpus_per_server: u32,
    /// Scale out when committed demand exceeds this share of capacity.
    pub scale_out_at: f64,
    /// Scale in while committed demand stays under this share of the
    /// capacity left after removing a server.
    pub scale_in_below: f64,
    /// A server must have run nothing this long before it is removed.
    pub scale_in_after: Duration,
    /// Idle GPUs to keep beyond committed demand, so cells start at once.
    pub headroom_gpus: u32,
    pub min_servers: usize,
    pub max_servers: usize,
    /// A cell every replica yielded on waits this long before a migration.
    pub migrate_after: Duration,
    /// Best fit (fullest server that fits) instead of spreading; what a
    /// scheduler that holds GPUs for long (Reservation, batch) wants.
    pub pack: bool,
    /// Move a replica of a kernel between cells when none of its servers
    /// has its GPUs idle ([`Policy::rebalance`]), so that its next cell does
    /// not wait for a migration; at most this many moves per round (0: off).
    pub rebalance_moves: usize,
    /// No server is removed this soon after servers were asked for: demand
    /// that needed them is likely to come back (damps churn).
    pub scale_in_cooldown: Duration,
    /// No server is removed this soon after servers were asked for because
    /// kernels found none with room for their replicas. Subscriptions come
    /// and go with sessions (hours), not cells (minutes): a server removed
    /// as a few sessions end is asked for again by the next ones to start
    /// (most of the synthetic workload's churn, `docs/simulator.md`).
    pub placement_cooldown: Duration,
    /// Subscription room, in servers, that must stay after a removal.
    pub scale_in_room: f64,
    /// Servers to keep with every GPU idle. Idle GPUs scattered over busy
    /// servers do not serve a kernel that asks for a whole server's GPUs;
    /// without one idle server its cell waits for a replica to move, state
    /// and all (the session trace's delay tail, `docs/simulator.md`).
    pub idle_servers: usize,
    /// A server is added for `idle_servers` only once fewer servers than that
    /// have been wholly idle this long: cells are short, and a server asked
    /// for every time one briefly runs on the idle server is removed again
    /// minutes later (most of the churn left at low load).
    pub idle_server_grace: Duration,
}

/// What the autoscaler knows beyond the cluster's snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Pressure {
    /// GPUs asked for by cells waiting for one.
    pub waiting_gpus: u32,
    /// Servers missing to place the kernels waiting for servers.
    pub unplaceable: usize,
    /// Since servers were last asked for (None: never).
    pub since_out: Option<Duration>,
    /// Since servers were last asked for while `unplaceable` was not zero
    /// (None: never).
    pub since_placement_out: Option<Duration>,
    /// How long fewer than `idle_servers` servers have been wholly idle
    /// (zero while enough are; see [`Policy::idle_short`]).
    pub idle_short_for: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            replicas: 3,
            subscription_ratio: 7.0,
            gpus_per_server: 8,
            scale_out_at: 0.75,
            scale_in_below: 0.5,
            scale_in_after: Duration::from_secs(300),
            headroom_gpus: 8,
            min_servers: 3,
            max_servers: 1024,
            migrate_after: Duration::from_secs(2),
            pack: false,
            rebalance_moves: 4,
            // An hour, a server of room and two minutes' grace for the idle
            // server: on the synthetic 2000-session workload servers added
            // fell from 1,667 to 212, and on the session trace no seed tried
            // starts fewer cells within 1 s (docs/simulator.md, "Churn").
            // One idle server: with rebalancing, it keeps the session trace's
            // p99 delay under 0.25 s on every seed tried, which rebalancing
            // alone does not ("The tail").
            scale_in_cooldown: Duration::from_secs(60 * 60),
            // Four hours: servers added on the synthetic workload 213 -> 179
            // (seed 1) for 0.4 points of the oracle's saving, and the session
            // trace, whose kernels always find room, is unchanged.
            placement_cooldown: Duration::from_secs(4 * 60 * 60),
            scale_in_room: 1.0,
            idle_servers: 1,
            idle_server_grace: Duration::from_secs(120),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("{wanted} server(s) needed, {found} can take a replica asking for {gpus} GPU(s)")]
    NotEnoughServers {
        wanted: usize,
        found: usize,
        gpus: u32,
    },
    #[error("no server outside the kernel's has {gpus} idle GPU(s) and room for a replica")]
    NoServerFree { gpus: u32 },
}

/// A kernel as [`Policy::rebalance`] sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelView {
    /// GPUs its cells ask for.
    pub gpus: u32,
    /// Servers of its replicas.
    pub hosts: Vec<ServerId>,
}

/// Move one replica of a kernel from `from` to `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migration {
    pub from: ServerId,
    pub to: ServerId,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scale {
    Hold,
    /// Ask the provider for this many servers.
    Out(usize),
    /// Drain these servers (move their replicas away), then remove them.
    In(Vec<ServerId>),
}

impl Policy {
    /// Can `s` take one more replica of a kernel asking for `gpus`?
    fn has_room(&self, s: &ServerView, gpus: u32) -> bool {
        !s.draining && s.gpus >= gpus && s.subscription_after(gpus) <= self.subscription_ratio
    }

    /// Spreading order, or its reverse when packing.
    fn order(&self, spread: std::cmp::Ordering) -> std::cmp::Ordering {
        if self.pack {
            spread.reverse()
        } else {
            spread
        }
    }

    /// Servers for a new kernel's replicas: distinct, with room, least
    /// subscribed first (ties: most idle GPUs, then id), so load spreads.
    pub fn place(&self, view: &ClusterView, gpus: u32) -> Result<Vec<ServerId>, PolicyError> {
        self.place_n(view, gpus, self.replicas, &BTreeSet::new())
    }

    /// One server for a replica replacing a lost one; `hosts` are the
    /// kernel's surviving servers.
    pub fn replace(
        &self,
        view: &ClusterView,
        gpus: u32,
        hosts: &[ServerId],
    ) -> Result<ServerId, PolicyError> {
        let exclude: BTreeSet<&str> = hosts.iter().map(String::as_str).collect();
        let mut chosen = self.place_n(view, gpus, 1, &exclude)?;
        Ok(chosen.remove(0))
    }

    /// Servers to add before a kernel asking for `gpus` can place `missing`
    /// more replicas outside `hosts` ([`Pressure::unplaceable`]).
    pub fn servers_missing(
        &self,
        view: &ClusterView,
        gpus: u32,
        missing: usize,
        hosts: &[ServerId],
    ) -> usize {
        let exclude: BTreeSet<&str> = hosts.iter().map(String::as_str).collect();
        match self.place_n(view, gpus, missing, &exclude) {
            Err(PolicyError::NotEnoughServers { wanted, found, .. }) => wanted - found,
            _ => 0,
        }
    }

    fn place_n(
        &self,
        view: &ClusterView,
        gpus: u32,
        n: usize,
        exclude: &BTreeSet<&str>,
    ) -> Result<Vec<ServerId>, PolicyError> {
        let mut candidates: Vec<&ServerView> = view
            .servers
            .iter()
            .filter(|s| !exclude.contains(s.id.as_str()) && self.has_room(s, gpus))
            .collect();
        if candidates.len() < n {
            return Err(PolicyError::NotEnoughServers {
                wanted: n,
                found: candidates.len(),
                gpus,
            });
        }
        candidates.sort_by(|a, b| {
            let spread = a
                .subscription_after(gpus)
                .total_cmp(&b.subscription_after(gpus))
                .then(b.idle_gpus.cmp(&a.idle_gpus));
            self.order(spread).then(a.id.cmp(&b.id))
        });
        Ok(candidates[..n].iter().map(|s| s.id.clone()).collect())
    }

    /// Where to move one replica so a cell asking for `gpus` runs now: the
    /// server outside `hosts` with the most idle GPUs (it must have `gpus`
    /// idle and room for the replica); the replica moved is the one on the
    /// most subscribed host.
    pub fn migrate(
        &self,
        view: &ClusterView,
        gpus: u32,
        hosts: &[ServerId],
    ) -> Result<Migration, PolicyError> {
        let exclude: BTreeSet<&str> = hosts.iter().map(String::as_str).collect();
        let to = self
            .pick_idle(view, gpus, &exclude)
            .ok_or(PolicyError::NoServerFree { gpus })?;
        // A host that vanished from the view is the first to leave.
        let from = hosts
            .iter()
            .max_by(|a, b| {
                let load = |id: &ServerId| {
                    view.get(id)
                        .map_or(f64::INFINITY, |s| s.subscription_after(0))
                };
                load(a).total_cmp(&load(b)).then(b.cmp(a))
            })
            .cloned()
            .ok_or(PolicyError::NoServerFree { gpus })?;
        Ok(Migration { from, to })
    }

    /// Kernels between cells (`idle`) none of whose servers has their GPUs
    /// idle: a cell now would wait for a migration (a replica start plus
    /// the state's transfer). One replica of each moves ahead of that, to
    /// the server [`Policy::migrate`] picks; a server chosen counts its GPUs
    /// as spoken for, so two kernels are not both moved onto the same idle
    /// GPUs. Largest kernels first (they are the hardest to place), at most
    /// `rebalance_moves`. Returns (index into `idle`, move).
    pub fn rebalance(&self, view: &ClusterView, idle: &[KernelView]) -> Vec<(usize, Migration)> {
        let mut view = view.clone();
        let mut order: Vec<usize> = (0..idle.len())
            .filter(|&i| idle[i].gpus > 0 && !idle[i].hosts.is_empty())
            .collect();
        order.sort_by_key(|&i| (std::cmp::Reverse(idle[i].gpus), i));
        let mut moves = Vec::new();
        for i in order {
            if moves.len() >= self.rebalance_moves {
                break;
            }
            let k = &idle[i];
            let can_run = k
                .hosts
                .iter()
                .any(|h| view.get(h).is_some_and(|s| s.idle_gpus >= k.gpus));
            if can_run {
                continue;
            }
            if let Ok(m) = self.migrate(&view, k.gpus, &k.hosts) {
                view.remove_replica(&m.from, k.gpus);
                view.add_replica(&m.to, k.gpus);
                view.take_gpus(&m.to, k.gpus);
                moves.push((i, m));
            }
        }
        moves
    }

    /// The server outside `exclude` with the most idle GPUs, if one has
    /// `gpus` idle and room for a replica (ties: least subscribed, then id).
    pub fn pick_idle(
        &self,
        view: &ClusterView,
        gpus: u32,
        exclude: &BTreeSet<&str>,
    ) -> Option<ServerId> {
        view.servers
            .iter()
            .filter(|s| {
                !exclude.contains(s.id.as_str()) && self.has_room(s, gpus) && s.idle_gpus >= gpus
            })
            .min_by(|a, b| {
                let spread = b.idle_gpus.cmp(&a.idle_gpus).then(
                    a.subscription_after(gpus)
                        .total_cmp(&b.subscription_after(gpus)),
                );
                self.order(spread).then(a.id.cmp(&b.id))
            })
            .map(|s| s.id.clone())
    }

    /// Whether fewer than `idle_servers` servers have every GPU idle (the
    /// caller times how long, for [`Pressure::idle_short_for`]).
    pub fn idle_short(&self, view: &ClusterView) -> bool {
        whole_idle(view) < self.idle_servers
    }

    /// Committed demand against capacity: add servers when demand (plus
    /// headroom) passes `scale_out_at` of capacity, or when `unplaceable`
    /// replicas found no server; remove long-idle servers while the rest
    /// stays under `scale_in_below`. `waiting_gpus` are asked for by cells
    /// that wait for a GPU.
    /// Within `scale_in_cooldown` of the last scale-out, and within
    /// `placement_cooldown` of the last one that placed kernels, nothing is
    /// removed.
    pub fn scale(&self, view: &ClusterView, pressure: Pressure) -> Scale {
        let Pressure {
            waiting_gpus,
            unplaceable,
            since_out,
            since_placement_out,
            idle_short_for,
        } = pressure;
        let active = view.servers.iter().filter(|s| !s.draining).count();
        let capacity = f64::from(view.capacity());
        let demand = f64::from(view.busy() + waiting_gpus + self.headroom_gpus);
        let per_server = f64::from(self.gpus_per_server.max(1));

        let mut out = 0usize;
        if demand > self.scale_out_at * capacity {
            out = ((demand / self.scale_out_at - capacity) / per_server)
                .ceil()
                .max(1.0) as usize;
        }
        let whole_idle = whole_idle(view);
        let idle_wanted = if idle_short_for >= self.idle_server_grace {
            self.idle_servers.saturating_sub(whole_idle)
        } else {
            0
        };
        out = out
            .max(unplaceable)
            .max(self.min_servers.saturating_sub(active))
            .max(idle_wanted);
        let room = self.max_servers.saturating_sub(view.servers.len());
        if out > 0 {
            return if room > 0 {
                Scale::Out(out.min(room))
            } else {
                Scale::Hold
            };
        }

        if since_out.is_some_and(|t| t < self.scale_in_cooldown)
            || since_placement_out.is_some_and(|t| t < self.placement_cooldown)
        {
            return Scale::Hold;
        }
        // Least-used first: nothing running and long idle, fewest replicas
        // (those must move before removal), then id.
        let mut idle: Vec<&ServerView> = view
            .servers
            .iter()
            .filter(|s| !s.draining && s.idle_gpus == s.gpus && s.idle_for >= self.scale_in_after)
            .collect();
        idle.sort_by(|a, b| a.replicas.cmp(&b.replicas).then(a.id.cmp(&b.id)));
        let mut remove = Vec::new();
        let mut left = capacity;
        let mut servers_left = active;
        let subscribed_left: f64 = view
            .servers
            .iter()
            .filter(|s| !s.draining)
            .map(|s| f64::from(s.subscribed))
            .sum();
        for s in idle {
            let after = left - f64::from(s.gpus);
            // Its replicas must fit on the servers that stay, with room left
            // for the next kernels (else the next one to start asks for the
            // server back), and each kernel still needs `replicas` distinct
            // servers. Room is counted in servers the size of this one: a
            // live cluster's servers need not match `gpus_per_server`.
            let room = self.scale_in_room * f64::from(s.gpus);
            let fits = subscribed_left <= self.subscription_ratio * (after - room);
            // Every candidate is a whole idle server.
            let idle_left = whole_idle - remove.len() - 1;
            if servers_left <= self.min_servers.max(self.replicas)
                || idle_left < self.idle_servers
                || !fits
                || demand >= self.scale_in_below * after
            {
                break;
            }
            left = after;
            servers_left -= 1;
            remove.push(s.id.clone());
        }
        if remove.is_empty() {
            Scale::Hold
        } else {
            Scale::In(remove)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(n: usize, gpus: u32) -> ClusterView {
        ClusterView {
            servers: (0..n)
                .map(|i| ServerView::new(format!("s{i}"), gpus))
                .collect(),
        }
    }

    #[test]
    fn replicas_go_to_distinct_least_subscribed_servers() {
        let p = Policy::default();
        let mut v = cluster(4, 8);
        v.add_replica("s0", 4);
        let chosen = p.place(&v, 2).unwrap();
        assert_eq!(chosen, vec!["s1", "s2", "s3"]);
        for s in &chosen {
            v.add_replica(s, 2);
        }
        // s0 is at 4, the others at 2: next goes to the three at 2 again.
        assert_eq!(p.place(&v, 1).unwrap(), vec!["s1", "s2", "s3"]);
    }

    #[test]
    fn packing_fills_the_fullest_server_that_fits() {
        let p = Policy {
            replicas: 1,
            subscription_ratio: 1.0,
            pack: true,
            ..Policy::default()
        };
        let mut v = cluster(3, 8);
        v.add_replica("s1", 6);
        v.add_replica("s2", 2);
        assert_eq!(p.place(&v, 2).unwrap(), vec!["s1"]);
        assert_eq!(p.place(&v, 4).unwrap(), vec!["s2"]);
        assert_eq!(p.place(&v, 8).unwrap(), vec!["s0"]);
        v.take_gpus("s0", 1);
        v.take_gpus("s2", 6);
        assert_eq!(p.pick_idle(&v, 2, &BTreeSet::new()), Some("s2".into()));
    }

    #[test]
    fn oversubscription_stops_at_the_ratio() {
        let p = Policy {
            subscription_ratio: 2.0,
            ..Policy::default()
        };
        let mut v = cluster(3, 8);
        // 8 GPUs × 2 = 16 subscribed per server at most: two 8-GPU kernels fit.
        for _ in 0..2 {
            for s in p.place(&v, 8).unwrap() {
                v.add_replica(&s, 8);
            }
        }
        assert!(v.servers.iter().all(|s| s.subscribed == 16));
        assert_eq!(
            p.place(&v, 1),
            Err(PolicyError::NotEnoughServers {
                wanted: 3,
                found: 0,
                gpus: 1
            })
        );
        // GPUs are subscribed twice over, yet none is held.
        assert_eq!(v.busy(), 0);
    }

    #[test]
    fn too_few_servers_or_too_small_ones() {
        let p = Policy::default();
        assert!(matches!(
            p.place(&cluster(2, 8), 1),
            Err(PolicyError::NotEnoughServers {
                wanted: 3,
                found: 2,
                ..
            })
        ));
        assert!(matches!(
            p.place(&cluster(5, 4), 8),
            Err(PolicyError::NotEnoughServers { found: 0, .. })
        ));
    }

    #[test]
    fn draining_servers_take_nothing() {
        let p = Policy::default();
        let mut v = cluster(4, 8);
        v.servers[1].draining = true;
        assert_eq!(p.place(&v, 1).unwrap(), vec!["s0", "s2", "s3"]);
    }

    #[test]
    fn migration_goes_to_the_server_with_most_idle_gpus() {
        let p = Policy::default();
        let mut v = cluster(5, 8);
        let hosts: Vec<ServerId> = vec!["s0".into(), "s1".into(), "s2".into()];
        for h in &hosts {
            v.add_replica(h, 4);
            v.take_gpus(h, 6);
        }
        v.add_replica("s1", 4); // s1 is the most subscribed host
        v.take_gpus("s3", 2);
        let m = p.migrate(&v, 4, &hosts).unwrap();
        assert_eq!(
            m,
            Migration {
                from: "s1".into(),
                to: "s4".into()
            }
        );
    }

    #[test]
    fn no_server_free_means_no_migration() {
        let p = Policy::default();
        let mut v = cluster(4, 8);
        let hosts: Vec<ServerId> = vec!["s0".into(), "s1".into(), "s2".into()];
        v.take_gpus("s3", 6);
        assert_eq!(
            p.migrate(&v, 4, &hosts),
            Err(PolicyError::NoServerFree { gpus: 4 })
        );
        // Nothing outside the hosts at all.
        assert!(p.migrate(&cluster(3, 8), 1, &hosts).is_err());
    }

    #[test]
    fn two_kernels_racing_for_the_last_gpu() {
        let p = Policy::default();
        let mut v = cluster(5, 1);
        for s in ["s0", "s1", "s2", "s3"] {
            v.take_gpus(s, 1);
        }
        let a: Vec<ServerId> = vec!["s0".into(), "s1".into(), "s2".into()];
        let b: Vec<ServerId> = vec!["s1".into(), "s2".into(), "s3".into()];
        let first = p.migrate(&v, 1, &a).unwrap();
        assert_eq!(first.to, "s4");
        // The caller records the decision (the agent's grant is the real
        // arbiter); the second kernel then finds nothing free.
        v.take_gpus(&first.to, 1);
        assert_eq!(
            p.migrate(&v, 1, &b),
            Err(PolicyError::NoServerFree { gpus: 1 })
        );
    }

    #[test]
    fn server_lost_during_migration() {
        let p = Policy::default();
        let mut v = cluster(6, 8);
        let hosts: Vec<ServerId> = vec!["s0".into(), "s1".into(), "s2".into()];
        for h in &hosts {
            v.take_gpus(h, 8);
        }
        v.take_gpus("s5", 4);
        let m = p.migrate(&v, 8, &hosts).unwrap();
        assert_eq!(m.to, "s3");
        // The target dies before the new replica caught up: plan again.
        v.remove_server("s3");
        assert_eq!(p.migrate(&v, 8, &hosts).unwrap().to, "s4");
        v.remove_server("s4");
        assert!(p.migrate(&v, 8, &hosts).is_err());
        // A host that vanished is the replica to move.
        v.remove_server("s1");
        v.give_gpus("s5", 4);
        assert_eq!(
            p.migrate(&v, 8, &hosts).unwrap(),
            Migration {
                from: "s1".into(),
                to: "s5".into()
            }
        );
    }

    #[test]
    fn replacement_avoids_the_kernels_other_servers() {
        let p = Policy::default();
        let v = cluster(4, 8);
        let hosts: Vec<ServerId> = vec!["s0".into(), "s2".into()];
        assert_eq!(p.replace(&v, 1, &hosts).unwrap(), "s1");
        let both: Vec<ServerId> = vec!["s0".into(), "s1".into()];
        assert!(p.replace(&cluster(2, 8), 1, &both).is_err());
    }

    #[test]
    fn scale_out_when_demand_crosses_the_threshold() {
        let p = Policy {
            headroom_gpus: 0,
            min_servers: 1,
            ..Policy::default()
        };
        let mut v = cluster(4, 8); // 32 GPUs; scale out above 24 committed
        for s in ["s0", "s1", "s2"] {
            v.take_gpus(s, 8);
        }
        assert_eq!(p.scale(&v, Pressure::default()), Scale::Hold);
        // 24 busy + 8 waiting = 32 > 24: enough servers that 32 ≤ 0.75 × capacity.
        assert_eq!(
            p.scale(
                &v,
                Pressure {
                    waiting_gpus: 8,
                    ..Pressure::default()
                }
            ),
            Scale::Out(2)
        );
        // Replicas that found no server count too.
        assert_eq!(
            p.scale(
                &cluster(4, 8),
                Pressure {
                    unplaceable: 3,
                    ..Pressure::default()
                }
            ),
            Scale::Out(3)
        );
        let capped = Policy {
            max_servers: 5,
            ..p.clone()
        };
        assert_eq!(
            capped.scale(
                &v,
                Pressure {
                    waiting_gpus: 8,
                    ..Pressure::default()
                }
            ),
            Scale::Out(1)
        );
        let full = Policy {
            max_servers: 4,
            ..p
        };
        assert_eq!(
            full.scale(
                &v,
                Pressure {
                    waiting_gpus: 8,
                    ..Pressure::default()
                }
            ),
            Scale::Hold
        );
    }

    #[test]
    fn scale_in_removes_long_idle_servers_only() {
        let p = Policy {
            headroom_gpus: 0,
            ..Policy::default()
        };
        let mut v = cluster(6, 8);
        for s in &mut v.servers {
            s.idle_for = Duration::from_secs(600);
        }
        v.servers[0].idle_for = Duration::from_secs(10); // recently used
        v.take_gpus("s1", 2); // running a cell
        v.add_replica("s2", 1);
        // 2 busy: remove idle servers, fewest replicas first, down to 3.
        assert_eq!(
            p.scale(&v, Pressure::default()),
            Scale::In(vec!["s3".into(), "s4".into(), "s5".into()])
        );
        // With no demand it never goes below max(min_servers, replicas).
        let none = cluster(3, 8);
        assert_eq!(p.scale(&none, Pressure::default()), Scale::Hold);
    }

    #[test]
    fn scale_in_keeps_room_for_subscriptions() {
        let p = Policy {
            headroom_gpus: 0,
            subscription_ratio: 1.0,
            scale_in_room: 0.0,
            ..Policy::default()
        };
        let mut v = cluster(5, 8);
        for s in &mut v.servers {
            s.idle_for = Duration::from_secs(600);
        }
        for s in ["s0", "s1", "s2", "s3"] {
            v.add_replica(s, 8);
        }
        // 32 subscribed at ratio 1 needs 32 GPUs: only the empty s4 may go.
        assert_eq!(
            p.scale(&v, Pressure::default()),
            Scale::In(vec!["s4".into()])
        );
    }

    #[test]
    fn scale_in_leaves_a_server_of_subscription_room() {
        let p = Policy {
            headroom_gpus: 0,
            subscription_ratio: 1.0,
            scale_in_room: 1.0,
            ..Policy::default()
        };
        let mut v = cluster(6, 8);
        for s in &mut v.servers {
            s.idle_for = Duration::from_secs(600);
        }
        for s in ["s0", "s1", "s2", "s3"] {
            v.add_replica(s, 8);
        }
        // 32 subscribed at ratio 1 on 48 GPUs: removing s4 leaves 40, room
        // for one more server's worth; removing s5 too would leave none.
        assert_eq!(
            p.scale(&v, Pressure::default()),
            Scale::In(vec!["s4".into()])
        );
    }

    #[test]
    fn one_server_stays_wholly_idle() {
        let p = Policy {
            headroom_gpus: 0,
            ..Policy::default()
        };
        // One GPU taken on every server: plenty idle, none of it a whole server.
        let mut v = cluster(4, 8);
        for s in ["s0", "s1", "s2", "s3"] {
            v.take_gpus(s, 1);
        }
        assert!(p.idle_short(&v));
        // Only once it has lasted the grace: a short cell on the idle
        // server would otherwise bring a server that is removed again.
        let brief = Pressure {
            idle_short_for: p.idle_server_grace / 2,
            ..Pressure::default()
        };
        assert_eq!(p.scale(&v, brief), Scale::Hold);
        let lasting = Pressure {
            idle_short_for: p.idle_server_grace,
            ..Pressure::default()
        };
        assert_eq!(p.scale(&v, lasting), Scale::Out(1));
        let off = Policy {
            idle_servers: 0,
            ..p.clone()
        };
        assert!(!off.idle_short(&v));
        assert_eq!(off.scale(&v, lasting), Scale::Hold);

        // Three long-idle servers: two go, one stays idle.
        let mut v = cluster(6, 8);
        for s in &mut v.servers {
            s.idle_for = Duration::from_secs(600);
        }
        for s in ["s0", "s1", "s2"] {
            v.take_gpus(s, 1);
        }
        assert_eq!(
            p.scale(&v, Pressure::default()),
            Scale::In(vec!["s3".into(), "s4".into()])
        );
        assert_eq!(
            off.scale(&v, Pressure::default()),
            Scale::In(vec!["s3".into(), "s4".into(), "s5".into()])
        );
    }

    #[test]
    fn scale_in_room_is_counted_in_servers_of_the_cluster_s_size() {
        // Four 2-GPU servers while the policy's nominal server has 8: room
        // for two servers is 4 GPUs here, not 16 (which no removal leaves).
        let p = Policy {
            headroom_gpus: 0,
            scale_in_room: 2.0,
            ..Policy::default()
        };
        let mut v = cluster(4, 2);
        for s in &mut v.servers {
            s.idle_for = Duration::from_secs(600);
        }
        for s in ["s0", "s1", "s2", "s0", "s1", "s2"] {
            v.add_replica(s, 1);
        }
        assert_eq!(
            p.scale(&v, Pressure::default()),
            Scale::In(vec!["s3".into()])
        );
    }

    #[test]
    fn no_scale_in_within_the_cooldown_after_a_scale_out() {
        let p = Policy {
            headroom_gpus: 0,
            scale_in_cooldown: Duration::from_secs(1800),
            ..Policy::default()
        };
        let mut v = cluster(5, 8);
        for s in &mut v.servers {
            s.idle_for = Duration::from_secs(600);
        }
        let soon = Some(Duration::from_secs(600));
        assert_eq!(
            p.scale(
                &v,
                Pressure {
                    since_out: soon,
                    ..Pressure::default()
                }
            ),
            Scale::Hold
        );
        let later = Some(Duration::from_secs(1801));
        assert!(matches!(
            p.scale(
                &v,
                Pressure {
                    since_out: later,
                    ..Pressure::default()
                }
            ),
            Scale::In(_)
        ));
        assert!(matches!(p.scale(&v, Pressure::default()), Scale::In(_)));
        // A scale-out is never held back by the cooldown.
        assert_eq!(
            p.scale(
                &v,
                Pressure {
                    waiting_gpus: 40,
                    since_out: soon,
                    ..Pressure::default()
                }
            ),
            Scale::Out(2)
        );
    }

    #[test]
    fn servers_missing_counts_servers_with_room_outside_the_kernel() {
        let p = Policy::default();
        let mut v = cluster(4, 8);
        assert_eq!(p.servers_missing(&v, 8, 3, &[]), 0);
        // s0 and s1 are subscribed to the ratio: two servers can take one.
        for s in ["s0", "s1"] {
            for _ in 0..7 {
                v.add_replica(s, 8);
            }
        }
        assert_eq!(p.servers_missing(&v, 8, 3, &[]), 1);
        assert_eq!(p.servers_missing(&v, 1, 3, &[]), 1);
        // The kernel already on s2 needs its two others elsewhere.
        assert_eq!(p.servers_missing(&v, 8, 2, &["s2".into()]), 1);
        assert_eq!(p.servers_missing(&v, 8, 1, &["s2".into()]), 0);
        assert_eq!(p.servers_missing(&v, 8, 0, &[]), 0);
    }

    #[test]
    fn a_scale_out_that_placed_kernels_holds_scale_in_longer() {
        let p = Policy {
            headroom_gpus: 0,
            scale_in_cooldown: Duration::from_secs(1800),
            placement_cooldown: Duration::from_secs(4 * 3600),
            ..Policy::default()
        };
        let mut v = cluster(5, 8);
        for s in &mut v.servers {
            s.idle_for = Duration::from_secs(600);
        }
        let at = |since: u64| {
            let since = Some(Duration::from_secs(since));
            Pressure {
                since_out: since,
                since_placement_out: since,
                ..Pressure::default()
            }
        };
        // Past the ordinary cool-down, within the placement one.
        assert_eq!(p.scale(&v, at(3600)), Scale::Hold);
        assert!(matches!(p.scale(&v, at(4 * 3600 + 1)), Scale::In(_)));
        // A later scale-out for cells does not restart the longer wait.
        let cells_since = Pressure {
            since_out: Some(Duration::from_secs(3600)),
            since_placement_out: Some(Duration::from_secs(5 * 3600)),
            ..Pressure::default()
        };
        assert!(matches!(p.scale(&v, cells_since), Scale::In(_)));
    }

    #[test]
    fn rebalance_moves_a_replica_of_an_idle_kernel_whose_servers_are_busy() {
        let p = Policy::default();
        let mut v = cluster(4, 8);
        for s in ["s0", "s1", "s2"] {
            v.add_replica(s, 8);
            v.take_gpus(s, 4);
        }
        let blocked = KernelView {
            gpus: 8,
            hosts: vec!["s0".into(), "s1".into(), "s2".into()],
        };
        let fine = KernelView {
            gpus: 2,
            hosts: vec!["s0".into(), "s1".into(), "s2".into()],
        };
        let moves = p.rebalance(&v, &[fine.clone(), blocked.clone()]);
        assert_eq!(moves.len(), 1);
        let (i, m) = &moves[0];
        assert_eq!(*i, 1);
        assert_eq!(m.to, "s3");
        assert!(blocked.hosts.contains(&m.from));

        // Off, or with nowhere to go, nothing moves.
        let off = Policy {
            rebalance_moves: 0,
            ..Policy::default()
        };
        assert!(off.rebalance(&v, std::slice::from_ref(&blocked)).is_empty());
        v.take_gpus("s3", 1);
        assert!(p.rebalance(&v, &[blocked]).is_empty());
    }
}
