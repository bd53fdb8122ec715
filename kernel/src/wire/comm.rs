//! Comms: `comm_open`, `comm_msg`, `comm_close` (both directions) and
//! `comm_info_request` / `comm_info_reply`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A message of a comm itself (not `comm_info_request`, a request about
/// comms): these may be served while a cell runs.
pub fn is_comm_message(msg_type: &str) -> bool {
    matches!(msg_type, "comm_open" | "comm_msg" | "comm_close")
}

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

#[cfg(test)]
mod tests {
    use super::is_comm_message;

    #[test]
    fn comm_info_is_not_a_comm_message() {
        assert!(is_comm_message("comm_msg") && is_comm_message("comm_open"));
        assert!(!is_comm_message("comm_info_request"));
    }
}
