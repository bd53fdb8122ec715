//! Starting replicas as local processes of this binary (the embedded
//! default, and what an agent does for a cluster: see `remote.rs`).

use std::process::Stdio;

use raft_transport::NodeId;

use super::group::{self, Bootstrap, GroupError, StateDir};

/// A started replica process, as its supervisor sees it.
pub trait ReplicaProcess: Send + Sync {
    fn pid(&self) -> u32;
    /// Whether it still runs.
    fn alive(&self) -> bool;
    /// Stops it (SIGKILL: a replica holds nothing that needs a clean exit).
    fn kill(&self);
    /// The cluster server it runs on; `None`: this machine.
    fn host(&self) -> Option<String> {
        None
    }
}

pub trait Spawner: Send + Sync {
    fn spawn(&self, bootstrap: &Bootstrap) -> Result<Box<dyn ReplicaProcess>, GroupError>;
}

/// Replicas as child processes of this one, in their own session so that
/// Jupyter killing replica 1's process group leaves them to be rejoined.
pub struct LocalSpawner {
    pub state: StateDir,
    pub program: crate::program::Program,
    pub hash_seed: u32,
    /// Added to the replica's environment (an agent points replicas at itself).
    pub env: Vec<(String, String)>,
}

struct LocalProcess {
    pid: u32,
}

impl ReplicaProcess for LocalProcess {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn alive(&self) -> bool {
        // Reaps it if it exited, so a dead child is not a zombie that looks alive.
        let mut status = 0;
        // SAFETY: waitpid on our own child with WNOHANG does not block.
        let r = unsafe { libc::waitpid(self.pid as libc::pid_t, &mut status, libc::WNOHANG) };
        if r == self.pid as libc::pid_t {
            return false;
        }
        group::pid_alive(self.pid)
    }

    fn kill(&self) {
        // SAFETY: plain signal to a pid we started.
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGKILL);
        }
        let mut status = 0;
        // SAFETY: reaping our own child.
        unsafe { libc::waitpid(self.pid as libc::pid_t, &mut status, 0) };
    }
}

/// A replica this process did not start (found in the state of a previous replica 1).
pub struct AdoptedProcess {
    pub pid: u32,
}

impl ReplicaProcess for AdoptedProcess {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn alive(&self) -> bool {
        group::pid_alive(self.pid)
    }

    fn kill(&self) {
        // SAFETY: plain signal.
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGKILL);
        }
    }
}

impl Spawner for LocalSpawner {
    fn spawn(&self, bootstrap: &Bootstrap) -> Result<Box<dyn ReplicaProcess>, GroupError> {
        let file = self.state.bootstrap_file(bootstrap.id);
        let data = serde_json::to_vec(bootstrap).unwrap_or_default();
        group::write_private(&file, &data)?;
        let mut cmd = self.program.command();
        cmd.arg("replica").arg("--bootstrap").arg(&file);
        if let Some(env) = &bootstrap.env {
            cmd.env_clear().envs(env.iter().map(|(k, v)| (k, v)));
            for name in group::PER_HOST_ENV {
                if let Some(value) = std::env::var_os(name) {
                    cmd.env(name, value);
                }
            }
        }
        cmd.env("PYTHONHASHSEED", self.hash_seed.to_string())
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        let library_path = match &bootstrap.env {
            Some(env) => env
                .iter()
                .find(|(k, _)| k == "LD_LIBRARY_PATH")
                .map(|(_, v)| v.into()),
            None => std::env::var_os("LD_LIBRARY_PATH"),
        };
        crate::libpython::for_own_binary(&mut cmd, library_path.as_deref());
        // A server without the directory starts the replica in its own.
        if let Some(cwd) = bootstrap.cwd.as_ref().filter(|d| d.is_dir()) {
            cmd.current_dir(cwd);
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().map_err(|e| {
            GroupError::Start(format!(
                "cannot start replica {} ({}): {e}",
                bootstrap.id, self.program
            ))
        })?;
        tracing::info!(id = bootstrap.id, pid = child.id(), "replica started");
        Ok(Box::new(LocalProcess { pid: child.id() }))
    }
}

/// Waits for a starting replica to publish its address.
pub async fn wait_for_addr(
    state: &StateDir,
    id: NodeId,
    process: &dyn ReplicaProcess,
    timeout: std::time::Duration,
) -> Result<String, GroupError> {
    let file = state.addr_file(id);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Ok(addr) = std::fs::read_to_string(&file) {
            super::group::remove_file(&file);
            return Ok(addr.trim().to_owned());
        }
        if !process.alive() {
            return Err(GroupError::Start(format!(
                "replica {id} exited while starting"
            )));
        }
        if tokio::time::Instant::now() > deadline {
            process.kill();
            return Err(GroupError::Start(format!(
                "replica {id} did not start in {timeout:?}"
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
