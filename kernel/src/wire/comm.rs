//! Comms: `comm_open`, `comm_msg`, `comm_close` (both directions) and
//! `comm_info_request` / `comm_info_reply`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommOpen {
    pub comm_id: String,
    pub target_name: String,
    #[serde(default)]
    pub data: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_module: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommMsg {
    pub comm_id: String,
    #[serde(default)]
    pub data: Value,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommClose {
    pub comm_id: String,
    #[serde(default)]
    pub data: Value,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommInfoRequest {
    #[serde(default)]
    pub target_name: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommInfoReply {
    pub status: String,
    /// comm_id -> {"target_name": ...}
    pub comms: Map<String, Value>,
}
