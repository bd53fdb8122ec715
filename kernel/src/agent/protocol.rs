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
    /// `used_ms`: how long a cell ran on it (0 when the election was lost).
    Release {
        id: GrantId,
        used_ms: u64,
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
    },
    Ok,
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
    pub grants: u64,
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
            grants: u.grants,
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
