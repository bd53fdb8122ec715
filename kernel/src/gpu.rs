//! GPUs for the cells a replica runs. A replica that bids to lead a cell that
//! needs GPUs first gets them from its host's agent (a lease, renewed while
//! held); the winner binds them for the cell (the primary CUDA context, shared
//! with PyTorch/CuPy in this process, and the shim makes the device current).
//!
//! After the cell the grant stays cached: the state stays on the GPUs and
//! this replica's next cell that asks for as many finds it there. The agent
//! revokes a cached grant when another replica needs those GPUs; then, or
//! after `NOTEBOOKOS_GPU_CACHE_IDLE` seconds unused (default 600; 0: after
//! every cell), device state moves to host memory and the GPUs go back.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyo3::types::PyAnyMethods;
use tokio::task::JoinHandle;

use crate::agent::client::{AgentClient, AgentGrant, Granting};
use crate::python::Executor;

/// How long a grant lives without renewal: a killed replica's GPUs are free
/// again this long after its last renewal.
const LEASE: Duration = Duration::from_secs(3);
/// How often a cached grant asks the agent whether it was revoked: the
/// latency another kernel waits on top of the holder's offload.
const CACHED_RENEW: Duration = Duration::from_millis(50);
/// How long a replica waits for GPUs being reclaimed from others before it
/// yields (and re-bids) instead.
const RECLAIM_PATIENCE: Duration = Duration::from_secs(30);
const DEFAULT_CACHE_IDLE: Duration = Duration::from_secs(600);

/// GPUs a cell asks for: `%%gpus N` on its first line, else the kernel's default
/// (`NOTEBOOKOS_GPUS`, 0 when unset).
pub fn wanted(code: &str, default: u32) -> u32 {
    let first = code.lines().next().unwrap_or("").trim();
    match first.strip_prefix("%%gpus") {
        Some(rest) => rest.trim().parse().unwrap_or(default),
        None => default,
    }
}

struct Held {
    grant: AgentGrant,
    renew: JoinHandle<()>,
    /// Taken back from this replica's cache: state from an earlier cell is on it.
    from_cache: bool,
    /// Its cell ended; the GPUs go back once their state is off them.
    finished: bool,
}

pub struct Grants {
    socket: PathBuf,
    default: u32,
    agent: tokio::sync::OnceCell<Option<Arc<AgentClient>>>,
    held: Mutex<HashMap<String, Held>>,
    released: tokio::sync::Notify,
    /// The grant kept after a cell, with the state on its GPUs.
    cached: Mutex<Option<Cached>>,
    /// Zero: no caching.
    cache_idle: Duration,
}

struct Cached {
    grant: AgentGrant,
    /// Tells its watcher that a cell took it back.
    reused: tokio::sync::oneshot::Sender<()>,
}

/// Why a cached grant ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheEnd {
    /// This replica's next cell took it, state in place.
    Reused,
    /// Another replica needs the GPUs.
    Revoked,
    /// Unused for the idle time.
    Idle,
    /// The agent no longer knows it (it restarted, or the lease expired).
    Lost,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Grants {
    pub fn from_env() -> Self {
        Self {
            socket: crate::agent::default_socket(),
            default: std::env::var("NOTEBOOKOS_GPUS")
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0),
            agent: tokio::sync::OnceCell::new(),
            held: Mutex::new(HashMap::new()),
            released: tokio::sync::Notify::new(),
            cached: Mutex::new(None),
            cache_idle: std::env::var("NOTEBOOKOS_GPU_CACHE_IDLE")
                .ok()
                .and_then(|v| v.trim().parse::<f64>().ok())
                .and_then(|s| Duration::try_from_secs_f64(s).ok())
                .unwrap_or(DEFAULT_CACHE_IDLE),
        }
    }

    pub fn default_gpus(&self) -> u32 {
        self.default
    }

    async fn agent(&self) -> Option<Arc<AgentClient>> {
        self.agent
            .get_or_init(|| async {
                match AgentClient::ensure(self.socket.clone()).await {
                    Ok(c) => Some(Arc::new(c)),
                    Err(e) => {
                        tracing::error!("no GPU agent: {e}; cells run on CPU");
                        None
                    }
                }
            })
            .await
            .clone()
    }

    /// The host agent's status, if one is running (never starts one).
    pub async fn agent_status(&self) -> Option<crate::agent::protocol::Status> {
        let client = match self.agent.get() {
            Some(Some(c)) => c.clone(),
            _ => Arc::new(AgentClient::new(self.socket.clone())),
        };
        client.status().await.ok()
    }

    /// Takes `n` GPUs for `cell` if the agent can grant them now. A host with
    /// no GPUs (or no agent) runs the cell on CPU, so that counts as success.
    pub async fn acquire(&self, kernel: &str, replica: u64, cell: &str, n: u32) -> bool {
        if lock(&self.held).contains_key(cell) {
            return true;
        }
        // GPUs of a cell that ended here are about to be free: the agent would refuse
        // them to this replica's next cell meanwhile, and every replica would yield.
        loop {
            let released = self.released.notified();
            if !lock(&self.held).values().any(|h| h.finished) {
                break;
            }
            released.await;
        }
        let Some(agent) = self.agent().await else {
            return true;
        };
        let deadline = tokio::time::Instant::now() + RECLAIM_PATIENCE;
        let mut answer = agent.grant(kernel, replica, n, LEASE).await;
        // Others' cached GPUs are on their way to us: worth waiting for, since
        // yielding would queue the cell behind a re-bid.
        while matches!(answer, Ok(Granting::Reclaiming)) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(CACHED_RENEW).await;
            answer = agent.grant(kernel, replica, n, LEASE).await;
        }
        match answer {
            Ok(Granting::Granted(grant)) => {
                let mut cached = lock(&self.cached);
                let from_cache = cached.as_ref().is_some_and(|c| c.grant.id == grant.id);
                if from_cache {
                    if let Some(c) = cached.take() {
                        // Its watcher stops; the state is where the cell needs it.
                        let _ = c.reused.send(());
                    }
                }
                drop(cached);
                let renew = tokio::spawn(renew_loop(agent.clone(), grant.id));
                let held = Held {
                    grant,
                    renew,
                    from_cache,
                    finished: false,
                };
                lock(&self.held).insert(cell.to_owned(), held);
                true
            }
            Ok(Granting::Refused | Granting::Reclaiming) => {
                matches!(agent.status().await, Ok(s) if s.gpus.is_empty())
            }
            Err(e) => {
                tracing::warn!("GPU grant failed: {e}");
                false
            }
        }
    }

    /// `cell` ended here; its GPUs are released once its state is off them.
    pub fn finished(&self, cell: &str) {
        if let Some(h) = lock(&self.held).get_mut(cell) {
            h.finished = true;
        }
    }

    /// Whether GPU state stays on the GPUs between cells.
    pub fn caching(&self) -> bool {
        !self.cache_idle.is_zero()
    }

    /// `cell` ended having run `used`: its grant becomes this replica's cached
    /// one. Resolves when that ends; unless a cell reused it, the caller then
    /// moves the state off and calls [`Grants::release_cached`].
    pub async fn cache(&self, cell: &str, used: Duration) -> Option<CachedGrant> {
        let held = lock(&self.held).remove(cell)?;
        held.renew.abort();
        let agent = self.agent.get().cloned().flatten()?;
        if let Err(e) = agent.cache(held.grant.id, used).await {
            tracing::warn!(grant = held.grant.id, "caching the GPU grant failed: {e}");
        }
        let (reused, taken) = tokio::sync::oneshot::channel();
        let previous = lock(&self.cached).replace(Cached {
            grant: held.grant.clone(),
            reused,
        });
        if let Some(p) = previous {
            tracing::warn!(
                grant = p.grant.id,
                "a second cached grant; the first is dropped"
            );
        }
        self.released.notify_waiters();
        Some(CachedGrant {
            id: held.grant.id,
            end: tokio::spawn(watch_cached(agent, held.grant.id, self.cache_idle, taken)),
        })
    }

    /// The election for `cell` went elsewhere: its GPUs go back to the agent,
    /// or, if they came from this replica's cache (with earlier state on
    /// them), back to the cache; then the caller watches it as after a cell.
    pub async fn give_back(&self, cell: &str) -> Option<CachedGrant> {
        let from_cache = lock(&self.held).get(cell).is_some_and(|h| h.from_cache);
        if from_cache {
            return self.cache(cell, Duration::ZERO).await;
        }
        self.release(cell, Duration::ZERO).await;
        None
    }

    /// Gives back the cached grant `id` once its state is off (`moving` long).
    pub async fn release_cached(&self, id: u64, moving: Duration) {
        {
            let mut cached = lock(&self.cached);
            if cached.as_ref().is_some_and(|c| c.grant.id == id) {
                cached.take();
            }
        }
        if let Some(agent) = self.agent.get().cloned().flatten() {
            if let Err(e) = agent.release(id, Duration::ZERO, moving).await {
                tracing::warn!(
                    grant = id,
                    "GPU release failed ({e}); the lease will expire"
                );
            }
        }
    }

    /// Gives back `cell`'s GPUs; `used` is how long a cell ran on them.
    pub async fn release(&self, cell: &str, used: Duration) {
        let Some(held) = lock(&self.held).remove(cell) else {
            return;
        };
        held.renew.abort();
        self.released.notify_waiters();
        if let Some(agent) = self.agent.get().cloned().flatten() {
            if let Err(e) = agent.release(held.grant.id, used, Duration::ZERO).await {
                tracing::warn!(
                    grant = held.grant.id,
                    "GPU release failed ({e}); the lease will expire"
                );
            }
        }
    }

    /// Binds `cell`'s GPUs for the cell about to run here, if it has any.
    pub async fn bind(&self, cell: &str, exec: &Executor) -> Option<Binding> {
        let grant = lock(&self.held).get(cell).map(|h| h.grant.clone())?;
        let contexts = if grant.fake {
            Vec::new()
        } else {
            retain_primary(&grant.gpus)
        };
        let (gpus, fake) = (grant.gpus.clone(), grant.fake);
        let bound = exec
            .run(move |_py, k| {
                k.call_method1("gpu_bind", (gpus, fake))?
                    .extract::<String>()
            })
            .await;
        match bound {
            Ok(report) => {
                tracing::info!(gpus = ?grant.gpus, %report, "GPU bound; device state restored")
            }
            Err(e) => tracing::warn!("binding the granted GPUs in Python failed: {e}"),
        }
        Some(Binding {
            _contexts: contexts,
        })
    }
}

/// A cached grant, and how it ends.
pub struct CachedGrant {
    pub id: u64,
    end: tokio::task::JoinHandle<CacheEnd>,
}

impl CachedGrant {
    pub async fn ended(self) -> CacheEnd {
        self.end.await.unwrap_or(CacheEnd::Lost)
    }
}

async fn renew_loop(agent: Arc<AgentClient>, id: u64) {
    loop {
        tokio::time::sleep(LEASE / 3).await;
        if let Err(e) = agent.renew(id).await {
            tracing::warn!(grant = id, "GPU lease renewal failed: {e}");
            return;
        }
    }
}

/// Renews a cached grant often, so a revocation is heard at once.
async fn watch_cached(
    agent: Arc<AgentClient>,
    id: u64,
    idle: Duration,
    mut reused: tokio::sync::oneshot::Receiver<()>,
) -> CacheEnd {
    let until = tokio::time::Instant::now() + idle;
    loop {
        tokio::select! {
            _ = &mut reused => return CacheEnd::Reused,
            _ = tokio::time::sleep(CACHED_RENEW) => {}
        }
        if tokio::time::Instant::now() >= until {
            return CacheEnd::Idle;
        }
        match agent.renew(id).await {
            Ok(true) => {}
            Ok(false) => return CacheEnd::Revoked,
            Err(e) => {
                tracing::warn!(grant = id, "cached GPU grant lost: {e}");
                return CacheEnd::Lost;
            }
        }
    }
}

fn retain_primary(gpus: &[u32]) -> Vec<Arc<cudarc::driver::CudaContext>> {
    if !crate::agent::inventory::cuda_driver_present() {
        if !gpus.is_empty() {
            tracing::warn!(?gpus, "no CUDA driver to bind the granted GPUs");
        }
        return Vec::new();
    }
    gpus.iter()
        .filter_map(|g| {
            let ordinal = *g as usize;
            match std::panic::catch_unwind(|| cudarc::driver::CudaContext::new(ordinal)) {
                Ok(Ok(ctx)) => Some(ctx),
                Ok(Err(e)) => {
                    tracing::warn!(gpu = g, "cannot retain the primary CUDA context: {e}");
                    None
                }
                Err(_) => {
                    tracing::warn!(gpu = g, "no CUDA driver to bind the granted GPU");
                    None
                }
            }
        })
        .collect()
}

/// The winner's hold on its GPUs while its cell runs.
pub struct Binding {
    /// Primary contexts retained for the cell; dropping releases them.
    _contexts: Vec<Arc<cudarc::driver::CudaContext>>,
}

impl Binding {
    /// For state left on GPUs by an earlier cell, with no context retained now.
    pub fn earlier() -> Self {
        Self {
            _contexts: Vec::new(),
        }
    }

    /// After the cell: device state to host memory, caches emptied. Queued on
    /// the Python thread at once, ahead of anything queued after this call.
    pub fn unbind(self, exec: &Executor) -> impl std::future::Future<Output = ()> + Send + 'static {
        let moved = exec.queue(|_py, k| k.call_method0("gpu_unbind")?.extract::<String>());
        async move {
            match moved.await {
                Ok(report) => tracing::info!(%report, "GPU state moved to host"),
                Err(e) => tracing::warn!("moving GPU state to host failed: {e}"),
            }
            drop(self);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::wanted;

    #[test]
    fn gpus_wanted_by_a_cell() {
        assert_eq!(wanted("%%gpus 2\nx = 1", 0), 2);
        assert_eq!(wanted("  %%gpus   1  \n", 0), 1);
        assert_eq!(wanted("x = 1\n%%gpus 2", 0), 0);
        assert_eq!(wanted("x = 1", 1), 1);
        assert_eq!(wanted("%%gpus lots\n", 1), 1);
        assert_eq!(wanted("", 0), 0);
    }
}
