//! `notebookos_steer_request` on control: which replicas must yield every
//! cell, as if their host had no free GPU. Tests and drills use it to choose
//! where the next cell runs; it goes through the Raft log, so every replica
//! sees it before any later cell. Signed like every message, so only a client
//! holding the connection key can send it.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SteerRequest {
    /// Replica ids that yield; empty: none.
    #[serde(rename = "yield")]
    pub yielding: Vec<u64>,
}
