//! `interrupt_request` / `interrupt_reply` on control.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InterruptReply {
    pub status: String,
}
