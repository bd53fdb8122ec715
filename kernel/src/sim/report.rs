//! What a simulation run reports: a table, CSVs for the plots, JSON.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use serde::Serialize;

use super::engine::{Delay, Outcome};
use super::workload::{Ms, Workload, MINUTE, SECOND};

const HOUR_MS: f64 = 3_600_000.0;

/// One row of the table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub mode: String,
    pub cells: usize,
    pub gpu_hours_provisioned: f64,
    pub gpu_hours_held: f64,
    pub gpu_hours_used: f64,
    /// Held between cells with a session's GPU state on them.
    pub gpu_hours_cached: f64,
    /// Held while GPU state moved on or off.
    pub gpu_hours_moving: f64,
    /// Provisioned GPU-hours saved against Reservation's, in percent.
    pub savings_vs_reservation_pct: Option<f64>,
    pub gpu_hours_saved: Option<f64>,
    /// Against the GPU-hours Reservation's sessions held (its ideal, with
    /// no spare or fragmented server), in percent.
    pub savings_vs_reserved_pct: Option<f64>,
    /// GPU-hours saved against Reservation as a share of what the oracle
    /// saves, in percent.
    pub share_of_oracle_savings_pct: Option<f64>,
    /// Cells that started within 1 s of submission, in percent.
    pub started_within_1s_pct: f64,
    pub delay_p50_s: f64,
    pub delay_p95_s: f64,
    pub delay_p99_s: f64,
    pub delay_max_s: f64,
    /// Of the cells that waited 1 s or more: how many, and the seconds
    /// each cause added over all of them.
    pub tail_cells: usize,
    pub tail: TailCauses,
    pub cache_hits: usize,
    pub revocations: usize,
    pub migrations: usize,
    pub rebalance_moves: usize,
    pub servers_added: usize,
    pub servers_removed: usize,
    pub drain_moves: usize,
    pub peak_servers: usize,
}

/// Seconds of delay by cause, summed over the cells of the tail.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TailCauses {
    pub election_s: f64,
    pub sync_s: f64,
    pub reclaim_s: f64,
    pub restore_s: f64,
    pub queued_s: f64,
    pub migration_s: f64,
}

impl TailCauses {
    fn of(delays: &[Delay]) -> Self {
        let s = |f: fn(&Delay) -> Ms| delays.iter().map(f).sum::<Ms>() as f64 / 1e3;
        Self {
            election_s: s(|d| d.election),
            sync_s: s(|d| d.sync),
            reclaim_s: s(|d| d.reclaim),
            restore_s: s(|d| d.restore),
            queued_s: s(|d| d.queued),
            migration_s: s(|d| d.migration),
        }
    }

    fn line(&self) -> String {
        let parts = [
            ("queued (every replica yielded)", self.queued_s),
            (
                "a migrated replica's (or a container's) start and state load",
                self.migration_s,
            ),
            (
                "waiting for the newest state (last cell's changes, a moved replica's checkpoint)",
                self.sync_s,
            ),
            ("reclaiming cached GPUs", self.reclaim_s),
            ("restoring GPU state", self.restore_s),
            ("election", self.election_s),
        ];
        let total: f64 = parts.iter().map(|p| p.1).sum();
        if total == 0.0 {
            return "none".into();
        }
        parts
            .iter()
            .filter(|p| p.1 > 0.0)
            .map(|(what, secs)| format!("{what} {:.0}%", 100.0 * secs / total))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

pub fn percentile(sorted: &[Ms], p: f64) -> Ms {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

pub fn summarize(outcomes: &[Outcome]) -> Vec<Summary> {
    let reservation_run = outcomes.iter().find(|o| o.mode == "Reservation");
    let reservation = reservation_run.map(|o| o.provisioned_gpu_ms as f64 / HOUR_MS);
    let reserved = reservation_run.map(|o| o.held_gpu_ms as f64 / HOUR_MS);
    let oracle_saved = outcomes
        .iter()
        .find(|o| o.mode == "oracle")
        .zip(reservation)
        .map(|(o, r)| r - o.provisioned_gpu_ms as f64 / HOUR_MS);
    outcomes
        .iter()
        .map(|o| {
            let mut d: Vec<Ms> = o.delays.iter().map(Delay::total).collect();
            d.sort_unstable();
            let tail: Vec<Delay> = o
                .delays
                .iter()
                .filter(|x| x.total() >= SECOND)
                .copied()
                .collect();
            let provisioned = o.provisioned_gpu_ms as f64 / HOUR_MS;
            let within = d.iter().filter(|&&x| x < SECOND).count();
            Summary {
                mode: o.mode.clone(),
                cells: o.cells,
                gpu_hours_provisioned: provisioned,
                gpu_hours_held: o.held_gpu_ms as f64 / HOUR_MS,
                gpu_hours_used: o.used_gpu_ms as f64 / HOUR_MS,
                gpu_hours_cached: o.cached_gpu_ms as f64 / HOUR_MS,
                gpu_hours_moving: o.moving_gpu_ms as f64 / HOUR_MS,
                savings_vs_reservation_pct: reservation
                    .filter(|r| *r > 0.0)
                    .map(|r| 100.0 * (r - provisioned) / r),
                gpu_hours_saved: reservation.map(|r| r - provisioned),
                savings_vs_reserved_pct: reserved
                    .filter(|r| *r > 0.0)
                    .map(|r| 100.0 * (r - provisioned) / r),
                share_of_oracle_savings_pct: oracle_saved
                    .zip(reservation)
                    .filter(|(o, _)| *o > 0.0)
                    .map(|(o, r)| 100.0 * (r - provisioned) / o),
                started_within_1s_pct: if d.is_empty() {
                    100.0
                } else {
                    100.0 * within as f64 / d.len() as f64
                },
                delay_p50_s: percentile(&d, 0.50) as f64 / 1e3,
                delay_p95_s: percentile(&d, 0.95) as f64 / 1e3,
                delay_p99_s: percentile(&d, 0.99) as f64 / 1e3,
                delay_max_s: d.last().copied().unwrap_or(0) as f64 / 1e3,
                tail_cells: tail.len(),
                tail: TailCauses::of(&tail),
                cache_hits: o.cache_hits,
                revocations: o.revocations,
                migrations: o.migrations,
                rebalance_moves: o.rebalance_moves,
                servers_added: o.servers_added,
                servers_removed: o.servers_removed,
                drain_moves: o.drain_moves,
                peak_servers: o.peak_servers,
            }
        })
        .collect()
}

/// The Markdown table the bench prints and the README quotes.
pub fn table(workload: &Workload, rows: &[Summary]) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "Workload: {} ({} sessions, {} cells)\n",
        workload.name,
        workload.sessions.len(),
        workload.cells()
    );
    t.push_str(
        "| mode | GPU-h provisioned | GPU-h held (cached, moving) | GPU-h used | saved vs Reservation | \
         share of the oracle's saving | cells started < 1 s | delay p50 | p95 | p99 | max | \
         migrations (ahead of cells) | servers added / removed | peak servers |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let saved = match (r.savings_vs_reservation_pct, r.gpu_hours_saved) {
            (Some(p), Some(h)) => format!("{h:.1} GPU-h ({p:.1}%)"),
            _ => "n/a".into(),
        };
        let of_oracle = r
            .share_of_oracle_savings_pct
            .map_or("n/a".into(), |p| format!("{p:.1}%"));
        let _ = writeln!(
            t,
            "| {} | {:.1} | {:.1} ({:.1}, {:.1}) | {:.1} | {} | {} | {:.2}% | {} | {} | {} | {} | {} ({}) | {} / {} | {} |",
            r.mode,
            r.gpu_hours_provisioned,
            r.gpu_hours_held,
            r.gpu_hours_cached,
            r.gpu_hours_moving,
            r.gpu_hours_used,
            saved,
            of_oracle,
            r.started_within_1s_pct,
            seconds(r.delay_p50_s),
            seconds(r.delay_p95_s),
            seconds(r.delay_p99_s),
            seconds(r.delay_max_s),
            r.migrations,
            r.rebalance_moves,
            r.servers_added,
            r.servers_removed,
            r.peak_servers,
        );
    }
    t.push_str("\nCells that waited 1 s or more, and what their waiting was:\n\n");
    for r in rows.iter().filter(|r| r.tail_cells > 0) {
        let _ = writeln!(t, "- {}: {} cells; {}", r.mode, r.tail_cells, r.tail.line());
    }
    t
}

fn seconds(s: f64) -> String {
    if s < 1.0 {
        format!("{:.0} ms", s * 1e3)
    } else {
        format!("{s:.1} s")
    }
}

/// Writes `summary.md`, `summary.json`, `timeline.csv` (GPUs provisioned
/// and held, per minute) and `delays.csv` (every cell's delay) into `dir`.
pub fn write(
    dir: &Path,
    workload: &Workload,
    outcomes: &[Outcome],
    rows: &[Summary],
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("summary.md"), table(workload, rows))?;
    let json = serde_json::to_string_pretty(rows).map_err(std::io::Error::other)?;
    std::fs::write(dir.join("summary.json"), json + "\n")?;

    let mut timeline = std::io::BufWriter::new(std::fs::File::create(dir.join("timeline.csv"))?);
    writeln!(timeline, "mode,minute,gpus_provisioned,gpus_held")?;
    for o in outcomes {
        // The state at the end of each minute the run lasted.
        let end = o.timeline.last().map_or(0, |&(t, _, _)| t);
        let mut i = 0;
        for minute in 0..=end / MINUTE {
            let t = minute * MINUTE;
            while i + 1 < o.timeline.len() && o.timeline[i + 1].0 <= t {
                i += 1;
            }
            let (_, provisioned, held) = o.timeline[i];
            writeln!(timeline, "{},{minute},{provisioned},{held}", o.mode)?;
        }
    }
    timeline.flush()?;

    let mut delays = std::io::BufWriter::new(std::fs::File::create(dir.join("delays.csv"))?);
    writeln!(
        delays,
        "mode,session,cell,gpus,delay_ms,election_ms,sync_ms,reclaim_ms,restore_ms,queued_ms,migration_ms"
    )?;
    let cells: Vec<(&str, usize, u32)> = workload
        .sessions
        .iter()
        .flat_map(|s| {
            s.cells
                .iter()
                .enumerate()
                .map(|(i, c)| (s.id.as_str(), i, c.gpus))
        })
        .collect();
    for o in outcomes {
        for (d, (session, cell, gpus)) in o.delays.iter().zip(&cells) {
            writeln!(
                delays,
                "{},{session},{cell},{gpus},{},{},{},{},{},{},{}",
                o.mode,
                d.total(),
                d.election,
                d.sync,
                d.reclaim,
                d.restore,
                d.queued,
                d.migration
            )?;
        }
    }
    delays.flush()
}
