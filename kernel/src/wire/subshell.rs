//! Kernel subshells (JEP 91): `create_subshell`, `delete_subshell` and
//! `list_subshell` on control. A shell request whose header carries a
//! `subshell_id` runs on that subshell, concurrently with the main shell.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateSubshellReply {
    pub status: String,
    pub subshell_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeleteSubshellRequest {
    pub subshell_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListSubshellReply {
    pub status: String,
    pub subshell_id: Vec<String>,
}
