//! `notebookos_sync_request` on control: answered once every replica has
//! every earlier cell's namespace changes (cells reply before their changes
//! are replicated). Drills and tests send it before killing a replica that
//! should lose nothing; a user can send it before a planned restart.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncRequest {
    /// How long to wait, in seconds (default 600).
    #[serde(default)]
    pub timeout: Option<f64>,
}
