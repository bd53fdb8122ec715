//! Replicas whose kernel is gone. A kernel's replica 1 is registered with its
//! server's agent; when no agent of the cluster lists it for the rejoin grace
//! (Jupyter did not restart it), the replicas this agent started for that
//! kernel are stopped, so nothing of a dead kernel keeps running.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::control::{Host, Inventory};
use crate::cluster::client::ClusterClient;

/// How long a kernel's replicas wait for its replica 1 to come back.
pub const REJOIN_GRACE: Duration = Duration::from_secs(60);
/// How often the cluster is asked.
const ROUND: Duration = Duration::from_secs(5);

/// When each kernel hosted here was first seen without a replica 1 anywhere.
#[derive(Debug, Default)]
pub struct Orphans {
    since: HashMap<String, Instant>,
}

impl Orphans {
    /// `hosted`: kernels with replicas here; `fronts`: kernels whose replica 1
    /// some agent lists. Returns the kernels to stop now.
    pub fn update(
        &mut self,
        hosted: &BTreeSet<String>,
        fronts: &BTreeSet<String>,
        now: Instant,
        grace: Duration,
    ) -> Vec<String> {
        self.since
            .retain(|k, _| hosted.contains(k) && !fronts.contains(k));
        for kernel in hosted.difference(fronts) {
            self.since.entry(kernel.clone()).or_insert(now);
        }
        let due: Vec<String> = self
            .since
            .iter()
            .filter(|(_, t)| now.duration_since(**t) >= grace)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &due {
            self.since.remove(k);
        }
        due
    }
}

/// Kernels whose replica 1 an agent lists.
pub fn fronts(inventories: &[Inventory]) -> BTreeSet<String> {
    inventories
        .iter()
        .flat_map(|inv| &inv.replicas)
        .filter(|r| r.pinned)
        .map(|r| r.kernel_id.clone())
        .collect()
}

pub async fn run(host: Arc<Host>, cluster: ClusterClient, grace: Duration) {
    let mut orphans = Orphans::default();
    let mut tick = tokio::time::interval(ROUND.min(grace));
    loop {
        tick.tick().await;
        let hosted = host.hosted_kernels();
        if hosted.is_empty() {
            orphans = Orphans::default();
            continue;
        }
        let fronts = fronts(&cluster.inventories().await);
        for kernel in orphans.update(&hosted, &fronts, Instant::now(), grace) {
            tracing::warn!(
                kernel,
                ?grace,
                "no replica 1 anywhere for the rejoin grace; stopping its replicas here"
            );
            host.stop_kernel(&kernel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[&str]) -> BTreeSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_kernel_without_replica_1_is_stopped_after_the_grace_only() {
        let grace = Duration::from_secs(60);
        let t0 = Instant::now();
        let mut o = Orphans::default();
        let hosted = set(&["a", "b"]);
        assert!(o.update(&hosted, &set(&["b"]), t0, grace).is_empty());
        assert!(o
            .update(&hosted, &set(&["b"]), t0 + Duration::from_secs(59), grace)
            .is_empty());
        assert_eq!(
            o.update(&hosted, &set(&["b"]), t0 + Duration::from_secs(60), grace),
            vec!["a".to_string()]
        );
    }

    #[test]
    fn a_front_that_comes_back_resets_the_clock() {
        let grace = Duration::from_secs(60);
        let t0 = Instant::now();
        let mut o = Orphans::default();
        let hosted = set(&["a"]);
        o.update(&hosted, &set(&[]), t0, grace);
        // Jupyter restarted replica 1 and it registered again.
        o.update(&hosted, &set(&["a"]), t0 + Duration::from_secs(30), grace);
        assert!(o
            .update(&hosted, &set(&[]), t0 + Duration::from_secs(70), grace)
            .is_empty());
        assert_eq!(
            o.update(&hosted, &set(&[]), t0 + Duration::from_secs(130), grace),
            vec!["a".to_string()]
        );
    }
}
