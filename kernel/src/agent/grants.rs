//! Which replica holds which GPU, for how long, and what it has used.
//!
//! Pure: time is passed in, so the policy is tested without sleeping. A grant
//! is a lease: its holder renews it while the cell runs; one that is neither
//! renewed nor released (the replica was killed) expires and frees its GPUs.
//!
//! After its cell a grant may stay *cached*: the replica keeps its state on
//! the GPUs, and its next cell there finds it in place. A cached grant is
//! revocable: when another replica asks for GPUs that are not free, enough
//! cached grants are revoked (oldest first) and the asker is told to wait; the
//! holders learn it at their next renewal, move their state off and release.
//!
//! A request that neither free nor cached GPUs can meet is remembered for a
//! moment as *waiting* demand: a replica that yielded asks again every
//! fraction of a second, so the kernels refused within [`WAITING_FRESH`] are
//! those whose cell waits for GPUs now (the autoscaler's committed demand).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde::Serialize;

pub type GrantId = u64;

/// A refusal this recent still counts as a cell waiting: yielded replicas ask
/// again every 200 ms (`replica::bidding`), so a cell that got its GPUs
/// elsewhere, or was decided, drops out within this.
pub const WAITING_FRESH: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Grant {
    pub id: GrantId,
    pub kernel: String,
    pub replica: u64,
    pub gpus: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    Cached { since: Instant },
    Revoked,
}

#[derive(Debug)]
struct Lease {
    grant: Grant,
    since: Instant,
    expires: Instant,
    lease: Duration,
    phase: Phase,
    /// Time cells ran on it, over the cells it served.
    used: Duration,
}

/// What a renewal tells the holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    Held,
    /// Another replica needs the GPUs: move the state off and release.
    Revoked,
}

/// GPU-seconds per kernel: held (granted, whether or not a cell ran) and used
/// (a cell ran on it), as their holders reported.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Usage {
    pub held_gpu_seconds: f64,
    pub used_gpu_seconds: f64,
    /// Held between cells with the kernel's state on them.
    pub cached_gpu_seconds: f64,
    /// Moving state off them before a release.
    pub moving_gpu_seconds: f64,
    pub grants: u64,
    /// Grants that served the kernel's next cell from the cache.
    pub reused: u64,
    pub revoked: u64,
    pub expired: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GrantError {
    #[error("{asked} GPU(s) asked, {free} free of {total}")]
    Busy {
        asked: u32,
        free: usize,
        total: usize,
    },
    #[error("{asked} GPU(s) asked, this host has {total}")]
    TooMany { asked: u32, total: usize },
    #[error("{asked} GPU(s) asked, {free} free; {reclaiming} being reclaimed from idle kernels")]
    Reclaiming {
        asked: u32,
        free: usize,
        reclaiming: usize,
    },
    #[error("no grant {0}")]
    Unknown(GrantId),
}

#[derive(Debug)]
pub struct Grants {
    total: u32,
    leases: BTreeMap<GrantId, Lease>,
    next: GrantId,
    usage: BTreeMap<String, Usage>,
    /// Kernels refused GPUs that even revoking cached grants would not free:
    /// how many they asked for, and when last.
    refused: BTreeMap<String, (u32, Instant)>,
}

impl Grants {
    pub fn new(total: u32) -> Self {
        Self {
            total,
            leases: BTreeMap::new(),
            next: 1,
            usage: BTreeMap::new(),
            refused: BTreeMap::new(),
        }
    }

    fn busy(&self) -> BTreeSet<u32> {
        self.leases
            .values()
            .flat_map(|l| l.grant.gpus.iter().copied())
            .collect()
    }

    /// Grants `n` GPUs: this replica's own cached grant of `n` (its state is
    /// there), else free ones (the lowest-numbered); if too few are free,
    /// revokes enough cached grants of others and says to ask again.
    pub fn grant(
        &mut self,
        kernel: &str,
        replica: u64,
        n: u32,
        lease: Duration,
        now: Instant,
    ) -> Result<Grant, GrantError> {
        self.expire(now);
        if n > self.total {
            return Err(GrantError::TooMany {
                asked: n,
                total: self.total as usize,
            });
        }
        let own = self.leases.values_mut().find(|l| {
            l.grant.kernel == kernel
                && l.grant.replica == replica
                && matches!(l.phase, Phase::Cached { .. })
                && l.grant.gpus.len() == n as usize
        });
        if let Some(l) = own {
            self.refused.remove(kernel);
            l.phase = Phase::Running;
            l.expires = now + lease;
            l.lease = lease;
            self.usage.entry(kernel.to_owned()).or_default().reused += 1;
            return Ok(l.grant.clone());
        }
        let busy = self.busy();
        let free: Vec<u32> = (0..self.total).filter(|g| !busy.contains(g)).collect();
        if free.len() < n as usize {
            let e = self.reclaim(n, free.len());
            if matches!(e, GrantError::Busy { .. }) {
                self.refused.insert(kernel.to_owned(), (n, now));
            }
            return Err(e);
        }
        self.refused.remove(kernel);
        let grant = Grant {
            id: self.next,
            kernel: kernel.to_owned(),
            replica,
            gpus: free[..n as usize].to_vec(),
        };
        self.next += 1;
        self.usage.entry(kernel.to_owned()).or_default().grants += 1;
        self.leases.insert(
            grant.id,
            Lease {
                grant: grant.clone(),
                since: now,
                expires: now + lease,
                lease,
                phase: Phase::Running,
                used: Duration::ZERO,
            },
        );
        Ok(grant)
    }

    /// Too few free GPUs for `n`: revoke cached grants (oldest first) until
    /// those being reclaimed cover the shortfall, if they can.
    fn reclaim(&mut self, n: u32, free: usize) -> GrantError {
        let short = n as usize - free;
        let reclaiming = |leases: &BTreeMap<GrantId, Lease>| -> usize {
            leases
                .values()
                .filter(|l| l.phase == Phase::Revoked)
                .map(|l| l.grant.gpus.len())
                .sum()
        };
        let mut cached: Vec<(Instant, GrantId, usize)> = self
            .leases
            .iter()
            .filter_map(|(id, l)| match l.phase {
                Phase::Cached { since } => Some((since, *id, l.grant.gpus.len())),
                _ => None,
            })
            .collect();
        let cachable: usize = cached.iter().map(|c| c.2).sum();
        if reclaiming(&self.leases) + cachable < short {
            return GrantError::Busy {
                asked: n,
                free,
                total: self.total as usize,
            };
        }
        cached.sort();
        for (_, id, _) in cached {
            if reclaiming(&self.leases) >= short {
                break;
            }
            if let Some(l) = self.leases.get_mut(&id) {
                l.phase = Phase::Revoked;
                self.usage
                    .entry(l.grant.kernel.clone())
                    .or_default()
                    .revoked += 1;
            }
        }
        GrantError::Reclaiming {
            asked: n,
            free,
            reclaiming: reclaiming(&self.leases),
        }
    }

    pub fn renew(&mut self, id: GrantId, now: Instant) -> Result<Renewal, GrantError> {
        self.expire(now);
        let lease = self.leases.get_mut(&id).ok_or(GrantError::Unknown(id))?;
        lease.expires = now + lease.lease;
        Ok(match lease.phase {
            Phase::Revoked => Renewal::Revoked,
            _ => Renewal::Held,
        })
    }

    /// A cell ended on the grant (it ran `used`); the holder keeps it, with its
    /// state on the GPUs, until its next cell or a revocation.
    pub fn cache(&mut self, id: GrantId, used: Duration, now: Instant) -> Result<(), GrantError> {
        self.expire(now);
        let lease = self.leases.get_mut(&id).ok_or(GrantError::Unknown(id))?;
        lease.used += used;
        lease.expires = now + lease.lease;
        if lease.phase == Phase::Running {
            lease.phase = Phase::Cached { since: now };
        }
        Ok(())
    }

    /// Ends a grant; `used` is how long its last cell ran on it (zero for a lost
    /// election), `moving` how long moving state off it took.
    pub fn release(
        &mut self,
        id: GrantId,
        used: Duration,
        moving: Duration,
        now: Instant,
    ) -> Result<(), GrantError> {
        let lease = self.leases.remove(&id).ok_or(GrantError::Unknown(id))?;
        let held = now.saturating_duration_since(lease.since);
        let used = (lease.used + used).min(held);
        let moving = moving.min(held - used);
        let gpus = lease.grant.gpus.len() as f64;
        let u = self.usage.entry(lease.grant.kernel).or_default();
        u.held_gpu_seconds += held.as_secs_f64() * gpus;
        u.used_gpu_seconds += used.as_secs_f64() * gpus;
        u.moving_gpu_seconds += moving.as_secs_f64() * gpus;
        u.cached_gpu_seconds += (held - used - moving).as_secs_f64() * gpus;
        Ok(())
    }

    /// GPUs whose grants are cached (revocable): free for a placement that
    /// pays their holders' offload.
    pub fn cached_gpus(&self) -> usize {
        self.leases
            .values()
            .filter(|l| matches!(l.phase, Phase::Cached { .. } | Phase::Revoked))
            .map(|l| l.grant.gpus.len())
            .sum()
    }

    /// Frees the GPUs of leases nobody renewed; returns them.
    pub fn expire(&mut self, now: Instant) -> Vec<Grant> {
        self.refused
            .retain(|_, (_, at)| now.saturating_duration_since(*at) <= WAITING_FRESH);
        let dead: Vec<GrantId> = self
            .leases
            .iter()
            .filter(|(_, l)| l.expires <= now)
            .map(|(id, _)| *id)
            .collect();
        let mut out = Vec::new();
        for id in dead {
            if let Some(l) = self.leases.remove(&id) {
                let held = l.expires.saturating_duration_since(l.since);
                let u = self.usage.entry(l.grant.kernel.clone()).or_default();
                u.held_gpu_seconds += held.as_secs_f64() * l.grant.gpus.len() as f64;
                u.expired += 1;
                out.push(l.grant);
            }
        }
        out
    }

    /// Kernels refused GPUs within [`WAITING_FRESH`] of `now`, with how many
    /// each asked for: cells waiting here for GPUs that are not idle.
    pub fn waiting(&self, now: Instant) -> BTreeMap<String, u32> {
        self.refused
            .iter()
            .filter(|(_, (_, at))| now.saturating_duration_since(*at) <= WAITING_FRESH)
            .map(|(k, (n, _))| (k.clone(), *n))
            .collect()
    }

    pub fn active(&self) -> Vec<Grant> {
        self.leases.values().map(|l| l.grant.clone()).collect()
    }

    /// Per kernel, ended grants plus the live ones as of `now` (a cached grant
    /// counts its cells' time as used and the rest as cached so far).
    pub fn usage(&self, now: Instant) -> BTreeMap<String, Usage> {
        let mut out = self.usage.clone();
        for l in self.leases.values() {
            let held = now.saturating_duration_since(l.since);
            let used = l.used.min(held);
            let gpus = l.grant.gpus.len() as f64;
            let u = out.entry(l.grant.kernel.clone()).or_default();
            u.held_gpu_seconds += held.as_secs_f64() * gpus;
            u.used_gpu_seconds += used.as_secs_f64() * gpus;
            if l.phase != Phase::Running {
                u.cached_gpu_seconds += (held - used).as_secs_f64() * gpus;
            }
        }
        out
    }

    pub fn total(&self) -> u32 {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(5);

    #[test]
    fn grants_never_share_a_gpu() {
        let now = Instant::now();
        let mut g = Grants::new(2);
        let a = g.grant("k1", 1, 1, LEASE, now).unwrap();
        let b = g.grant("k2", 4, 1, LEASE, now).unwrap();
        assert_ne!(a.gpus, b.gpus);
        assert_eq!(
            g.grant("k1", 2, 1, LEASE, now),
            Err(GrantError::Busy {
                asked: 1,
                free: 0,
                total: 2
            })
        );
        g.release(a.id, Duration::ZERO, Duration::ZERO, now)
            .unwrap();
        assert_eq!(g.grant("k1", 2, 1, LEASE, now).unwrap().gpus, vec![0]);
    }

    #[test]
    fn asking_for_more_than_the_host_has_is_its_own_error() {
        let mut g = Grants::new(1);
        assert_eq!(
            g.grant("k", 1, 2, LEASE, Instant::now()),
            Err(GrantError::TooMany { asked: 2, total: 1 })
        );
        let mut none = Grants::new(0);
        assert!(matches!(
            none.grant("k", 1, 1, LEASE, Instant::now()),
            Err(GrantError::TooMany { .. })
        ));
    }

    #[test]
    fn unrenewed_leases_expire_and_renewed_ones_do_not() {
        let t0 = Instant::now();
        let mut g = Grants::new(2);
        let a = g.grant("k1", 1, 1, LEASE, t0).unwrap();
        let b = g.grant("k2", 2, 1, LEASE, t0).unwrap();
        assert_eq!(
            g.renew(b.id, t0 + Duration::from_secs(4)),
            Ok(Renewal::Held)
        );
        let expired = g.expire(t0 + Duration::from_secs(6));
        assert_eq!(expired, vec![a.clone()]);
        assert_eq!(g.active(), vec![b]);
        assert_eq!(
            g.renew(a.id, t0 + Duration::from_secs(6)),
            Err(GrantError::Unknown(a.id))
        );
        assert_eq!(g.usage(t0 + Duration::from_secs(6))["k1"].expired, 1);
    }

    #[test]
    fn held_and_used_gpu_seconds_are_accounted_per_kernel() {
        let t0 = Instant::now();
        let mut g = Grants::new(4);
        let a = g.grant("k1", 1, 2, LEASE, t0).unwrap();
        g.renew(a.id, t0 + Duration::from_secs(3)).unwrap();
        g.release(
            a.id,
            Duration::from_secs(3),
            Duration::ZERO,
            t0 + Duration::from_secs(4),
        )
        .unwrap();
        let lost = g.grant("k1", 2, 1, LEASE, t0).unwrap();
        g.release(
            lost.id,
            Duration::ZERO,
            Duration::ZERO,
            t0 + Duration::from_secs(1),
        )
        .unwrap();
        let u = &g.usage(t0 + Duration::from_secs(4))["k1"];
        assert_eq!(u.grants, 2);
        assert!((u.held_gpu_seconds - 9.0).abs() < 1e-9, "{u:?}");
        assert!((u.used_gpu_seconds - 6.0).abs() < 1e-9, "{u:?}");
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn a_cached_grant_serves_its_replicas_next_cell() {
        let t0 = Instant::now();
        let mut g = Grants::new(2);
        let a = g.grant("k1", 1, 1, LEASE, t0).unwrap();
        g.cache(a.id, secs(1), t0 + secs(1)).unwrap();
        // Another replica of the same kernel does not get it; the holder does.
        assert_ne!(g.grant("k1", 2, 1, LEASE, t0 + secs(2)).unwrap().id, a.id);
        assert_eq!(g.grant("k1", 1, 1, LEASE, t0 + secs(2)).unwrap(), a);
        assert_eq!(g.usage(t0 + secs(2))["k1"].reused, 1);
    }

    #[test]
    fn a_kernel_refused_gpus_waits_until_granted_or_no_longer_asking() {
        let t0 = Instant::now();
        let mut g = Grants::new(2);
        let a = g.grant("k1", 1, 2, LEASE, t0).unwrap();
        assert!(matches!(
            g.grant("k2", 1, 1, LEASE, t0),
            Err(GrantError::Busy { .. })
        ));
        assert_eq!(g.waiting(t0), BTreeMap::from([("k2".to_owned(), 1)]));
        // It stopped asking (its cell ran on another server): stale.
        assert!(g.waiting(t0 + WAITING_FRESH + secs(1)).is_empty());
        let t1 = t0 + secs(3);
        assert!(g.grant("k2", 1, 1, LEASE, t1).is_err());
        g.release(a.id, secs(1), Duration::ZERO, t1).unwrap();
        g.grant("k2", 1, 1, LEASE, t1).unwrap();
        assert!(g.waiting(t1).is_empty());
        // GPUs on their way back from a cached grant are no shortage.
        let mut g = Grants::new(1);
        let b = g.grant("k1", 1, 1, LEASE, t0).unwrap();
        g.cache(b.id, secs(1), t0).unwrap();
        assert!(matches!(
            g.grant("k2", 1, 1, LEASE, t0),
            Err(GrantError::Reclaiming { .. })
        ));
        assert!(g.waiting(t0).is_empty());
    }

    #[test]
    fn a_kernel_short_of_gpus_revokes_the_oldest_cached_grant_and_waits() {
        let t0 = Instant::now();
        let mut g = Grants::new(2);
        let a = g.grant("k1", 1, 1, LEASE, t0).unwrap();
        let b = g.grant("k2", 1, 1, LEASE, t0).unwrap();
        g.cache(b.id, secs(1), t0 + secs(1)).unwrap();
        g.cache(a.id, secs(1), t0 + secs(2)).unwrap();
        let asked = g.grant("k3", 1, 1, LEASE, t0 + secs(3));
        assert_eq!(
            asked,
            Err(GrantError::Reclaiming {
                asked: 1,
                free: 0,
                reclaiming: 1
            })
        );
        // Asking again revokes nothing more.
        assert!(g.grant("k3", 1, 1, LEASE, t0 + secs(3)).is_err());
        assert_eq!(g.renew(b.id, t0 + secs(3)), Ok(Renewal::Revoked));
        assert_eq!(g.renew(a.id, t0 + secs(3)), Ok(Renewal::Held));
        // A revoked grant is not reused by its holder: its state is on its way off.
        assert!(g.grant("k2", 1, 1, LEASE, t0 + secs(3)).is_err());
        g.release(b.id, Duration::ZERO, secs(1), t0 + secs(4))
            .unwrap();
        assert_eq!(
            g.grant("k3", 1, 1, LEASE, t0 + secs(4)).unwrap().gpus,
            b.gpus
        );
        let u = &g.usage(t0 + secs(4))["k2"];
        assert_eq!(u.revoked, 1);
        // 4 s held: 1 running its cell, 1 moving state off, 2 cached.
        assert!((u.used_gpu_seconds - 1.0).abs() < 1e-9, "{u:?}");
        assert!((u.moving_gpu_seconds - 1.0).abs() < 1e-9, "{u:?}");
        assert!((u.cached_gpu_seconds - 2.0).abs() < 1e-9, "{u:?}");
    }

    #[test]
    fn cached_and_revoked_grants_count_as_reclaimable() {
        let t0 = Instant::now();
        let mut g = Grants::new(3);
        let a = g.grant("k1", 1, 2, LEASE, t0).unwrap();
        g.grant("k2", 1, 1, LEASE, t0).unwrap();
        assert_eq!(g.cached_gpus(), 0);
        g.cache(a.id, secs(1), t0 + secs(1)).unwrap();
        assert_eq!(g.cached_gpus(), 2);
        assert!(g.grant("k3", 1, 1, LEASE, t0 + secs(1)).is_err());
        assert_eq!(g.cached_gpus(), 2, "revoked, still to be reclaimed");
    }

    #[test]
    fn running_grants_are_never_revoked() {
        let t0 = Instant::now();
        let mut g = Grants::new(1);
        let a = g.grant("k1", 1, 1, LEASE, t0).unwrap();
        assert!(matches!(
            g.grant("k2", 1, 1, LEASE, t0),
            Err(GrantError::Busy { .. })
        ));
        assert_eq!(g.renew(a.id, t0), Ok(Renewal::Held));
    }
}
