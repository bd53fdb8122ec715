//! `complete_request` / `complete_reply`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompleteRequest {
    pub code: String,
    pub cursor_pos: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompleteReply {
    pub status: String,
    pub matches: Vec<String>,
    pub cursor_start: i64,
    pub cursor_end: i64,
    #[serde(default)]
    pub metadata: Map<String, Value>,
}
