//! The connection file that Jupyter writes for a kernel.

use std::path::Path;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("cannot read connection file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed connection file {path}: {source}")]
    Parse {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("unsupported transport {0:?} (tcp or ipc)")]
    Transport(String),
}

#[derive(Clone, Deserialize)]
pub struct ConnectionInfo {
    #[serde(default = "default_transport")]
    pub transport: String,
    #[serde(default = "default_ip")]
    pub ip: String,
    pub shell_port: u16,
    pub iopub_port: u16,
    pub stdin_port: u16,
    pub control_port: u16,
    pub hb_port: u16,
    #[serde(default)]
    pub key: String,
    #[serde(default = "default_scheme")]
    pub signature_scheme: String,
    #[serde(default)]
    pub kernel_name: String,
}

impl std::fmt::Debug for ConnectionInfo {
    // Never print the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionInfo")
            .field("transport", &self.transport)
            .field("ip", &self.ip)
            .field("shell_port", &self.shell_port)
            .field("iopub_port", &self.iopub_port)
            .field("stdin_port", &self.stdin_port)
            .field("control_port", &self.control_port)
            .field("hb_port", &self.hb_port)
            .field("signature_scheme", &self.signature_scheme)
            .finish_non_exhaustive()
    }
}

fn default_transport() -> String {
    "tcp".into()
}
fn default_ip() -> String {
    "127.0.0.1".into()
}
fn default_scheme() -> String {
    "hmac-sha256".into()
}

#[derive(Debug, Clone, Copy)]
pub enum Channel {
    Shell,
    Iopub,
    Stdin,
    Control,
    Heartbeat,
}

impl ConnectionInfo {
    pub fn from_file(path: &Path) -> Result<Self, ConnectionError> {
        let text = std::fs::read(path).map_err(|source| ConnectionError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let info: Self =
            serde_json::from_slice(&text).map_err(|source| ConnectionError::Parse {
                path: path.display().to_string(),
                source,
            })?;
        if info.transport != "tcp" && info.transport != "ipc" {
            return Err(ConnectionError::Transport(info.transport));
        }
        Ok(info)
    }

    /// The zmq endpoint for a channel: tcp binds to the file's ip (loopback
    /// by default, never all interfaces unless the file says so); ipc uses
    /// jupyter_client's `{ip}-{port}` path convention.
    pub fn endpoint(&self, channel: Channel) -> String {
        let port = match channel {
            Channel::Shell => self.shell_port,
            Channel::Iopub => self.iopub_port,
            Channel::Stdin => self.stdin_port,
            Channel::Control => self.control_port,
            Channel::Heartbeat => self.hb_port,
        };
        match self.transport.as_str() {
            "ipc" => format!("ipc://{}-{}", self.ip, port),
            _ => format!("tcp://{}:{}", self.ip, port),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_jupyter_client_connection_file() {
        let dir = std::env::temp_dir().join(format!("nbos-conn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("kernel.json");
        std::fs::write(
            &path,
            r#"{"shell_port": 1, "iopub_port": 2, "stdin_port": 3, "control_port": 4,
                "hb_port": 5, "ip": "127.0.0.1", "key": "k", "transport": "tcp",
                "signature_scheme": "hmac-sha256", "kernel_name": "notebookos"}"#,
        )
        .unwrap();
        let info = ConnectionInfo::from_file(&path).unwrap();
        assert_eq!(info.endpoint(Channel::Control), "tcp://127.0.0.1:4");
        assert!(!format!("{info:?}").contains("\"k\""));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_file_is_a_clear_error() {
        let err = ConnectionInfo::from_file(Path::new("/nonexistent/k.json")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/k.json"));
    }
}
