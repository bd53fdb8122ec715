//! Replicas on other servers of a cluster, started through their agents.
//!
//! The front runs where Jupyter started it (one of the cluster's servers,
//! `NOTEBOOKOS_SERVER`); each other replica goes to the server the policy
//! picks, never one the kernel already uses, and is watched through its
//! agent: a replica the agent no longer lists, or whose agent stops
//! answering, is dead to the front, which then replaces it elsewhere.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use raft_transport::NodeId;

use super::group::{Bootstrap, GroupError};
use super::spawn::ReplicaProcess;
use crate::agent::control::{ControlRequest, ControlResponse, Unplaced};
use crate::cluster::client::{self, ClusterClient, ClusterError};
use crate::cluster::config::ClusterConfig;
use crate::cluster::policy::{ClusterView, KernelView, Migration, Policy, ServerId};

/// How often a remote replica's agent is asked whether it still runs it.
const WATCH_INTERVAL: Duration = Duration::from_millis(500);
/// Unanswered checks in a row after which the replica counts as lost.
const MISSES: u32 = 4;
/// How often a kernel waiting for servers looks again, and tells its agent
/// it still waits (within `agent::control::UNPLACED_FRESH`).
pub const PLACE_RETRY: Duration = Duration::from_secs(2);

/// The client for the servers the cluster's config lists now: the
/// autoscaler's provider adds servers to it while kernels run.
struct Clients {
    path: PathBuf,
    ip: std::net::IpAddr,
    current: Mutex<(Arc<ClusterClient>, Option<SystemTime>)>,
}

/// When the file at `path` last changed, if that can be read.
fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl Clients {
    fn get(&self) -> Arc<ClusterClient> {
        let modified = modified(&self.path);
        let mut current = super::lock(&self.current);
        if modified.is_some() && modified != current.1 {
            let fresh = ClusterConfig::load(&self.path)
                .map_err(ClusterError::from)
                .and_then(|c| ClusterClient::new(c, std::net::SocketAddr::new(self.ip, 0)));
            match fresh {
                Ok(c) => *current = (Arc::new(c), modified),
                Err(e) => tracing::warn!("keeping the cluster's old server list: {e}"),
            }
        }
        current.0.clone()
    }
}

pub struct ClusterPlacement {
    clients: Clients,
    policy: Policy,
    /// How long a new kernel waits for servers with room for its replicas.
    place_wait: Duration,
    /// The server this process (the front) runs on.
    pub me: ServerId,
    /// GPUs this kernel's replicas may ask for: what each subscribes.
    gpus: u32,
    hash_seed: u32,
}

impl ClusterPlacement {
    /// From `NOTEBOOKOS_CLUSTER` (the config) and `NOTEBOOKOS_SERVER` (this
    /// server's name), if set; `NOTEBOOKOS_KERNEL_GPUS` (default 1) is the
    /// kernel's subscription.
    pub fn from_env(hash_seed: u32) -> Result<Option<Self>, GroupError> {
        let Some(path) = std::env::var_os("NOTEBOOKOS_CLUSTER") else {
            return Ok(None);
        };
        let me = std::env::var("NOTEBOOKOS_SERVER").map_err(|_| {
            GroupError::Start("NOTEBOOKOS_CLUSTER is set but NOTEBOOKOS_SERVER is not".into())
        })?;
        let gpus = match std::env::var("NOTEBOOKOS_KERNEL_GPUS") {
            Ok(v) => v.trim().parse().map_err(|_| {
                GroupError::Start(format!("NOTEBOOKOS_KERNEL_GPUS={v:?} is not a number"))
            })?,
            Err(_) => 1,
        };
        Self::open(Path::new(&path), me, gpus, hash_seed).map(Some)
    }

    /// The cluster the config at `path` lists, for a front on server `me`.
    pub fn open(path: &Path, me: ServerId, gpus: u32, hash_seed: u32) -> Result<Self, GroupError> {
        let start = |e: ClusterError| GroupError::Start(e.to_string());
        let config = ClusterConfig::load(path).map_err(|e| start(e.into()))?;
        let ip = config.server(&me).map_err(|e| start(e.into()))?.agent.ip();
        let (policy, place_wait) = (config.policy(), config.place_wait());
        let client = ClusterClient::new(config, std::net::SocketAddr::new(ip, 0)).map_err(start)?;
        Ok(Self {
            clients: Clients {
                path: path.to_owned(),
                ip,
                current: Mutex::new((Arc::new(client), modified(path))),
            },
            policy,
            place_wait,
            me,
            gpus,
            hash_seed,
        })
    }

    /// This server's address: where the front's own replica listens.
    pub fn ip(&self) -> Result<std::net::IpAddr, GroupError> {
        self.clients
            .get()
            .config
            .server(&self.me)
            .map(|s| s.agent.ip())
            .map_err(|e| GroupError::Start(e.to_string()))
    }

    pub fn migrate_after(&self) -> Duration {
        self.policy.migrate_after
    }

    /// Starts a replica on the server the policy picks outside `in_use`;
    /// returns the server, the process handle and the replica's address.
    pub async fn start(
        &self,
        bootstrap: Bootstrap,
        in_use: &[ServerId],
    ) -> Result<(ServerId, Box<dyn ReplicaProcess>, String), GroupError> {
        let view = client::view(&self.clients.get().inventories().await);
        let server = self
            .policy
            .replace(&view, self.gpus, in_use)
            .map_err(|e| GroupError::Start(format!("no server for a replica: {e}")))?;
        let (process, addr) = self.start_on(bootstrap, &server).await?;
        Ok((server, process, addr))
    }

    /// Where one of `movable` (a subset of the kernel's `hosts`) should go
    /// so a cell asking for `gpus` runs now.
    pub async fn plan_migration(
        &self,
        gpus: u32,
        hosts: &[(NodeId, ServerId)],
        movable: &[ServerId],
    ) -> Result<Migration, GroupError> {
        let view = client::view(&self.clients.get().inventories().await);
        let all: Vec<ServerId> = hosts.iter().map(|(_, h)| h.clone()).collect();
        let plan = self
            .policy
            .migrate(&view, gpus, &all)
            .map_err(|e| GroupError::Start(e.to_string()))?;
        unpinned(plan, &view, movable)
            .ok_or_else(|| GroupError::Start("no replica can move".into()))
    }

    /// A move ahead of the next cell ([`Policy::rebalance`]): none of
    /// `hosts` has this kernel's GPUs idle now, and another server has.
    pub async fn plan_rebalance(
        &self,
        hosts: &[(NodeId, ServerId)],
        movable: &[ServerId],
    ) -> Option<Migration> {
        let view = client::view(&self.clients.get().inventories().await);
        let kernel = KernelView {
            gpus: self.gpus,
            hosts: hosts.iter().map(|(_, h)| h.clone()).collect(),
        };
        let (_, plan) = self.policy.rebalance(&view, &[kernel]).into_iter().next()?;
        unpinned(plan, &view, movable)
    }

    /// Starts a replica on `server`; returns the process handle and its address.
    pub async fn start_on(
        &self,
        bootstrap: Bootstrap,
        server: &str,
    ) -> Result<(Box<dyn ReplicaProcess>, String), GroupError> {
        let server = server.to_owned();
        let (kernel_id, replica) = (bootstrap.kernel_id.clone(), bootstrap.id);
        let request = ControlRequest::StartReplica {
            bootstrap,
            hash_seed: self.hash_seed,
            gpus: self.gpus,
        };
        let client = self.clients.get();
        let answer = client
            .call(&server, &request)
            .await
            .map_err(|e| GroupError::Start(e.to_string()))?;
        let ControlResponse::Started { pid, addr } = answer else {
            return Err(GroupError::Start(format!(
                "agent {server} answered {answer:?} to a replica start"
            )));
        };
        tracing::info!(replica, %server, pid, %addr, "replica started on another server");
        let process = RemoteProcess::watch(client, server, kernel_id, replica, pid);
        Ok((Box::new(process), addr))
    }

    /// Tells this server's agent about replica 1 (this process), which
    /// Jupyter started: it then counts there and is never drained away.
    pub async fn register(&self, kernel_id: &str, replica: NodeId) -> Result<(), GroupError> {
        let request = ControlRequest::Register {
            kernel_id: kernel_id.to_owned(),
            replica,
            gpus: self.gpus,
            pid: std::process::id(),
        };
        self.clients
            .get()
            .call(&self.me, &request)
            .await
            .map(drop)
            .map_err(|e| GroupError::Start(e.to_string()))
    }

    /// Waits, up to the cluster's `place_wait_s`, for servers with room for
    /// `missing` more replicas outside `hosts`, telling this server's agent
    /// meanwhile so that the autoscaler adds them. Whether there are.
    pub async fn wait_for_room(&self, kernel_id: &str, hosts: &[ServerId], missing: usize) -> bool {
        let deadline = Instant::now() + self.place_wait;
        let mut asked = false;
        loop {
            let client = self.clients.get();
            let view = client::view(&client.inventories().await);
            let short = self
                .policy
                .servers_missing(&view, self.gpus, missing, hosts);
            if short == 0 || Instant::now() >= deadline {
                if asked {
                    self.tell_unplaced(&client, kernel_id, hosts, 0).await;
                }
                return short == 0;
            }
            if !asked {
                tracing::warn!(
                    missing,
                    servers_short = short,
                    wait_s = self.place_wait.as_secs(),
                    "no server has room for this kernel's replicas; waiting for the autoscaler"
                );
            }
            self.tell_unplaced(&client, kernel_id, hosts, missing).await;
            asked = true;
            tokio::time::sleep(PLACE_RETRY).await;
        }
    }

    async fn tell_unplaced(
        &self,
        client: &ClusterClient,
        kernel_id: &str,
        hosts: &[ServerId],
        missing: usize,
    ) {
        let request = ControlRequest::Unplaced(Unplaced {
            kernel_id: kernel_id.to_owned(),
            gpus: self.gpus,
            missing,
            hosts: hosts.to_vec(),
        });
        if let Err(e) = client.call(&self.me, &request).await {
            tracing::warn!("could not tell this server's agent the kernel waits for servers: {e}");
        }
    }

    /// A replica a previous front started on `server` (after a restart).
    pub fn adopt(
        &self,
        server: ServerId,
        kernel_id: String,
        replica: NodeId,
        pid: u32,
    ) -> RemoteProcess {
        RemoteProcess::watch(self.clients.get(), server, kernel_id, replica, pid)
    }
}

/// A replica another server's agent runs for us.
pub struct RemoteProcess {
    pid: u32,
    server: ServerId,
    kernel_id: String,
    replica: NodeId,
    alive: Arc<AtomicBool>,
    client: Arc<ClusterClient>,
    watcher: tokio::task::JoinHandle<()>,
}

impl RemoteProcess {
    fn watch(
        client: Arc<ClusterClient>,
        server: ServerId,
        kernel_id: String,
        replica: NodeId,
        pid: u32,
    ) -> Self {
        let alive = Arc::new(AtomicBool::new(true));
        let watcher = tokio::spawn({
            let (client, server, kernel_id, alive) = (
                client.clone(),
                server.clone(),
                kernel_id.clone(),
                alive.clone(),
            );
            async move {
                let mut misses = 0;
                loop {
                    tokio::time::sleep(WATCH_INTERVAL).await;
                    match client.call(&server, &ControlRequest::Inventory).await {
                        Ok(ControlResponse::Inventory(inv)) => {
                            misses = 0;
                            let listed = inv
                                .replicas
                                .iter()
                                .any(|h| h.kernel_id == kernel_id && h.replica == replica);
                            if !listed {
                                // The front says so, unless it is stopping the group.
                                tracing::debug!(replica, %server, "the agent no longer runs this replica");
                                break;
                            }
                        }
                        other => {
                            misses += 1;
                            if misses >= MISSES {
                                let why = match other {
                                    Err(e) => e.to_string(),
                                    Ok(r) => format!("{r:?}"),
                                };
                                tracing::warn!(replica, %server, "server unreachable: {why}");
                                break;
                            }
                        }
                    }
                }
                alive.store(false, Ordering::Relaxed);
            }
        });
        Self {
            pid,
            server,
            kernel_id,
            replica,
            alive,
            client,
            watcher,
        }
    }
}

impl ReplicaProcess for RemoteProcess {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }

    fn host(&self) -> Option<String> {
        Some(self.server.clone())
    }

    fn kill(&self) {
        self.watcher.abort();
        self.alive.store(false, Ordering::Relaxed);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (client, server) = (self.client.clone(), self.server.clone());
        let request = ControlRequest::StopReplica {
            kernel_id: self.kernel_id.clone(),
            replica: self.replica,
        };
        // A plain thread may block on the runtime wherever kill is called from.
        let stopped = std::thread::spawn(move || {
            runtime.block_on(async move { client.call(&server, &request).await })
        })
        .join();
        if let Ok(Err(e)) = stopped {
            tracing::debug!(replica = self.replica, "stopping a remote replica: {e}");
        }
    }
}

/// `plan` with a movable replica: when the policy picked a pinned one
/// (replica 1, where Jupyter runs it), the busiest movable one goes instead.
fn unpinned(mut plan: Migration, view: &ClusterView, movable: &[ServerId]) -> Option<Migration> {
    if !movable.contains(&plan.from) {
        plan.from = movable
            .iter()
            .max_by_key(|h| view.get(h).map_or(u32::MAX, |s| s.subscribed))
            .cloned()?;
    }
    Some(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::control::{GpuReport, Host};
    use crate::cluster::config::{write_new_ca, ClusterConfig};
    use raft_transport::control::ControlServer;

    /// An agent named `name`, `id`-th in the config, with 8 idle GPUs,
    /// serving on loopback.
    fn agent(dir: &Path, name: &str, id: NodeId) -> (Arc<Host>, std::net::SocketAddr) {
        let probe = ClusterConfig::of_ca(dir.join("ca.pem"));
        let server =
            ControlServer::bind(&probe.identity(id).unwrap(), "127.0.0.1:0".parse().unwrap())
                .unwrap();
        let addr = server.local_addr().unwrap();
        let host = Arc::new(Host::new(
            name.into(),
            addr.ip(),
            dir.join("agent.sock"),
            dir.join("replicas"),
            crate::program::Program::binary(PathBuf::from("/nonexistent")),
            Box::new(|| GpuReport {
                total: 8,
                idle: 8,
                ..GpuReport::default()
            }),
        ));
        let serving = host.clone();
        tokio::spawn(server.serve(move |r| serving.clone().answer(r)));
        (host, addr)
    }

    fn write_config(path: &Path, agents: &[(&str, std::net::SocketAddr)]) {
        let servers: Vec<String> = agents
            .iter()
            .map(|(n, a)| format!(r#"{{"name": "{n}", "agent": "{a}"}}"#))
            .collect();
        let text = format!(
            r#"{{"ca": "ca.pem", "place_wait_s": 60, "servers": [{}]}}"#,
            servers.join(",")
        );
        std::fs::write(path, text).unwrap();
    }

    #[tokio::test]
    async fn a_kernel_waits_for_servers_the_config_gains_and_its_agent_hears_of_it() {
        let dir = std::env::temp_dir().join(format!("nbos-place-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write_new_ca(&dir.join("ca.pem")).unwrap();
        let path = dir.join("cluster.json");
        let (a, addr_a) = agent(&dir, "a", 1);
        let (_b, addr_b) = agent(&dir, "b", 2);
        let (_c, addr_c) = agent(&dir, "c", 3);
        write_config(&path, &[("a", addr_a)]);
        let placement = Arc::new(ClusterPlacement::open(&path, "a".into(), 1, 0).unwrap());

        let waiting = placement.clone();
        let wait =
            tokio::spawn(async move { waiting.wait_for_room("k", &["a".to_owned()], 2).await });
        let listed = |a: &Host| a.inventory().unplaced;
        let deadline = Instant::now() + Duration::from_secs(20);
        while listed(&a).is_empty() {
            assert!(
                Instant::now() < deadline,
                "the agent never heard of the kernel"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let told = listed(&a);
        assert_eq!(
            (told[0].missing, told[0].hosts.clone()),
            (2, vec!["a".into()])
        );
        assert!(!wait.is_finished());

        // The autoscaler's provider lists two more servers.
        write_config(&path, &[("a", addr_a), ("b", addr_b), ("c", addr_c)]);
        let placed = tokio::time::timeout(Duration::from_secs(30), wait)
            .await
            .expect("the kernel still waits")
            .unwrap();
        assert!(placed);
        assert!(listed(&a).is_empty(), "the agent still lists the kernel");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
