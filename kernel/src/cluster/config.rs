//! `cluster.json`: the GPU servers (each runs an agent), the cluster CA,
//! and the policy's knobs.
//!
//! ```json
//! {
//!   "ca": "/etc/notebookos/cluster-ca.pem",
//!   "servers": [
//!     {"name": "gpu-a", "agent": "10.0.0.1:7400"},
//!     {"name": "gpu-b", "agent": "10.0.0.2:7400"}
//!   ],
//!   "subscription_ratio": 7.0
//! }
//! ```
//!
//! The CA file (`notebookos-kernel cluster-ca FILE` makes one) holds the CA
//! certificate and key; every agent and kernel of the cluster issues its own
//! certificate from it, so it is the cluster's secret: mode 0600.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use raft_transport::{KernelCa, NodeId, NodeIdentity};
use serde::Deserialize;

use super::policy::Policy;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cluster config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cluster config {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cluster config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("cluster CA {path}: {message}")]
    Ca { path: PathBuf, message: String },
    #[error("no server named {0:?} in the cluster config")]
    UnknownServer(String),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerEntry {
    pub name: String,
    /// Where its agent serves the control protocol (QUIC).
    pub agent: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub ca: PathBuf,
    pub servers: Vec<ServerEntry>,
    #[serde(default)]
    pub subscription_ratio: Option<f64>,
    #[serde(default)]
    pub replicas: Option<usize>,
    /// How long a new kernel whose replicas find no server with room waits
    /// for the autoscaler to add servers before it runs alone (default
    /// [`DEFAULT_PLACE_WAIT_S`]; 0 for a cluster that is never scaled).
    #[serde(default)]
    pub place_wait_s: Option<u64>,
}

/// Servers take about 90 s to come (`docs/simulator.md`), and the autoscaler
/// asks within a round of hearing of the kernel.
pub const DEFAULT_PLACE_WAIT_S: u64 = 180;

/// The certificate id of whoever calls agents (kernels, the autoscaler);
/// agents check only that a caller's certificate is the cluster's.
pub const CALLER_ID: NodeId = 0;

impl ClusterConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config: Self =
            serde_json::from_str(&text).map_err(|source| ConfigError::Parse {
                path: path.to_owned(),
                source,
            })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        if config.servers.is_empty() {
            return Err(invalid("no servers".into()));
        }
        let mut names: Vec<&str> = config.servers.iter().map(|s| s.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(invalid(format!("server {:?} is listed twice", w[0])));
        }
        if config.ca.is_relative() {
            if let Some(dir) = path.parent() {
                config.ca = dir.join(&config.ca);
            }
        }
        Ok(config)
    }

    /// The server's certificate id: its position in the list, from 1.
    pub fn server_id(&self, name: &str) -> Result<NodeId, ConfigError> {
        self.servers
            .iter()
            .position(|s| s.name == name)
            .map(|i| i as NodeId + 1)
            .ok_or_else(|| ConfigError::UnknownServer(name.to_owned()))
    }

    pub fn server(&self, name: &str) -> Result<&ServerEntry, ConfigError> {
        self.servers
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| ConfigError::UnknownServer(name.to_owned()))
    }

    pub fn ca(&self) -> Result<KernelCa, ConfigError> {
        let ca_err = |message: String| ConfigError::Ca {
            path: self.ca.clone(),
            message,
        };
        let pem = std::fs::read_to_string(&self.ca).map_err(|e| ca_err(e.to_string()))?;
        KernelCa::from_pem("notebookos-cluster", &pem).map_err(|e| ca_err(e.to_string()))
    }

    /// An identity for `id`, issued by the cluster CA.
    pub fn identity(&self, id: NodeId) -> Result<NodeIdentity, ConfigError> {
        self.ca()?.issue_identity(id).map_err(|e| ConfigError::Ca {
            path: self.ca.clone(),
            message: e.to_string(),
        })
    }

    /// A config of no servers that issues identities from the CA at `ca`:
    /// for an agent whose address is known only once it is bound.
    pub fn of_ca(ca: PathBuf) -> Self {
        Self {
            ca,
            servers: Vec::new(),
            subscription_ratio: None,
            replicas: None,
            place_wait_s: None,
        }
    }

    pub fn place_wait(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.place_wait_s.unwrap_or(DEFAULT_PLACE_WAIT_S))
    }

    /// The shared policy with this cluster's overrides.
    pub fn policy(&self) -> Policy {
        let mut p = Policy::default();
        if let Some(r) = self.subscription_ratio {
            p.subscription_ratio = r;
        }
        if let Some(n) = self.replicas {
            p.replicas = n;
        }
        p
    }
}

/// Writes a new cluster CA (certificate and key) to `path`, mode 0600.
pub fn write_new_ca(path: &Path) -> Result<(), ConfigError> {
    let ca = KernelCa::generate("notebookos-cluster").map_err(|e| ConfigError::Ca {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    crate::replica::group::write_private(path, ca.to_pem().as_bytes()).map_err(|e| {
        ConfigError::Ca {
            path: path.to_owned(),
            message: e.to_string(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("nbos-cluster-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn loads_servers_ca_and_policy() {
        let dir = scratch("ok");
        write_new_ca(&dir.join("ca.pem")).unwrap();
        assert_eq!(
            std::fs::metadata(dir.join("ca.pem")).unwrap().mode() & 0o777,
            0o600
        );
        std::fs::write(
            dir.join("cluster.json"),
            r#"{"ca": "ca.pem", "subscription_ratio": 3,
                "servers": [{"name": "a", "agent": "10.0.0.1:7400"},
                            {"name": "b", "agent": "10.0.0.2:7400"}]}"#,
        )
        .unwrap();
        let c = ClusterConfig::load(&dir.join("cluster.json")).unwrap();
        assert_eq!(c.ca, dir.join("ca.pem"));
        assert_eq!(c.server_id("b").unwrap(), 2);
        assert!(matches!(
            c.server_id("z"),
            Err(ConfigError::UnknownServer(_))
        ));
        assert_eq!(c.policy().subscription_ratio, 3.0);
        c.identity(c.server_id("a").unwrap()).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let dir = scratch("bad");
        let path = dir.join("cluster.json");
        for (text, want) in [
            (r#"{"ca": "x", "servers": []}"#, "no servers"),
            (
                r#"{"ca": "x", "servers": [{"name": "a", "agent": "1.2.3.4:1"}, {"name": "a", "agent": "1.2.3.5:1"}]}"#,
                "listed twice",
            ),
            (
                r#"{"ca": "x", "servers": [{"name": "a", "agent": "nowhere"}]}"#,
                "invalid socket address",
            ),
            (r#"{"ca": "x", "servers": [], "typo": 1}"#, "unknown field"),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = ClusterConfig::load(&path).unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
