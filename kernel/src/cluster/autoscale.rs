//! `notebookos-kernel cluster autoscale`: the live autoscaler. Every period
//! it reads the agents' inventories, asks the policy (`Policy::scale`), and
//! acts through a [`Provider`]: servers are asked for when committed demand
//! crosses the threshold; a server chosen for removal is drained first (it
//! takes no new replicas, and its replicas are stopped one round at a time
//! so their kernels replace them elsewhere), then given back.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::client::{servers_missing, view, waiting_gpus, ClusterClient, ClusterError};
use super::config::ClusterConfig;
use super::policy::{Policy, Pressure, Scale};
use super::provider::Provider;
use crate::agent::control::{ControlRequest, Inventory};

pub struct AutoscaleOptions {
    pub config: PathBuf,
    /// The address to call agents from (this machine's, port 0).
    pub from: SocketAddr,
    pub every: Duration,
    /// No new scale-out this soon after one: servers take a while to come.
    pub cooldown: Duration,
    /// Knobs over the config's policy.
    pub headroom_gpus: Option<u32>,
    pub scale_in_after: Option<Duration>,
    pub scale_in_cooldown: Option<Duration>,
}

/// What the autoscaler remembers between rounds.
#[derive(Default)]
struct State {
    /// When each server last had a GPU held.
    last_busy: BTreeMap<String, Instant>,
    draining: BTreeSet<String>,
    last_out: Option<Instant>,
    /// The last scale-out asked for while kernels waited for servers.
    last_placement_out: Option<Instant>,
    /// Since when too few servers are wholly idle (`Policy::idle_short`).
    idle_short_since: Option<Instant>,
}

pub async fn run(
    opts: AutoscaleOptions,
    mut provider: Box<dyn Provider>,
) -> Result<(), ClusterError> {
    let mut state = State::default();
    let started = Instant::now();
    loop {
        round(&opts, provider.as_mut(), &mut state, started).await?;
        tokio::time::sleep(opts.every).await;
    }
}

async fn round(
    opts: &AutoscaleOptions,
    provider: &mut dyn Provider,
    state: &mut State,
    started: Instant,
) -> Result<(), ClusterError> {
    // Re-read each round: the provider's command may have added servers.
    let config = ClusterConfig::load(Path::new(&opts.config))?;
    let mut policy: Policy = config.policy();
    if let Some(h) = opts.headroom_gpus {
        policy.headroom_gpus = h;
    }
    if let Some(a) = opts.scale_in_after {
        policy.scale_in_after = a;
    }
    if let Some(c) = opts.scale_in_cooldown {
        policy.scale_in_cooldown = c;
    }
    let client = ClusterClient::new(config, opts.from)?;
    let inventories = client.inventories().await;
    let now = Instant::now();
    for inv in &inventories {
        if inv.idle_gpus < inv.gpus {
            state.last_busy.insert(inv.name.clone(), now);
        }
    }
    finish_drains(&client, provider, state, &inventories).await;

    let mut snapshot = view(&inventories);
    for s in &mut snapshot.servers {
        let since = state.last_busy.get(&s.id).copied().unwrap_or(started);
        s.idle_for = now.saturating_duration_since(since);
        s.draining |= state.draining.contains(&s.id);
    }
    if !policy.idle_short(&snapshot) {
        state.idle_short_since = None;
    } else if state.idle_short_since.is_none() {
        state.idle_short_since = Some(now);
    }
    let unplaceable = servers_missing(&policy, &snapshot, &inventories);
    let since = |t: Instant| now.saturating_duration_since(t);
    let pressure = Pressure {
        waiting_gpus: waiting_gpus(&inventories),
        unplaceable,
        since_out: state.last_out.map(since),
        since_placement_out: state.last_placement_out.map(since),
        idle_short_for: state.idle_short_since.map(since).unwrap_or_default(),
    };
    match policy.scale(&snapshot, pressure) {
        Scale::Hold => {}
        Scale::Out(n) => {
            if state
                .last_out
                .is_some_and(|t| now.duration_since(t) < opts.cooldown)
            {
                return Ok(());
            }
            state.last_out = Some(now);
            if unplaceable > 0 {
                state.last_placement_out = Some(now);
            }
            tracing::info!(servers = n, unplaceable, "scaling out");
            match provider.add(n) {
                Ok(names) => tracing::info!(?names, "servers asked for"),
                Err(e) => tracing::warn!("scale-out failed: {e}"),
            }
        }
        Scale::In(ids) => {
            for id in ids {
                let pinned = inventories
                    .iter()
                    .any(|inv| inv.name == id && inv.replicas.iter().any(|r| r.pinned));
                if pinned {
                    // Jupyter runs a kernel's replica 1 there: it cannot move.
                    continue;
                }
                match client
                    .call(&id, &ControlRequest::Drain { draining: true })
                    .await
                {
                    Ok(_) => {
                        tracing::info!(server = %id, "draining");
                        state.draining.insert(id);
                    }
                    Err(e) => tracing::warn!(server = %id, "cannot drain: {e}"),
                }
            }
        }
    }
    Ok(())
}

/// Draining servers: stop their replicas (their kernels replace them on
/// other servers); give back those left empty.
async fn finish_drains(
    client: &ClusterClient,
    provider: &mut dyn Provider,
    state: &mut State,
    inventories: &[Inventory],
) {
    for server in state.draining.clone() {
        let Some(inv) = inventories.iter().find(|i| i.name == server) else {
            continue;
        };
        if inv.replicas.is_empty() {
            match provider.remove(&server) {
                Ok(()) => {
                    tracing::info!(%server, "drained and removed");
                    state.draining.remove(&server);
                    state.last_busy.remove(&server);
                }
                Err(e) => tracing::warn!(%server, "removal failed: {e}"),
            }
            continue;
        }
        for r in &inv.replicas {
            let stop = ControlRequest::StopReplica {
                kernel_id: r.kernel_id.clone(),
                replica: r.replica,
            };
            if let Err(e) = client.call(&server, &stop).await {
                tracing::warn!(%server, replica = r.replica, "cannot stop a replica to drain: {e}");
            }
        }
    }
}
