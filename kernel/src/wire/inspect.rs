//! `inspect_request` / `inspect_reply` (the `?`/shift-tab help).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InspectRequest {
    pub code: String,
    pub cursor_pos: Option<i64>,
    #[serde(default)]
    pub detail_level: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InspectReply {
    pub status: String,
    pub found: bool,
    #[serde(default)]
    pub data: Map<String, Value>,
    #[serde(default)]
    pub metadata: Map<String, Value>,
}
