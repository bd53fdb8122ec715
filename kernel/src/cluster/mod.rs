//! The cluster: many GPU servers, each running an agent, and the policy
//! that places kernels' replicas on them.
//!
//! * [`policy`]: placement with oversubscription, migration and
//!   autoscaling, as pure functions of a cluster snapshot. The simulator
//!   ([`crate::sim`]) calls the same functions.
//! * [`config`]: `cluster.json`, the servers and the cluster CA.
//! * [`client`]: calls to the agents (QUIC, mutual TLS), and the policy's
//!   snapshot from their inventories.
//! * [`autoscale`]: the live autoscaler (`cluster autoscale`).
//! * [`provider`]: where servers come from (a shell command, or in-process
//!   for the simulator).

pub mod autoscale;
pub mod client;
pub mod config;
pub mod policy;
pub mod provider;
