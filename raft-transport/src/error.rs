//! Errors at the crate boundary.

use crate::types::NodeId;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Certificate and TLS configuration failures.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("rustls configuration failed: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("invalid PEM: {0}")]
    Pem(String),
    #[error("unsupported public key: {0}")]
    PublicKey(String),
}

/// Everything that [`crate::ReplicaNode`] and its helpers can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("this replica is not the leader (leader: {leader:?})")]
    NotLeader {
        leader: Option<NodeId>,
        leader_addr: Option<String>,
    },
    #[error("peer {0} is not a known member")]
    UnknownPeer(NodeId),
    #[error("cannot reach peer {peer}: {reason}")]
    Unreachable { peer: NodeId, reason: String },
    #[error("peer {peer} violated the protocol: {reason}")]
    Protocol { peer: NodeId, reason: String },
    #[error("blob {0} not found")]
    BlobNotFound(crate::BlobHash),
    #[error("blob content does not match its hash")]
    BlobHashMismatch,
    #[error("blob of {size} bytes exceeds the limit of {limit} bytes")]
    BlobTooLarge { size: u64, limit: u64 },
    #[error("raft: {0}")]
    Raft(String),
    #[error("storage: {0}")]
    Storage(String),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
    #[error("replica is shut down")]
    Shutdown,
    #[error("cannot encode an entry: {0}")]
    Encode(String),
}
