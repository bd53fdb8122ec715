//! `notebookos-kernel agent`: one per GPU host. It owns the host's GPU
//! inventory and grants GPUs to replicas for one cell at a time, as leases
//! their holders renew; it accounts GPU-seconds held and used per kernel and
//! serves them as Prometheus metrics.
//!
//! * [`grants`]: the pure lease and accounting policy.
//! * [`inventory`]: GPUs from the CUDA driver (loaded at run time) or fake ones.
//! * [`protocol`]: the JSON-lines protocol on the agent's Unix socket.
//! * [`client`]: what a replica uses.
//! * [`control`]: the cluster side (`--cluster`): inventory, replicas
//!   started and stopped for kernels, drain; over QUIC with mutual TLS.
//! * `metrics`: the Prometheus text.

pub mod client;
pub mod control;
pub mod grants;
pub mod inventory;
mod metrics;
pub mod protocol;
pub mod reaper;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener, UnixStream};

use grants::Grants;
use inventory::Gpu;
use protocol::{Request, Response, Status};

/// Longest request line accepted; a request is a few hundred bytes.
const MAX_LINE: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("agent socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Cluster(#[from] crate::cluster::config::ConfigError),
    #[error(transparent)]
    ClusterClient(#[from] crate::cluster::client::ClusterError),
    #[error("cluster control on {addr}: {source}")]
    Control {
        addr: std::net::SocketAddr,
        #[source]
        source: raft_transport::Error,
    },
    #[error("metrics address {addr}: {source}")]
    Metrics {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

pub struct AgentOptions {
    pub socket: PathBuf,
    /// `Some(n)`: n fake GPUs (tests); `None`: ask the CUDA driver.
    pub fake_gpus: Option<u32>,
    /// Where to serve `/metrics` (e.g. 127.0.0.1:9464); `None`: not served.
    pub metrics: Option<String>,
    /// Serve the cluster control protocol as this server of this cluster.
    pub cluster: Option<ClusterMembership>,
    /// How long replicas started here outlive their kernel's replica 1.
    pub rejoin_grace: Duration,
}

pub struct ClusterMembership {
    pub config: PathBuf,
    pub name: String,
}

struct Agent {
    gpus: Vec<Gpu>,
    fake: bool,
    grants: Mutex<Grants>,
}

/// The default socket: `$NOTEBOOKOS_AGENT_SOCKET`, else under the runtime dir.
pub fn default_socket() -> PathBuf {
    if let Some(p) = std::env::var_os("NOTEBOOKOS_AGENT_SOCKET") {
        return PathBuf::from(p);
    }
    let base = match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("notebookos"),
        // SAFETY: getuid has no preconditions.
        None => std::env::temp_dir().join(format!("notebookos-{}", unsafe { libc::getuid() })),
    };
    base.join("agent.sock")
}

pub async fn run(opts: AgentOptions) -> Result<(), AgentError> {
    let (gpus, fake) = match opts.fake_gpus {
        Some(n) => (inventory::fake(n), true),
        None => (inventory::discover(), false),
    };
    tracing::info!(gpus = gpus.len(), fake, socket = %opts.socket.display(), "agent starting");
    let agent = Arc::new(Agent {
        grants: Mutex::new(Grants::new(gpus.len() as u32)),
        gpus,
        fake,
    });
    let socket_err = |source| AgentError::Socket {
        path: opts.socket.clone(),
        source,
    };
    if let Some(dir) = opts.socket.parent() {
        std::fs::create_dir_all(dir).map_err(socket_err)?;
    }
    // A stale socket from an agent that died; a live one would still accept.
    if UnixStream::connect(&opts.socket).await.is_err() {
        crate::replica::group::remove_file(&opts.socket);
    }
    let listener = UnixListener::bind(&opts.socket).map_err(socket_err)?;
    std::fs::set_permissions(&opts.socket, std::fs::Permissions::from_mode(0o600))
        .map_err(socket_err)?;
    if let Some(addr) = &opts.metrics {
        let tcp = TcpListener::bind(addr)
            .await
            .map_err(|source| AgentError::Metrics {
                addr: addr.clone(),
                source,
            })?;
        tokio::spawn(metrics::serve(tcp, {
            let agent = agent.clone();
            move || agent.status()
        }));
    }
    if let Some(membership) = &opts.cluster {
        serve_cluster(agent.clone(), membership, &opts.socket, opts.rejoin_grace)?;
    }
    tokio::spawn(expire_loop(agent.clone()));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve(agent.clone(), stream));
            }
            Err(e) => {
                tracing::warn!("agent accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serves the cluster control protocol at this server's configured address.
fn serve_cluster(
    agent: Arc<Agent>,
    membership: &ClusterMembership,
    socket: &std::path::Path,
    rejoin_grace: Duration,
) -> Result<(), AgentError> {
    let config = crate::cluster::config::ClusterConfig::load(&membership.config)?;
    let entry = config.server(&membership.name)?.clone();
    let identity = config.identity(config.server_id(&membership.name)?)?;
    let control_err = |source| AgentError::Control {
        addr: entry.agent,
        source,
    };
    let server = raft_transport::control::ControlServer::bind(&identity, entry.agent)
        .map_err(control_err)?;
    let program = crate::program::Program::current().map_err(|e| control_err(e.into()))?;
    let state_root = socket
        .parent()
        .map_or_else(std::env::temp_dir, std::path::Path::to_path_buf)
        .join("replicas");
    let host = Arc::new(control::Host::new(
        membership.name.clone(),
        entry.agent.ip(),
        socket.to_owned(),
        state_root,
        program,
        Box::new(move || agent.gpu_report()),
    ));
    let local = std::net::SocketAddr::new(entry.agent.ip(), 0);
    let cluster = crate::cluster::client::ClusterClient::new(config, local)?;
    tokio::spawn(reaper::run(host.clone(), cluster, rejoin_grace));
    tracing::info!(server = %membership.name, addr = %entry.agent, "serving cluster control");
    tokio::spawn(server.serve(move |request| host.clone().answer(request)));
    Ok(())
}

async fn expire_loop(agent: Arc<Agent>) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tick.tick().await;
        let expired = agent.lock().expire(Instant::now());
        for g in expired {
            tracing::warn!(grant = g.id, kernel = %g.kernel, replica = g.replica, "lease expired; GPUs freed");
        }
    }
}

async fn serve(agent: Arc<Agent>, stream: UnixStream) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        // Bounded: a client cannot make the agent buffer an endless line.
        let mut limited = (&mut reader).take(MAX_LINE as u64 + 1);
        match limited.read_until(b'\n', &mut line).await {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => {
                tracing::debug!("agent client read failed: {e}");
                return;
            }
        }
        let response = if line.len() > MAX_LINE {
            // The rest of the line is not read: drop the client.
            if let Err(e) = write
                .write_all(b"{\"error\":{\"message\":\"request too long\"}}\n")
                .await
            {
                tracing::debug!("agent client gone: {e}");
            }
            return;
        } else {
            match serde_json::from_slice::<Request>(&line) {
                Ok(req) => agent.handle(req),
                Err(e) => Response::Error {
                    message: format!("bad request: {e}"),
                },
            }
        };
        let mut out = serde_json::to_vec(&response).unwrap_or_default();
        out.push(b'\n');
        if write.write_all(&out).await.is_err() {
            return;
        }
    }
}

impl Agent {
    fn lock(&self) -> std::sync::MutexGuard<'_, Grants> {
        self.grants.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn handle(&self, req: Request) -> Response {
        let now = Instant::now();
        match req {
            Request::Grant {
                kernel,
                replica,
                gpus,
                lease_ms,
            } => {
                let lease = Duration::from_millis(lease_ms.clamp(100, 600_000));
                match self.lock().grant(&kernel, replica, gpus, lease, now) {
                    Ok(g) => {
                        tracing::info!(grant = g.id, %kernel, replica, gpus = ?g.gpus, "granted");
                        Response::Granted {
                            id: g.id,
                            gpus: g.gpus,
                            fake: self.fake,
                        }
                    }
                    Err(e) => Response::Refused {
                        reclaiming: matches!(e, grants::GrantError::Reclaiming { .. }),
                        reason: e.to_string(),
                    },
                }
            }
            Request::Renew { id } => match self.lock().renew(id, now) {
                Ok(grants::Renewal::Held) => Response::Ok,
                Ok(grants::Renewal::Revoked) => Response::Revoked,
                Err(e) => Response::Error {
                    message: e.to_string(),
                },
            },
            Request::Cache { id, used_ms } => {
                match self.lock().cache(id, Duration::from_millis(used_ms), now) {
                    Ok(()) => Response::Ok,
                    Err(e) => Response::Error {
                        message: e.to_string(),
                    },
                }
            }
            Request::Release {
                id,
                used_ms,
                moving_ms,
            } => {
                let (used, moving) = (
                    Duration::from_millis(used_ms),
                    Duration::from_millis(moving_ms),
                );
                match self.lock().release(id, used, moving, now) {
                    Ok(()) => {
                        tracing::info!(grant = id, used_ms, moving_ms, "released");
                        Response::Ok
                    }
                    Err(e) => Response::Error {
                        message: e.to_string(),
                    },
                }
            }
            Request::Status => Response::Status(self.status()),
        }
    }

    /// GPUs, those free for a new cell, and the kernels waiting for some.
    /// Cached grants count as free: the agent revokes them on demand, and
    /// moving their state off takes a fraction of a second (docs/gpu.md),
    /// far less than a scale-out.
    fn gpu_report(&self) -> control::GpuReport {
        let total = self.gpus.len() as u32;
        let g = self.lock();
        let held: usize = g.active().iter().map(|g| g.gpus.len()).sum();
        let running = held.saturating_sub(g.cached_gpus());
        control::GpuReport {
            total,
            idle: total.saturating_sub(running as u32),
            waiting: g.waiting(Instant::now()),
        }
    }

    fn status(&self) -> Status {
        let g = self.lock();
        Status {
            gpus: self.gpus.clone(),
            fake: self.fake,
            grants: g.active().into_iter().map(Into::into).collect(),
            usage: g
                .usage(Instant::now())
                .iter()
                .map(|(k, u)| (k.clone(), u.into()))
                .collect(),
        }
    }
}
