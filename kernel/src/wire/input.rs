//! `input_request` / `input_reply` on stdin.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InputRequest {
    pub prompt: String,
    pub password: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InputReply {
    pub value: String,
}
