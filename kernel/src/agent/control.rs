//! The agent's side of the cluster: over QUIC with the cluster's mutual TLS
//! (`raft_transport::control`), it reports its GPUs and the replicas it
//! hosts, starts and stops replicas for kernels, and can be drained.
//!
//! Messages are JSON, one request per stream.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use raft_transport::NodeId;
use serde::{Deserialize, Serialize};

use crate::replica::group::{Bootstrap, StateDir};
use crate::replica::lock;
use crate::replica::spawn::{self, AdoptedProcess, LocalSpawner, ReplicaProcess, Spawner};

/// How long a replica may take to listen (Python and IPython load first).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A kernel waiting for servers asks again every few seconds
/// (`replica::remote::PLACE_RETRY`); one silent this long has stopped waiting.
pub const UNPLACED_FRESH: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlRequest {
    Inventory,
    /// Start a replica of a kernel whose replicas may ask for `gpus`.
    StartReplica {
        bootstrap: Bootstrap,
        hash_seed: u32,
        gpus: u32,
    },
    StopReplica {
        kernel_id: String,
        replica: NodeId,
    },
    /// A kernel's replica 1, started here by Jupyter rather than by us: it
    /// counts in the inventory, and is never stopped to drain the server.
    Register {
        kernel_id: String,
        replica: NodeId,
        gpus: u32,
        pid: u32,
    },
    /// A draining server takes no new replicas (the policy skips it).
    Drain {
        draining: bool,
    },
    /// A kernel whose front runs here found no server for some of its
    /// replicas and waits for the autoscaler; `missing: 0` says it stopped.
    Unplaced(Unplaced),
}

/// A kernel waiting for servers with room for `missing` more replicas of
/// `gpus` GPUs, none of them on `hosts` (its servers now).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unplaced {
    pub kernel_id: String,
    pub gpus: u32,
    pub missing: usize,
    pub hosts: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hosted {
    pub kernel_id: String,
    pub replica: NodeId,
    pub gpus: u32,
    pub pid: u32,
    /// Replica 1 of its kernel: it stays where Jupyter runs it.
    #[serde(default)]
    pub pinned: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Inventory {
    pub name: String,
    pub gpus: u32,
    /// GPUs no running cell holds.
    pub idle_gpus: u32,
    pub replicas: Vec<Hosted>,
    pub draining: bool,
    /// Kernels whose cells this server refused GPUs within the last second,
    /// with how many each asked for: cells waiting for GPUs right now.
    #[serde(default)]
    pub waiting: BTreeMap<String, u32>,
    /// Kernels whose fronts run here and wait for servers.
    #[serde(default)]
    pub unplaced: Vec<Unplaced>,
}

/// The agent's GPUs as the control service reports them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuReport {
    pub total: u32,
    /// GPUs no running cell holds.
    pub idle: u32,
    /// See [`Inventory::waiting`].
    pub waiting: BTreeMap<String, u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ControlResponse {
    Inventory(Inventory),
    Started { pid: u32, addr: String },
    Ok,
    Error { message: String },
}

/// The replicas this agent started, by (kernel, replica id).
type HostedReplicas = BTreeMap<(String, NodeId), (Hosted, Box<dyn ReplicaProcess>)>;

/// What the control service needs from its agent.
pub struct Host {
    pub name: String,
    /// The address replicas listen on (this server's).
    pub ip: std::net::IpAddr,
    /// Replicas find this agent here for their GPU grants.
    pub agent_socket: PathBuf,
    pub state_root: PathBuf,
    pub program: crate::program::Program,
    /// The GPUs right now.
    pub gpus: Box<dyn Fn() -> GpuReport + Send + Sync>,
    hosted: Mutex<HostedReplicas>,
    draining: std::sync::atomic::AtomicBool,
    /// By kernel, with when its front last asked.
    unplaced: Mutex<BTreeMap<String, (Unplaced, std::time::Instant)>>,
}

impl Host {
    pub fn new(
        name: String,
        ip: std::net::IpAddr,
        agent_socket: PathBuf,
        state_root: PathBuf,
        program: crate::program::Program,
        gpus: Box<dyn Fn() -> GpuReport + Send + Sync>,
    ) -> Self {
        Self {
            name,
            ip,
            agent_socket,
            state_root,
            program,
            gpus,
            hosted: Mutex::new(BTreeMap::new()),
            draining: std::sync::atomic::AtomicBool::new(false),
            unplaced: Mutex::new(BTreeMap::new()),
        }
    }

    /// Kernels with replicas this agent started (not a registered replica 1).
    pub fn hosted_kernels(&self) -> std::collections::BTreeSet<String> {
        self.hosted()
            .values()
            .filter(|(h, _)| !h.pinned)
            .map(|(h, _)| h.kernel_id.clone())
            .collect()
    }

    /// Stops every replica this agent started for `kernel_id`.
    pub fn stop_kernel(&self, kernel_id: &str) {
        let mut hosted = self.hosted();
        let keys: Vec<_> = hosted
            .iter()
            .filter(|(_, (h, _))| h.kernel_id == kernel_id && !h.pinned)
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            if let Some((h, process)) = hosted.remove(&key) {
                tracing::info!(kernel = %h.kernel_id, replica = h.replica, pid = h.pid, "stopping replica");
                tokio::task::spawn_blocking(move || process.kill());
            }
        }
    }

    fn hosted(&self) -> std::sync::MutexGuard<'_, HostedReplicas> {
        lock(&self.hosted)
    }

    /// Answers one request (JSON in, JSON out); bad input gets an error.
    pub async fn answer(self: Arc<Self>, request: Bytes) -> Vec<u8> {
        let response = match serde_json::from_slice::<ControlRequest>(&request) {
            Ok(req) => self.handle(req).await,
            Err(e) => ControlResponse::Error {
                message: format!("bad request: {e}"),
            },
        };
        serde_json::to_vec(&response).unwrap_or_default()
    }

    async fn handle(&self, req: ControlRequest) -> ControlResponse {
        match req {
            ControlRequest::Inventory => ControlResponse::Inventory(self.inventory()),
            ControlRequest::Drain { draining } => {
                self.draining
                    .store(draining, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(draining, "drain state changed");
                ControlResponse::Ok
            }
            ControlRequest::StopReplica { kernel_id, replica } => {
                let mut hosted = self.hosted();
                match hosted.get(&(kernel_id.clone(), replica)) {
                    Some((h, _)) if h.pinned => ControlResponse::Error {
                        message: format!("replica {replica} is its kernel's replica 1; it stays"),
                    },
                    Some(_) => {
                        if let Some((_, process)) = hosted.remove(&(kernel_id, replica)) {
                            tokio::task::spawn_blocking(move || process.kill());
                        }
                        ControlResponse::Ok
                    }
                    None => ControlResponse::Error {
                        message: format!("no replica {replica} of that kernel here"),
                    },
                }
            }
            ControlRequest::Unplaced(u) => {
                let mut unplaced = lock(&self.unplaced);
                if u.missing == 0 {
                    unplaced.remove(&u.kernel_id);
                } else {
                    unplaced.insert(u.kernel_id.clone(), (u, std::time::Instant::now()));
                }
                ControlResponse::Ok
            }
            ControlRequest::Register {
                kernel_id,
                replica,
                gpus,
                pid,
            } => {
                let hosted = Hosted {
                    kernel_id: kernel_id.clone(),
                    replica,
                    gpus,
                    pid,
                    pinned: true,
                };
                self.hosted().insert(
                    (kernel_id, replica),
                    (hosted, Box::new(AdoptedProcess { pid })),
                );
                ControlResponse::Ok
            }
            ControlRequest::StartReplica {
                bootstrap,
                hash_seed,
                gpus,
            } => match self.start(bootstrap, hash_seed, gpus).await {
                Ok((pid, addr)) => ControlResponse::Started { pid, addr },
                Err(message) => ControlResponse::Error { message },
            },
        }
    }

    pub(crate) fn inventory(&self) -> Inventory {
        let gpus = (self.gpus)();
        let mut hosted = self.hosted();
        hosted.retain(|_, (_, p)| p.alive());
        let mut unplaced = lock(&self.unplaced);
        unplaced.retain(|_, (_, at)| at.elapsed() < UNPLACED_FRESH);
        Inventory {
            name: self.name.clone(),
            gpus: gpus.total,
            idle_gpus: gpus.idle,
            replicas: hosted.values().map(|(h, _)| h.clone()).collect(),
            draining: self.draining.load(std::sync::atomic::Ordering::Relaxed),
            waiting: gpus.waiting,
            unplaced: unplaced.values().map(|(u, _)| u.clone()).collect(),
        }
    }

    async fn start(
        &self,
        mut bootstrap: Bootstrap,
        hash_seed: u32,
        gpus: u32,
    ) -> Result<(u32, String), String> {
        if self.draining.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(format!("{} is draining", self.name));
        }
        // The kernel id names a directory: keep it to a safe alphabet.
        if bootstrap.kernel_id.is_empty()
            || !bootstrap
                .kernel_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err("bad kernel id".into());
        }
        let state = StateDir::private(self.state_root.join(&bootstrap.kernel_id))
            .map_err(|e| e.to_string())?;
        bootstrap.listen = format!("{}:0", self.ip);
        bootstrap.addr_file = state.addr_file(bootstrap.id);
        let spawner = LocalSpawner {
            state: state.clone(),
            program: self.program.clone(),
            hash_seed,
            env: vec![(
                "NOTEBOOKOS_AGENT_SOCKET".into(),
                self.agent_socket.display().to_string(),
            )],
        };
        let process = spawner.spawn(&bootstrap).map_err(|e| e.to_string())?;
        let addr = spawn::wait_for_addr(&state, bootstrap.id, process.as_ref(), START_TIMEOUT)
            .await
            .map_err(|e| e.to_string())?;
        let pid = process.pid();
        let hosted = Hosted {
            kernel_id: bootstrap.kernel_id.clone(),
            replica: bootstrap.id,
            gpus,
            pid,
            pinned: false,
        };
        tracing::info!(kernel = %hosted.kernel_id, replica = hosted.replica, pid, %addr, "replica started");
        self.hosted().insert(
            (hosted.kernel_id.clone(), hosted.replica),
            (hosted, process),
        );
        Ok((pid, addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::client::{view, ClusterClient, ClusterError};
    use crate::cluster::config::{write_new_ca, ClusterConfig};
    use raft_transport::control::ControlServer;

    fn bootstrap(kernel_id: &str) -> Bootstrap {
        Bootstrap {
            id: 2,
            kernel_id: kernel_id.into(),
            identity_pem: String::new(),
            front: 1,
            joining: false,
            addr_file: PathBuf::new(),
            argv: vec![],
            listen: String::new(),
            cwd: None,
            env: None,
        }
    }

    #[tokio::test]
    async fn inventory_drain_and_refusals_over_quic() {
        let dir = std::env::temp_dir().join(format!("nbos-control-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write_new_ca(&dir.join("ca.pem")).unwrap();
        // The agent's port is known only once bound; the config names it.
        let probe = ClusterConfig::of_ca(dir.join("ca.pem"));
        let server =
            ControlServer::bind(&probe.identity(1).unwrap(), "127.0.0.1:0".parse().unwrap())
                .unwrap();
        let addr = server.local_addr().unwrap();
        std::fs::write(
            dir.join("cluster.json"),
            format!(r#"{{"ca": "ca.pem", "servers": [{{"name": "a", "agent": "{addr}"}}]}}"#),
        )
        .unwrap();
        let config = ClusterConfig::load(&dir.join("cluster.json")).unwrap();
        let host = Arc::new(Host::new(
            "a".into(),
            addr.ip(),
            dir.join("agent.sock"),
            dir.join("replicas"),
            crate::program::Program::binary(PathBuf::from("/nonexistent")),
            Box::new(|| GpuReport {
                total: 4,
                idle: 3,
                waiting: BTreeMap::from([("k".to_owned(), 2)]),
            }),
        ));
        tokio::spawn(server.serve(move |r| host.clone().answer(r)));

        let client = ClusterClient::new(config, "127.0.0.1:0".parse().unwrap()).unwrap();
        let inv = client.inventories().await;
        assert_eq!(inv.len(), 1);
        assert_eq!(
            (inv[0].gpus, inv[0].idle_gpus, inv[0].draining),
            (4, 3, false)
        );
        assert_eq!(inv[0].waiting, BTreeMap::from([("k".to_owned(), 2)]));

        // A kernel that waits for servers is listed until it says it stopped.
        let waits = |missing| Unplaced {
            kernel_id: "k9".into(),
            gpus: 2,
            missing,
            hosts: vec!["a".into()],
        };
        let tell = |missing| ControlRequest::Unplaced(waits(missing));
        client.call("a", &tell(2)).await.unwrap();
        assert_eq!(client.inventories().await[0].unplaced, vec![waits(2)]);
        client.call("a", &tell(0)).await.unwrap();
        assert!(client.inventories().await[0].unplaced.is_empty());

        client
            .call("a", &ControlRequest::Drain { draining: true })
            .await
            .unwrap();
        let inv = client.inventories().await;
        assert!(view(&inv).servers[0].draining);
        let refused = client
            .call(
                "a",
                &ControlRequest::StartReplica {
                    bootstrap: bootstrap("k1"),
                    hash_seed: 0,
                    gpus: 1,
                },
            )
            .await;
        assert!(
            matches!(&refused, Err(ClusterError::Refused { message, .. }) if message.contains("draining")),
            "{refused:?}"
        );
        client
            .call("a", &ControlRequest::Drain { draining: false })
            .await
            .unwrap();
        for (request, want) in [
            (
                ControlRequest::StartReplica {
                    bootstrap: bootstrap("../etc"),
                    hash_seed: 0,
                    gpus: 1,
                },
                "bad kernel id",
            ),
            (
                ControlRequest::StopReplica {
                    kernel_id: "k1".into(),
                    replica: 9,
                },
                "no replica 9",
            ),
        ] {
            let got = client.call("a", &request).await;
            assert!(
                matches!(&got, Err(ClusterError::Refused { message, .. }) if message.contains(want)),
                "{got:?}"
            );
        }
        // Not JSON at all: an error answer, and the agent keeps serving.
        let raw = Host::new(
            "b".into(),
            addr.ip(),
            dir.join("agent.sock"),
            dir.join("replicas"),
            crate::program::Program::binary(PathBuf::new()),
            Box::new(GpuReport::default),
        );
        let answer = Arc::new(raw).answer(Bytes::from_static(b"{not json")).await;
        assert!(String::from_utf8_lossy(&answer).contains("bad request"));
        assert_eq!(client.inventories().await.len(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
