//! Talking to the cluster's agents: one call to one agent, or every agent's
//! inventory at once, turned into the snapshot the policy reads.

use std::net::SocketAddr;
use std::time::Duration;

use raft_transport::control::ControlClient;

use super::config::{ClusterConfig, ConfigError, CALLER_ID};
use super::policy::{ClusterView, Policy, ServerView};
use crate::agent::control::{ControlRequest, ControlResponse, Inventory};

/// An agent that does not answer within this is treated as gone.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("agent {server}: {source}")]
    Transport {
        server: String,
        #[source]
        source: raft_transport::Error,
    },
    #[error("agent {server} answered with something unreadable: {message}")]
    Protocol { server: String, message: String },
    #[error("agent {server}: {message}")]
    Refused { server: String, message: String },
}

#[derive(Clone)]
pub struct ClusterClient {
    pub config: ClusterConfig,
    control: ControlClient,
}

impl ClusterClient {
    /// `local` is the address to call from (this server's, port 0).
    pub fn new(config: ClusterConfig, local: SocketAddr) -> Result<Self, ClusterError> {
        let identity = config.identity(CALLER_ID)?;
        let control =
            ControlClient::new(&identity, local).map_err(|source| ClusterError::Transport {
                server: "(local endpoint)".into(),
                source,
            })?;
        Ok(Self { config, control })
    }

    pub async fn call(
        &self,
        server: &str,
        request: &ControlRequest,
    ) -> Result<ControlResponse, ClusterError> {
        let entry = self.config.server(server)?;
        let id = self.config.server_id(server)?;
        let body = serde_json::to_vec(request).map_err(|e| ClusterError::Protocol {
            server: server.to_owned(),
            message: e.to_string(),
        })?;
        let raw = self
            .control
            .call(entry.agent, id, &body, CALL_TIMEOUT)
            .await
            .map_err(|source| ClusterError::Transport {
                server: server.to_owned(),
                source,
            })?;
        match serde_json::from_slice(&raw) {
            Ok(ControlResponse::Error { message }) => Err(ClusterError::Refused {
                server: server.to_owned(),
                message,
            }),
            Ok(r) => Ok(r),
            Err(e) => Err(ClusterError::Protocol {
                server: server.to_owned(),
                message: e.to_string(),
            }),
        }
    }

    /// Every agent's inventory, asked at once; agents that do not answer
    /// are left out (and logged).
    pub async fn inventories(&self) -> Vec<Inventory> {
        let mut calls = tokio::task::JoinSet::new();
        for s in &self.config.servers {
            let (client, name) = (self.clone(), s.name.clone());
            calls.spawn(async move {
                let answer = client.call(&name, &ControlRequest::Inventory).await;
                (name, answer)
            });
        }
        let mut out = Vec::new();
        while let Some(Ok((name, answer))) = calls.join_next().await {
            match answer {
                Ok(ControlResponse::Inventory(inv)) => out.push(inv),
                Err(e @ ClusterError::Transport { .. }) => {
                    tracing::warn!(server = %name, error = %e, "agent unreachable")
                }
                other => {
                    tracing::warn!(server = %name, "unexpected inventory answer: {other:?}")
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

/// The policy's snapshot of the servers that answered.
pub fn view(inventories: &[Inventory]) -> ClusterView {
    ClusterView {
        servers: inventories
            .iter()
            .map(|inv| ServerView {
                id: inv.name.clone(),
                gpus: inv.gpus,
                idle_gpus: inv.idle_gpus,
                subscribed: inv.replicas.iter().map(|r| r.gpus).sum(),
                replicas: inv.replicas.len() as u32,
                draining: inv.draining,
                idle_for: Duration::ZERO,
            })
            .collect(),
    }
}

/// GPUs that cells waiting for them ask for ([`Inventory::waiting`]). Each
/// replica of a kernel asks its own server, so a kernel refused on several
/// counts once, at the most it asked for.
pub fn waiting_gpus(inventories: &[Inventory]) -> u32 {
    let mut kernels = std::collections::BTreeMap::<&str, u32>::new();
    for (kernel, &gpus) in inventories.iter().flat_map(|inv| &inv.waiting) {
        let n = kernels.entry(kernel).or_default();
        *n = (*n).max(gpus);
    }
    kernels.values().sum()
}

/// Servers missing for the kernels waiting to place replicas
/// ([`Inventory::unplaced`]): the most any one of them lacks, as the
/// simulator counts `Pressure::unplaceable`.
pub fn servers_missing(policy: &Policy, view: &ClusterView, inventories: &[Inventory]) -> usize {
    inventories
        .iter()
        .flat_map(|inv| &inv.unplaced)
        .map(|u| policy.servers_missing(view, u.gpus, u.missing, &u.hosts))
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn inventory(name: &str, waiting: &[(&str, u32)]) -> Inventory {
        Inventory {
            name: name.into(),
            gpus: 8,
            idle_gpus: 0,
            replicas: Vec::new(),
            draining: false,
            waiting: waiting.iter().map(|&(k, n)| (k.to_owned(), n)).collect(),
            unplaced: Vec::new(),
        }
    }

    #[test]
    fn servers_missing_for_the_neediest_waiting_kernel() {
        use crate::agent::control::Unplaced;
        let policy = Policy::default();
        let mut servers = vec![inventory("h1", &[]), inventory("h2", &[])];
        let unplaced = |kernel: &str, missing, hosts: &[&str]| Unplaced {
            kernel_id: kernel.into(),
            gpus: 8,
            missing,
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
        };
        assert_eq!(servers_missing(&policy, &view(&servers), &servers), 0);
        // k1 runs on h1 and lacks two replicas: only h2 can take one.
        servers[0].unplaced.push(unplaced("k1", 2, &["h1"]));
        assert_eq!(servers_missing(&policy, &view(&servers), &servers), 1);
        // k2 lacks three: it needs a third server, once for both.
        servers[1].unplaced.push(unplaced("k2", 3, &[]));
        assert_eq!(servers_missing(&policy, &view(&servers), &servers), 1);
        servers[1].unplaced[0].missing = 4;
        assert_eq!(servers_missing(&policy, &view(&servers), &servers), 2);
        let old = r#"{"name":"h1","gpus":8,"idle_gpus":8,"replicas":[],"draining":false}"#;
        let inv: Inventory = serde_json::from_str(old).unwrap();
        assert!(inv.unplaced.is_empty());
    }

    #[test]
    fn a_kernel_waiting_on_several_servers_counts_once() {
        let servers = [
            inventory("h1", &[("k1", 8), ("k2", 1)]),
            inventory("h2", &[("k1", 8)]),
            inventory("h3", &[("k1", 8), ("k3", 4)]),
        ];
        assert_eq!(waiting_gpus(&servers), 8 + 1 + 4);
        assert_eq!(waiting_gpus(&[inventory("h1", &[])]), 0);
        // An agent of an older release sends no `waiting`.
        let old = r#"{"name":"h1","gpus":8,"idle_gpus":8,"replicas":[],"draining":false}"#;
        let inv: Inventory = serde_json::from_str(old).unwrap();
        assert_eq!(inv.waiting, BTreeMap::new());
    }
}
