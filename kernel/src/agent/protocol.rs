//! The agent's socket protocol: one JSON object per line each way.

use serde::{Deserialize, Serialize};

use super::grants::{Grant, GrantId, Usage};
use super::inventory::Gpu;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// `gpus` GPUs for a cell of `kernel` on `replica`, held while renewed.
    Grant {
        kernel: String,
        replica: u64,
        gpus: u32,
        lease_ms: u64,
    },
    Renew {
        id: GrantId,
    },
    /// The cell ended (it ran `used_ms`); the holder keeps its state on the
    /// GPUs, revocably, for its next cell.
    Cache {
        id: GrantId,
        used_ms: u64,
    },
    /// `used_ms`: how long its last cell ran on it (0 when the election was
    /// lost); `moving_ms`: how long moving state off it took.
    Release {
        id: GrantId,
        used_ms: u64,
        #[serde(default)]
        moving_ms: u64,
    },
    Status,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Granted {
        id: GrantId,
        gpus: Vec<u32>,
        fake: bool,
    },
    Refused {
        reason: String,
        /// Cached grants of others are being revoked for this request: ask again soon.
        #[serde(default)]
        reclaiming: bool,
    },
    Ok,
    /// A renewal: another replica needs these GPUs; move the state off and release.
    Revoked,
    Error {
        message: String,
    },
    Status(Status),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub gpus: Vec<Gpu>,
    pub fake: bool,
    pub grants: Vec<GrantView>,
    pub usage: std::collections::BTreeMap<String, UsageView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrantView {
    pub id: GrantId,
    pub kernel: String,
    pub replica: u64,
    pub gpus: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageView {
    pub held_gpu_seconds: f64,
    pub used_gpu_seconds: f64,
    #[serde(default)]
    pub cached_gpu_seconds: f64,
    #[serde(default)]
    pub moving_gpu_seconds: f64,
    pub grants: u64,
    #[serde(default)]
    pub reused: u64,
    #[serde(default)]
    pub revoked: u64,
    pub expired: u64,
}

impl From<Grant> for GrantView {
    fn from(g: Grant) -> Self {
        Self {
            id: g.id,
            kernel: g.kernel,
            replica: g.replica,
            gpus: g.gpus,
        }
    }
}

impl From<&Usage> for UsageView {
    fn from(u: &Usage) -> Self {
        Self {
            held_gpu_seconds: u.held_gpu_seconds,
            used_gpu_seconds: u.used_gpu_seconds,
            cached_gpu_seconds: u.cached_gpu_seconds,
            moving_gpu_seconds: u.moving_gpu_seconds,
            grants: u.grants,
            reused: u.reused,
            revoked: u.revoked,
            expired: u.expired,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_tagged_json() {
        let r: Request = serde_json::from_str(
            r#"{"op":"grant","kernel":"k","replica":2,"gpus":1,"lease_ms":500}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            Request::Grant {
                kernel: "k".into(),
                replica: 2,
                gpus: 1,
                lease_ms: 500
            }
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"format_disk"}"#).is_err());
        let s = serde_json::to_string(&Response::Granted {
            id: 1,
            gpus: vec![0],
            fake: true,
        })
        .unwrap();
        assert_eq!(s, r#"{"granted":{"id":1,"gpus":[0],"fake":true}}"#);
    }
}
