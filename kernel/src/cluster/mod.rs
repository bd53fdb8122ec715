//! The cluster: many GPU servers, each running an agent, and the policy
//! that places kernels' replicas on them.
//!
//! * [`policy`]: placement with oversubscription, migration and
//!   autoscaling, as pure functions of a cluster snapshot. The simulator
//!   ([`crate::sim`]) calls the same functions.
//! * [`provider`]: where servers come from (a shell command, or in-process
//!   for the simulator).

pub mod policy;
pub mod provider;
