//! Raft over QUIC between the replicas of one notebookos kernel.
