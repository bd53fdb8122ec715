//! `is_complete_request` / `is_complete_reply`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IsCompleteRequest {
    pub code: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IsCompleteReply {
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub indent: Option<String>,
}
