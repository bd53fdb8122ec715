//! The openraft type configuration of a kernel's replica group.

/// Replica ids are small integers chosen by the kernel (e.g. 1, 2, 3).
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// Raft types: opaque application bytes in, the applied log index out.
    pub TypeConfig:
        D = Vec<u8>,
        R = u64,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        // With `generic-snapshot-data` a snapshot is whatever we say it is; we ship it as
        // one byte string on its own QUIC stream instead of openraft's chunked RPC.
        SnapshotData = Vec<u8>,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, openraft::BasicNode>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
pub type StoredMembership = openraft::StoredMembership<NodeId, openraft::BasicNode>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type RaftMetrics = openraft::RaftMetrics<NodeId, openraft::BasicNode>;
