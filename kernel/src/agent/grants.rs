//! Which replica holds which GPU, for how long, and what it has used.
//!
//! Pure: time is passed in, so the policy is tested without sleeping. A grant
//! is a lease: its holder renews it while the cell runs; one that is neither
//! renewed nor released (the replica was killed) expires and frees its GPUs.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde::Serialize;

pub type GrantId = u64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Grant {
    pub id: GrantId,
    pub kernel: String,
    pub replica: u64,
    pub gpus: Vec<u32>,
}

#[derive(Debug)]
struct Lease {
    grant: Grant,
    since: Instant,
    expires: Instant,
    lease: Duration,
}

/// GPU-seconds per kernel: held (granted, whether or not a cell ran) and used
/// (a cell ran on it), as their holders reported.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Usage {
    pub held_gpu_seconds: f64,
    pub used_gpu_seconds: f64,
    pub grants: u64,
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
    #[error("no grant {0}")]
    Unknown(GrantId),
}

#[derive(Debug)]
pub struct Grants {
    total: u32,
    leases: BTreeMap<GrantId, Lease>,
    next: GrantId,
    usage: BTreeMap<String, Usage>,
}

impl Grants {
    pub fn new(total: u32) -> Self {
        Self {
            total,
            leases: BTreeMap::new(),
            next: 1,
            usage: BTreeMap::new(),
        }
    }

    fn busy(&self) -> BTreeSet<u32> {
        self.leases
            .values()
            .flat_map(|l| l.grant.gpus.iter().copied())
            .collect()
    }

    /// Grants `n` free GPUs (the lowest-numbered), or says why not.
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
        let busy = self.busy();
        let free: Vec<u32> = (0..self.total).filter(|g| !busy.contains(g)).collect();
        if free.len() < n as usize {
            return Err(GrantError::Busy {
                asked: n,
                free: free.len(),
                total: self.total as usize,
            });
        }
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
            },
        );
        Ok(grant)
    }

    pub fn renew(&mut self, id: GrantId, now: Instant) -> Result<(), GrantError> {
        self.expire(now);
        let lease = self.leases.get_mut(&id).ok_or(GrantError::Unknown(id))?;
        lease.expires = now + lease.lease;
        Ok(())
    }

    /// Ends a grant; `used` is how long a cell ran on it (zero for a lost election).
    pub fn release(&mut self, id: GrantId, used: Duration, now: Instant) -> Result<(), GrantError> {
        let lease = self.leases.remove(&id).ok_or(GrantError::Unknown(id))?;
        let held = now.saturating_duration_since(lease.since);
        let gpus = lease.grant.gpus.len() as f64;
        let u = self.usage.entry(lease.grant.kernel).or_default();
        u.held_gpu_seconds += held.as_secs_f64() * gpus;
        u.used_gpu_seconds += used.min(held).as_secs_f64() * gpus;
        Ok(())
    }

    /// Frees the GPUs of leases nobody renewed; returns them.
    pub fn expire(&mut self, now: Instant) -> Vec<Grant> {
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

    pub fn active(&self) -> Vec<Grant> {
        self.leases.values().map(|l| l.grant.clone()).collect()
    }

    pub fn usage(&self) -> &BTreeMap<String, Usage> {
        &self.usage
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
        g.release(a.id, Duration::ZERO, now).unwrap();
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
        g.renew(b.id, t0 + Duration::from_secs(4)).unwrap();
        let expired = g.expire(t0 + Duration::from_secs(6));
        assert_eq!(expired, vec![a.clone()]);
        assert_eq!(g.active(), vec![b]);
        assert_eq!(
            g.renew(a.id, t0 + Duration::from_secs(6)),
            Err(GrantError::Unknown(a.id))
        );
        assert_eq!(g.usage()["k1"].expired, 1);
    }

    #[test]
    fn held_and_used_gpu_seconds_are_accounted_per_kernel() {
        let t0 = Instant::now();
        let mut g = Grants::new(4);
        let a = g.grant("k1", 1, 2, LEASE, t0).unwrap();
        g.renew(a.id, t0 + Duration::from_secs(3)).unwrap();
        g.release(a.id, Duration::from_secs(3), t0 + Duration::from_secs(4))
            .unwrap();
        let lost = g.grant("k1", 2, 1, LEASE, t0).unwrap();
        g.release(lost.id, Duration::ZERO, t0 + Duration::from_secs(1))
            .unwrap();
        let u = &g.usage()["k1"];
        assert_eq!(u.grants, 2);
        assert!((u.held_gpu_seconds - 9.0).abs() < 1e-9, "{u:?}");
        assert!((u.used_gpu_seconds - 6.0).abs() < 1e-9, "{u:?}");
    }
}
