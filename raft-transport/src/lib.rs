//! Raft over QUIC between the replicas of one notebookos kernel.
//!
//! The crate gives the replicas of one kernel two things:
//!
//! * a consensus log of application entries, driven by
//!   [openraft](https://docs.rs/openraft/0.9) and exposed through [`ReplicaNode`], applied
//!   in order by the application's own [`Application`], whose state is the snapshot;
//! * a bulk data channel for large, content-addressed blobs ([`ReplicaNode::send_blob`]).
//!
//! Every pair of replicas shares one QUIC connection, authenticated with mutual TLS:
//! each replica presents a certificate signed by the kernel's own CA ([`tls::KernelCa`]),
//! and anything else is refused during the handshake. Each Raft RPC and each blob uses its
//! own QUIC stream, so a heartbeat never queues behind a blob.
//!
//! Module map, one job each:
//! * [`tls`]: kernel CA, node certificates, rustls configs that only trust the kernel CA.
//! * [`config`]: tuning knobs (election timeouts, keep-alive, flow-control windows).
//! * `connection`: the quinn endpoint, one cached connection per peer, reconnects.
//! * `rpc`: the wire format of the streams (a tiny typed header + postcard body).
//! * `network`: openraft's `RaftNetworkFactory`/`RaftNetwork` over the connections.
//! * `server`: accepts connections/streams and dispatches them to Raft, the blob store, or
//!   (for proposals forwarded by followers) the leader's Raft.
//! * `socket`: the UDP socket under the endpoint, which says when it is closed.
//! * [`bulk`]: content-addressed blob store and the blob stream protocol.
//! * [`shm`]: sealed shared-memory blobs, which peers on the same host map instead of
//!   receiving a copy.
//! * [`log_store`]: in-memory Raft log with an optional append-only file.
//! * [`state_machine`]: openraft's state machine over the [`Application`], snapshots.
//! * [`node`]: the [`ReplicaNode`] façade used by the kernel.

pub mod bulk;
pub mod config;
mod connection;
pub mod control;
pub mod error;
pub mod log_store;
pub mod mailbox;
mod network;
pub mod node;
mod rpc;
mod server;
pub mod shm;
mod socket;
pub mod state_machine;
pub mod tls;
pub mod types;

pub use bulk::BlobHash;
pub use config::{ReplicaConfig, TransportTuning};
pub use error::{Error, Result, TlsError};
pub use mailbox::{Message, Receipt};
pub use node::{PendingProposal, Proposed, ReplicaMetrics, ReplicaNode, ServerState};
/// The openraft version this crate is built on, for callers that need its types.
pub use openraft;
#[doc(hidden)]
pub use rpc::{decode_request, WireError};
pub use state_machine::{Application, CommittedEntries, CommittedEntry, Journal};
pub use tls::{KernelCa, NodeIdentity, NodeKey, NodePublicKey};
pub use types::{NodeId, TypeConfig};
