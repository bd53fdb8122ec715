//! `notebookos-kernel simulate`: replays a workload of notebook sessions
//! through the cluster policy and the election code the live kernel uses,
//! and through the baselines, with modelled costs.
//!
//! * [`workload`]: sessions and cells from the traces or a generator.
//! * [`engine`]: the discrete-event engine, one run per [`Mode`].
//! * [`report`]: the table, the CSVs the plots are drawn from, the JSON.
//! * [`calibration`]: the costs, from the live benchmarks' results.

pub mod calibration;
pub mod engine;
pub mod report;
mod rng;
pub mod workload;

pub use engine::{Costs, Engine, Mode, Outcome};

use crate::cluster::policy::Policy;

/// Runs every mode on the same workload with the same seed.
pub fn run(
    workload: &workload::Workload,
    modes: &[Mode],
    policy: &Policy,
    costs: &Costs,
    seed: u64,
) -> Vec<Outcome> {
    modes
        .iter()
        .map(|&mode| Engine::new(workload, mode, policy, costs.clone(), seed).run())
        .collect()
}
