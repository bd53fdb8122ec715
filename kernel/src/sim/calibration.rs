//! The costs the simulator charges, as measured by the live benchmarks.
//!
//! `bench/calibrate.py` reads the latest results of the benches
//! (raft-transport's commit latency, `bench/interactive.py`'s replication
//! times, `bench/gpu_interactive.py`'s offload and restore on the GPU host,
//! the kernel's start-up) and writes this file; `simulate --calibration`
//! reads it. What no bench here can measure (a cloud server's boot) is in
//! the file too, with its source saying it is assumed.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::engine::Costs;
use super::workload::Ms;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    /// When the newest measurement it uses was taken.
    pub date: String,
    /// Where each number comes from, by field name.
    #[serde(default)]
    pub sources: BTreeMap<String, String>,
    pub commit_us: f64,
    pub replica_start_s: f64,
    pub container_start_s: f64,
    pub scale_out_s: f64,
    /// A cell's changes on every peer: fixed part and bulk rate.
    pub delta_fixed_s: f64,
    pub delta_bytes_per_s: f64,
    pub gpu_offload_bytes_per_s: f64,
    pub gpu_restore_bytes_per_s: f64,
    /// The kernel's default cached-grant idle time.
    pub gpu_cache_idle_s: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum CalibrationError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {field} must be a positive number, not {value}")]
    Invalid {
        path: String,
        field: &'static str,
        value: f64,
    },
}

impl Calibration {
    pub fn load(path: &Path) -> Result<Self, CalibrationError> {
        let text = std::fs::read_to_string(path).map_err(|source| CalibrationError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let c: Self = serde_json::from_str(&text).map_err(|source| CalibrationError::Parse {
            path: path.display().to_string(),
            source,
        })?;
        let rates = [
            ("delta_bytes_per_s", c.delta_bytes_per_s),
            ("gpu_offload_bytes_per_s", c.gpu_offload_bytes_per_s),
            ("gpu_restore_bytes_per_s", c.gpu_restore_bytes_per_s),
        ];
        let times = [
            ("commit_us", c.commit_us),
            ("replica_start_s", c.replica_start_s),
            ("container_start_s", c.container_start_s),
            ("scale_out_s", c.scale_out_s),
            ("delta_fixed_s", c.delta_fixed_s),
            ("gpu_cache_idle_s", c.gpu_cache_idle_s),
        ];
        let bad = rates
            .iter()
            .find(|(_, v)| !(v.is_finite() && *v > 0.0))
            .or_else(|| times.iter().find(|(_, v)| !(v.is_finite() && *v >= 0.0)));
        if let Some(&(field, value)) = bad {
            return Err(CalibrationError::Invalid {
                path: path.display().to_string(),
                field,
                value,
            });
        }
        Ok(c)
    }

    /// The engine's costs: these numbers over the defaults (the autoscaler's
    /// period is the policy's, not a measurement).
    pub fn costs(&self) -> Costs {
        let ms = |s: f64| (s * 1000.0).round() as Ms;
        Costs {
            scale_out_delay: ms(self.scale_out_s),
            commit_us: self.commit_us.round() as u64,
            replica_start: ms(self.replica_start_s),
            container_start: ms(self.container_start_s),
            delta_fixed_us: (self.delta_fixed_s * 1e6).round() as u64,
            delta_bytes_per_s: self.delta_bytes_per_s,
            offload_bytes_per_s: self.gpu_offload_bytes_per_s,
            restore_bytes_per_s: self.gpu_restore_bytes_per_s,
            cache_idle: ms(self.gpu_cache_idle_s),
            ..Costs::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("nbos-cal-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("calibration.json");
        std::fs::write(&path, text).unwrap();
        path
    }

    const GOOD: &str = r#"{
        "date": "2026-12-05",
        "sources": {"commit_us": "raft bench"},
        "commit_us": 308.4, "replica_start_s": 0.28, "container_start_s": 5,
        "scale_out_s": 90, "delta_fixed_s": 0.016, "delta_bytes_per_s": 1.5e8,
        "gpu_offload_bytes_per_s": 6.7e10, "gpu_restore_bytes_per_s": 4.0e10,
        "gpu_cache_idle_s": 600
    }"#;

    #[test]
    fn a_calibration_becomes_the_engines_costs() {
        let c = Calibration::load(&write("good", GOOD)).unwrap();
        let costs = c.costs();
        assert_eq!(costs.commit_us, 308);
        assert_eq!(costs.replica_start, 280);
        assert_eq!(costs.scale_out_delay, 90_000);
        assert_eq!(costs.cache_idle, 600_000);
        // 16 ms fixed plus 1.5 GB at 0.15 GB/s.
        assert_eq!(costs.delta_ms(1_500_000_000), 16 + 10_000);
        assert_eq!(costs.offload_ms(67_000_000_000, 1), 1000);
        assert_eq!(costs.offload_ms(67_000_000_000, 4), 250, "one link per GPU");
        assert_eq!(costs.autoscale_every, Costs::default().autoscale_every);
    }

    #[test]
    fn missing_unknown_or_nonsense_numbers_are_refused_by_name() {
        let missing = GOOD.replace(r#""commit_us": 308.4,"#, "");
        let err = Calibration::load(&write("missing", &missing)).unwrap_err();
        assert!(err.to_string().contains("commit_us"), "{err}");
        let unknown = GOOD.replace(r#""date""#, r#""typo": 1, "date""#);
        let err = Calibration::load(&write("unknown", &unknown)).unwrap_err();
        assert!(err.to_string().contains("typo"), "{err}");
        let zero = GOOD.replace("1.5e8", "0");
        let err = Calibration::load(&write("zero", &zero)).unwrap_err();
        assert!(err.to_string().contains("delta_bytes_per_s"), "{err}");
    }
}
