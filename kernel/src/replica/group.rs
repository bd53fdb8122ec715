//! What a kernel's replica group keeps on disk, so that a replica 1 restarted
//! by Jupyter finds its surviving peers: the kernel CA, the members and who
//! faces Jupyter. One directory per connection file, mode 0700, files 0600.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use raft_transport::NodeId;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error("replica state {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("replica state {path} is unreadable: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Tls(#[from] raft_transport::TlsError),
    #[error(transparent)]
    Transport(#[from] raft_transport::Error),
    #[error("{0}")]
    Start(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> GroupError + '_ {
    move |source| GroupError::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Member {
    pub id: NodeId,
    pub addr: String,
    pub pid: u32,
    /// The cluster server it runs on; absent: the front's machine.
    #[serde(default)]
    pub host: Option<String>,
}

impl Member {
    /// Whether it may still run: a local pid that exists, or a replica on
    /// another server (its agent will say).
    pub fn may_be_alive(&self) -> bool {
        self.host.is_some() || pid_alive(self.pid)
    }
}

/// `group.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupState {
    pub kernel_id: String,
    /// The kernel CA (certificate and key).
    pub ca_pem: String,
    /// Every replica's Python uses this hash seed, so sets and dicts of
    /// strings iterate alike everywhere.
    pub hash_seed: u32,
    /// The replica facing Jupyter.
    pub front: NodeId,
    pub members: Vec<Member>,
    /// Replica ids are never reused.
    pub next_id: NodeId,
}

/// What the front hands a replica it starts (read once, then deleted).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bootstrap {
    pub id: NodeId,
    pub kernel_id: String,
    pub identity_pem: String,
    pub front: NodeId,
    /// Joins a running group (needs a checkpoint) rather than forming a new one.
    pub joining: bool,
    /// Where to write our address once listening.
    pub addr_file: PathBuf,
    /// IPython options, as the front got them.
    pub argv: Vec<String>,
    pub listen: String,
    /// The front's working directory and environment when the kernel started
    /// (what a cell changes later travels with the namespace), so that a
    /// replica on any server starts where replica 1 did. `None`: the
    /// spawner's own.
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    #[serde(default)]
    pub env: Option<Vec<(String, String)>>,
}

/// Variables that describe the server a process runs on, not the kernel:
/// each replica keeps its own.
pub const PER_HOST_ENV: &[&str] = &[
    "NOTEBOOKOS_AGENT_SOCKET",
    "CUDA_VISIBLE_DEVICES",
    crate::libpython::DIR_VAR,
];

/// This process's working directory and environment, less [`PER_HOST_ENV`]
/// (and variables that are not UTF-8, which no Python code could have set).
pub fn launch_context() -> (Option<PathBuf>, Option<Vec<(String, String)>>) {
    let env = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| !PER_HOST_ENV.contains(&k.as_str()))
        .collect();
    (std::env::current_dir().ok(), Some(env))
}

/// The directory for one connection file's replica group.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub path: PathBuf,
}

impl StateDir {
    /// `$NOTEBOOKOS_STATE_DIR`, else `$XDG_RUNTIME_DIR/notebookos`, else
    /// `/tmp/notebookos-<uid>`; then a name derived from the connection file.
    pub fn for_connection(connection_file: &Path) -> Result<Self, GroupError> {
        let base = match std::env::var_os("NOTEBOOKOS_STATE_DIR") {
            Some(d) => PathBuf::from(d),
            None => match std::env::var_os("XDG_RUNTIME_DIR") {
                Some(d) => PathBuf::from(d).join("notebookos"),
                // SAFETY: getuid has no preconditions.
                None => {
                    std::env::temp_dir().join(format!("notebookos-{}", unsafe { libc::getuid() }))
                }
            },
        };
        let abs =
            std::fs::canonicalize(connection_file).unwrap_or_else(|_| connection_file.to_owned());
        let digest = Sha256::digest(abs.to_string_lossy().as_bytes());
        let name: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        Self::private(base.join(name))
    }

    /// `path` as a private state directory (created 0700, or tightened).
    pub fn private(path: PathBuf) -> Result<Self, GroupError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&path)
            .map_err(io(&path))?;
        // An existing directory may have been created with a laxer umask.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
            .map_err(io(&path))?;
        Ok(Self { path })
    }

    fn group_file(&self) -> PathBuf {
        self.path.join("group.json")
    }

    pub fn load(&self) -> Result<Option<GroupState>, GroupError> {
        let path = self.group_file();
        match std::fs::read(&path) {
            Ok(data) => serde_json::from_slice(&data)
                .map(Some)
                .map_err(|source| GroupError::Json { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    pub fn save(&self, state: &GroupState) -> Result<(), GroupError> {
        let data = serde_json::to_vec_pretty(state).unwrap_or_default();
        write_private(&self.group_file(), &data)
    }

    pub fn bootstrap_file(&self, id: NodeId) -> PathBuf {
        self.path.join(format!("replica-{id}.bootstrap.json"))
    }

    pub fn addr_file(&self, id: NodeId) -> PathBuf {
        self.path.join(format!("replica-{id}.addr"))
    }

    /// A clean shutdown leaves nothing behind.
    pub fn remove(&self) {
        match std::fs::remove_dir_all(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(dir = %self.path.display(), "cannot remove replica state: {e}")
            }
        }
    }
}

/// Deletes `path` if it is there; a failure is logged, since what stays
/// behind may be a secret (a bootstrap's private key) or stale state.
pub fn remove_file(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(file = %path.display(), "cannot remove: {e}"),
    }
}

/// Writes a 0600 file atomically (temporary file, then rename).
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), GroupError> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(data).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Reads and deletes a replica's bootstrap file (it holds a private key).
pub fn take_bootstrap(path: &Path) -> Result<Bootstrap, GroupError> {
    let data = std::fs::read(path).map_err(io(path))?;
    remove_file(path);
    serde_json::from_slice(&data).map_err(|source| GroupError::Json {
        path: path.to_owned(),
        source,
    })
}

/// True if a process with this pid exists (local replicas only).
pub fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks for existence and permission.
    if unsafe { libc::kill(pid, 0) } != 0 {
        return false;
    }
    // A process that exited but whose parent has not reaped it yet is gone too.
    !is_zombie(pid)
}

fn is_zombie(pid: libc::pid_t) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // `pid (comm) state ...`; comm may itself contain ") ".
    stat.rsplit_once(") ")
        .is_some_and(|(_, rest)| rest.starts_with('Z'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_zombie_is_not_alive() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Exited, not yet reaped.
        while !is_zombie(pid as libc::pid_t) {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(!pid_alive(pid));
        child.wait().unwrap();
        assert!(pid_alive(std::process::id()));
    }

    #[test]
    fn state_is_private_and_round_trips() {
        let dir = std::env::temp_dir().join(format!("nbos-group-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sd = StateDir { path: dir.clone() };
        assert!(sd.load().unwrap().is_none());
        let st = GroupState {
            kernel_id: "k".into(),
            ca_pem: "pem".into(),
            hash_seed: 7,
            front: 1,
            members: vec![Member {
                id: 1,
                addr: "127.0.0.1:1".into(),
                pid: 1,
                host: None,
            }],
            next_id: 4,
        };
        sd.save(&st).unwrap();
        let back = sd.load().unwrap().unwrap();
        assert_eq!(back.members, st.members);
        assert_eq!(
            std::fs::metadata(dir.join("group.json")).unwrap().mode() & 0o777,
            0o600
        );
        std::fs::write(dir.join("group.json"), b"{not json").unwrap();
        assert!(matches!(sd.load(), Err(GroupError::Json { .. })));
        sd.remove();
        assert!(!dir.exists());
    }
}
