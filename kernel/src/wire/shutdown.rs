//! `shutdown_request` / `shutdown_reply` (shell or control).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShutdownRequest {
    #[serde(default)]
    pub restart: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShutdownReply {
    pub status: String,
    pub restart: bool,
}
