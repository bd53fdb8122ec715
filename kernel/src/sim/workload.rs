//! Workloads: notebook sessions and their cells, from the Adobe session
//! trace, from the event-level CSV, or generated.
//!
//! Times are milliseconds from the start of the workload.

use std::path::Path;

use serde::Deserialize;

use super::rng::Rng;

pub type Ms = u64;

pub const SECOND: Ms = 1000;
pub const MINUTE: Ms = 60 * SECOND;

/// One cell that asks for GPUs (or none: a CPU cell).
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    /// When the trace submits it; a cell is never submitted before its
    /// session's previous cell ended (a notebook runs one cell at a time).
    pub submit: Ms,
    pub duration: Ms,
    pub gpus: u32,
    /// Bytes of kernel state a new replica or container must load.
    pub state_bytes: u64,
    /// Bytes of that state on the GPUs (the model a training cell changes):
    /// what the winner replicates after a GPU cell, and what moves between
    /// host and GPU when a grant is revoked or a cell runs elsewhere.
    pub gpu_bytes: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    pub id: String,
    pub start: Ms,
    pub stop: Ms,
    pub cells: Vec<Cell>,
}

impl Session {
    /// GPUs the session's kernel may ask for: what Reservation holds and
    /// what a replica subscribes.
    pub fn gpus(&self) -> u32 {
        self.cells.iter().map(|c| c.gpus).max().unwrap_or(0)
    }
}

/// The remote store the trace models (S3-like), used for state transfers.
#[derive(Debug, Clone, PartialEq)]
pub struct Store {
    pub download_bytes_per_s: f64,
    pub upload_bytes_per_s: f64,
    /// Each transfer's rate varies by up to this many percent either way.
    pub variance_pct: f64,
}

impl Default for Store {
    /// The trace's `remoteStorageDefinition`.
    fn default() -> Self {
        Self {
            download_bytes_per_s: 200e6,
            upload_bytes_per_s: 125e6,
            variance_pct: 5.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    pub name: String,
    pub sessions: Vec<Session>,
    pub store: Store,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
}

/// The session trace's tick: the trace covers June 1–2 (48 hours) in 2,869
/// ticks, and its event-level sibling is sampled every 60 s.
pub const TRACE_TICK: Ms = MINUTE;

#[derive(Deserialize)]
struct TraceFile {
    #[serde(default)]
    workload_title: String,
    remote_storage_definition: Option<TraceStore>,
    sessions: Vec<TraceSession>,
}

#[derive(Deserialize)]
struct TraceStore {
    download_rate: f64,
    upload_rate: f64,
    #[serde(default)]
    download_rate_variance_percentage: f64,
}

#[derive(Deserialize)]
struct TraceSession {
    id: String,
    start_tick: u64,
    stop_tick: u64,
    trainings: Vec<TraceTraining>,
}

#[derive(Deserialize)]
struct TraceTraining {
    start_tick: u64,
    duration_in_ticks: u64,
    gpus: u32,
    /// GB of host memory the training used: the state a replica must load.
    memory: f64,
    /// GB of GPU memory it used.
    #[serde(default)]
    vram: f64,
}

impl Workload {
    /// The Adobe session trace (`adobe_sensei_june_1-2_2021_sessions.json`).
    pub fn from_session_trace(path: &Path) -> Result<Self, WorkloadError> {
        let text = read(path)?;
        let file: TraceFile = serde_json::from_str(&text).map_err(|e| WorkloadError::Parse {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let store = file
            .remote_storage_definition
            .map(|s| Store {
                download_bytes_per_s: s.download_rate,
                upload_bytes_per_s: s.upload_rate,
                variance_pct: s.download_rate_variance_percentage,
            })
            .unwrap_or_default();
        let mut sessions: Vec<Session> = file
            .sessions
            .into_iter()
            .map(|s| {
                let mut cells: Vec<Cell> = s
                    .trainings
                    .iter()
                    .map(|t| Cell {
                        submit: t.start_tick * TRACE_TICK,
                        duration: t.duration_in_ticks * TRACE_TICK,
                        gpus: t.gpus,
                        state_bytes: (t.memory.max(0.0) * 1e9) as u64,
                        gpu_bytes: if t.gpus > 0 {
                            (t.vram.max(0.0) * 1e9) as u64
                        } else {
                            0
                        },
                    })
                    .collect();
                cells.sort_by_key(|c| c.submit);
                Session {
                    id: s.id,
                    start: s.start_tick * TRACE_TICK,
                    stop: s.stop_tick * TRACE_TICK,
                    cells,
                }
            })
            .collect();
        sessions.sort_by(|a, b| a.start.cmp(&b.start).then(a.id.cmp(&b.id)));
        Ok(Self {
            name: if file.workload_title.is_empty() {
                path.display().to_string()
            } else {
                file.workload_title
            },
            sessions,
            store,
        })
    }

    /// The event-level CSV (`job_id,num_gpu,submit_time,...,duration,...`,
    /// minutes). It has no sessions: each job is a one-cell session that
    /// lives exactly as long as its cell, so it tests the scheduler at
    /// scale, not idle time between cells.
    pub fn from_event_csv(path: &Path, state_bytes: u64) -> Result<Self, WorkloadError> {
        let text = read(path)?;
        let parse_err = |line: usize, message: &str| WorkloadError::Parse {
            path: path.display().to_string(),
            message: format!("line {line}: {message}"),
        };
        let mut lines = text.lines().enumerate();
        let header: Vec<&str> = lines
            .next()
            .map(|(_, h)| h.split(',').map(str::trim).collect())
            .unwrap_or_default();
        let col = |name: &str| {
            header
                .iter()
                .position(|h| *h == name)
                .ok_or_else(|| parse_err(1, &format!("no column {name}")))
        };
        let (id_col, gpu_col, submit_col, dur_col) = (
            col("job_id")?,
            col("num_gpu")?,
            col("submit_time")?,
            col("duration")?,
        );
        let mut sessions = Vec::new();
        for (i, line) in lines {
            if line.trim().is_empty() {
                continue;
            }
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            let field = |c: usize| {
                fields
                    .get(c)
                    .copied()
                    .ok_or_else(|| parse_err(i + 1, "too few fields"))
            };
            let number = |c: usize| -> Result<u64, WorkloadError> {
                field(c)?
                    .parse()
                    .map_err(|_| parse_err(i + 1, &format!("{:?} is not a number", fields[c])))
            };
            let submit = number(submit_col)? * MINUTE;
            let duration = number(dur_col)?.max(1) * MINUTE;
            let gpus = u32::try_from(number(gpu_col)?)
                .map_err(|_| parse_err(i + 1, "num_gpu out of range"))?;
            sessions.push(Session {
                id: field(id_col)?.to_owned(),
                start: submit,
                stop: submit + duration,
                cells: vec![Cell {
                    submit,
                    duration,
                    gpus,
                    state_bytes,
                    gpu_bytes: 0,
                }],
            });
        }
        sessions.sort_by(|a, b| a.start.cmp(&b.start).then(a.id.cmp(&b.id)));
        Ok(Self {
            name: path.display().to_string(),
            sessions,
            store: Store::default(),
        })
    }

    /// A generated workload; the distributions are documented in
    /// `docs/simulator.md` and fitted loosely to the session trace.
    pub fn synthetic(spec: &Synthetic, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let mut sessions = Vec::with_capacity(spec.sessions);
        for i in 0..spec.sessions {
            let start = (rng.uniform() * spec.horizon as f64) as Ms;
            let life = (rng.lognormal(spec.life_median.ln(), 0.8) * MINUTE as f64) as Ms;
            let stop = start + life.max(MINUTE);
            let gpus = spec.pick_gpus(rng.uniform());
            let mut cells = Vec::new();
            let mut t = start + (rng.exponential(spec.think_mean) * MINUTE as f64) as Ms;
            while t < stop {
                let duration = ((rng.lognormal(spec.cell_median.ln(), 1.0) * MINUTE as f64) as Ms)
                    .max(SECOND)
                    .min(stop - t);
                let cpu_only = rng.uniform() < spec.cpu_cell_share;
                let state_bytes = (rng.uniform() * 8e9) as u64;
                let gpus = if cpu_only { 0 } else { gpus };
                cells.push(Cell {
                    submit: t,
                    duration,
                    gpus,
                    state_bytes,
                    gpu_bytes: if gpus > 0 { state_bytes / 4 } else { 0 },
                });
                t += duration + (rng.exponential(spec.think_mean) * MINUTE as f64) as Ms;
            }
            sessions.push(Session {
                id: format!("synthetic-{i}"),
                start,
                stop,
                cells,
            });
        }
        sessions.sort_by(|a, b| a.start.cmp(&b.start).then(a.id.cmp(&b.id)));
        Self {
            name: format!("synthetic ({} sessions, seed {seed})", spec.sessions),
            sessions,
            store: Store::default(),
        }
    }

    pub fn cells(&self) -> usize {
        self.sessions.iter().map(|s| s.cells.len()).sum()
    }

    /// The part of the workload inside `[start, start + len)`, shifted to
    /// begin at 0: sessions are cut to the window, and a cell is kept when it
    /// is submitted inside it (it may run past the end).
    pub fn window(&self, start: Ms, len: Ms) -> Self {
        let end = start + len;
        let sessions = self
            .sessions
            .iter()
            .filter(|s| s.start < end && s.stop > start)
            .map(|s| {
                let cells: Vec<Cell> = s
                    .cells
                    .iter()
                    .filter(|c| c.submit >= start && c.submit < end)
                    .map(|c| Cell {
                        submit: c.submit - start,
                        ..c.clone()
                    })
                    .collect();
                let last_end = cells.iter().map(|c| c.submit + c.duration).max();
                Session {
                    id: s.id.clone(),
                    start: s.start.max(start) - start,
                    stop: (s.stop.min(end) - start).max(last_end.unwrap_or(0)),
                    cells,
                }
            })
            .collect();
        Self {
            name: format!(
                "{}, hours {:.1}-{:.1}",
                self.name,
                start as f64 / 3_600_000.0,
                end as f64 / 3_600_000.0
            ),
            sessions,
            store: self.store.clone(),
        }
    }

    /// Where the window of `len` holding the most cells starts (on a
    /// `step` grid; the earliest such window).
    pub fn busiest_window(&self, len: Ms, step: Ms) -> Ms {
        let mut submits: Vec<Ms> = self
            .sessions
            .iter()
            .flat_map(|s| s.cells.iter().map(|c| c.submit))
            .collect();
        submits.sort_unstable();
        let last = submits.last().copied().unwrap_or(0);
        let mut best = (0, 0);
        let mut start = 0;
        while start <= last {
            let lo = submits.partition_point(|&t| t < start);
            let hi = submits.partition_point(|&t| t < start + len);
            if hi - lo > best.1 {
                best = (start, hi - lo);
            }
            start += step.max(1);
        }
        best.0
    }
}

/// Parameters of the synthetic generator (times in minutes).
#[derive(Debug, Clone, PartialEq)]
pub struct Synthetic {
    pub sessions: usize,
    /// Sessions start uniformly over this span.
    pub horizon: Ms,
    /// Median session life (log-normal, σ 0.8).
    pub life_median: f64,
    /// Median cell duration (log-normal, σ 1.0).
    pub cell_median: f64,
    /// Mean think time between cells (exponential).
    pub think_mean: f64,
    /// Share of cells that use no GPU.
    pub cpu_cell_share: f64,
    /// GPUs per session and their weights.
    pub gpu_mix: Vec<(u32, f64)>,
}

impl Default for Synthetic {
    /// Shaped after the session trace: sessions live ~15 h, cells last ~6
    /// min with ~40 min between them; sessions ask for 1, 4 or 8 GPUs.
    fn default() -> Self {
        Self {
            sessions: 1000,
            horizon: 48 * 60 * MINUTE,
            life_median: 900.0,
            cell_median: 6.0,
            think_mean: 40.0,
            cpu_cell_share: 0.3,
            gpu_mix: vec![(0, 0.1), (1, 0.55), (4, 0.15), (8, 0.2)],
        }
    }
}

impl Synthetic {
    fn pick_gpus(&self, u: f64) -> u32 {
        let total: f64 = self.gpu_mix.iter().map(|(_, w)| w).sum();
        let mut acc = 0.0;
        for (g, w) in &self.gpu_mix {
            acc += w / total;
            if u < acc {
                return *g;
            }
        }
        self.gpu_mix.last().map_or(0, |(g, _)| *g)
    }
}

fn read(path: &Path) -> Result<String, WorkloadError> {
    std::fs::read_to_string(path).map_err(|source| WorkloadError::Read {
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_jobs_become_one_cell_sessions() {
        let dir = std::env::temp_dir().join(format!("nbos-csv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("w.csv");
        std::fs::write(
            &path,
            "job_id,num_gpu,submit_time,iterations,model_name,duration,interval\n\
             0,4,10,0,vgg,3,0\n1,1,2,0,x,0,0\n",
        )
        .unwrap();
        let w = Workload::from_event_csv(&path, 7).unwrap();
        assert_eq!(w.sessions.len(), 2);
        assert_eq!(w.sessions[0].id, "1", "sorted by start");
        assert_eq!(
            w.sessions[0].cells[0].duration, MINUTE,
            "zero minutes runs one"
        );
        assert_eq!(w.sessions[1].cells[0].gpus, 4);
        assert_eq!(w.sessions[1].stop, 13 * MINUTE);

        std::fs::write(&path, "job_id,num_gpu,submit_time,duration\n0,x,1,1\n").unwrap();
        let err = Workload::from_event_csv(&path, 0).unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_window_keeps_the_cells_submitted_inside_it() {
        let cell = |submit| Cell {
            submit,
            duration: 10 * MINUTE,
            gpus: 1,
            state_bytes: 0,
            gpu_bytes: 0,
        };
        let w = Workload {
            name: "w".into(),
            sessions: vec![
                Session {
                    id: "a".into(),
                    start: 0,
                    stop: 300 * MINUTE,
                    cells: vec![cell(MINUTE), cell(100 * MINUTE), cell(115 * MINUTE)],
                },
                Session {
                    id: "b".into(),
                    start: 200 * MINUTE,
                    stop: 300 * MINUTE,
                    cells: vec![cell(210 * MINUTE)],
                },
            ],
            store: Store::default(),
        };
        assert_eq!(w.busiest_window(30 * MINUTE, MINUTE), 86 * MINUTE);
        let part = w.window(90 * MINUTE, 30 * MINUTE);
        assert_eq!(part.sessions.len(), 1, "b starts after the window");
        let a = &part.sessions[0];
        assert_eq!((a.start, a.cells.len()), (0, 2));
        assert_eq!(a.cells[0].submit, 10 * MINUTE);
        // Cut at the window's end, but not before its last cell ends.
        assert_eq!(a.stop, 35 * MINUTE);
    }

    #[test]
    fn synthetic_is_deterministic_and_well_formed() {
        let spec = Synthetic {
            sessions: 50,
            ..Synthetic::default()
        };
        let a = Workload::synthetic(&spec, 7);
        assert_eq!(a, Workload::synthetic(&spec, 7));
        assert_ne!(a, Workload::synthetic(&spec, 8));
        for s in &a.sessions {
            let mut end = s.start;
            for c in &s.cells {
                assert!(c.submit >= end && c.submit + c.duration <= s.stop);
                end = c.submit + c.duration;
            }
        }
    }
}
