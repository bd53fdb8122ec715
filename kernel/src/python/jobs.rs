//! The jobs of one Python thread, served in arrival order.
//!
//! On the main thread the shell's asyncio loop runs whenever no job is
//! queued. A comm message that arrives while a cell awaits (a widget's
//! answer the cell waits for) is served inside that cell's loop, ahead of
//! the requests queued behind the cell, as ipykernel serves comms while its
//! shell is busy.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, TryRecvError};

use bytes::Bytes;
use pyo3::prelude::*;

use super::{bridge, describe, Bridge, PythonError};
use crate::wire::Header;

/// Work for a Python thread: runs with the GIL held and the shim's kernel object.
pub(super) type Work = Box<dyn for<'py> FnOnce(Python<'py>, &Bound<'py, PyAny>) + Send>;

pub(super) struct Job {
    /// The request whose outputs this job's Python code produces, if any.
    pub current: Option<(Header, Vec<Bytes>)>,
    /// May run inside a running cell's event loop (comm messages).
    pub concurrent: bool,
    pub work: Work,
    /// Told when the shim failed to start, instead of running `work`.
    pub failed: Box<dyn FnOnce(PythonError) + Send>,
}

/// The main thread's queue, where Python reaches it while a job runs.
struct Queue {
    jobs: Receiver<Job>,
    /// Taken from `jobs` while a cell ran, not concurrent: served next.
    deferred: VecDeque<Job>,
}

thread_local! {
    static MAIN: RefCell<Option<Queue>> = const { RefCell::new(None) };
}

/// Why [`next`] has no job to give.
enum NoJob {
    Empty,
    Closed,
}

/// Serves a subshell's thread (or a main thread whose shim did not start).
pub(super) fn serve(bridge: &Bridge, kernel: &Result<Py<PyAny>, PythonError>, jobs: Receiver<Job>) {
    for job in jobs {
        run(bridge, kernel, job);
    }
}

/// Serves the main thread: the asyncio loop runs between jobs.
pub(super) fn serve_main(
    bridge: &Bridge,
    kernel: &Result<Py<PyAny>, PythonError>,
    jobs: Receiver<Job>,
) {
    let Ok(shim) = kernel else {
        return serve(bridge, kernel, jobs);
    };
    MAIN.with(|q| {
        *q.borrow_mut() = Some(Queue {
            jobs,
            deferred: VecDeque::new(),
        })
    });
    let mut idle_loop = true;
    loop {
        let job = match next(false) {
            Ok(job) => job,
            Err(NoJob::Closed) => return,
            Err(NoJob::Empty) if idle_loop => {
                idle_loop = run_idle_loop(shim);
                continue;
            }
            Err(NoJob::Empty) => match next(true) {
                Ok(job) => job,
                Err(_) => return,
            },
        };
        run(bridge, kernel, job);
    }
}

fn next(block: bool) -> Result<Job, NoJob> {
    MAIN.with(|cell| {
        let mut guard = cell.borrow_mut();
        let Some(q) = guard.as_mut() else {
            return Err(NoJob::Closed);
        };
        if let Some(job) = q.deferred.pop_front() {
            return Ok(job);
        }
        let got = if block {
            q.jobs.recv().map_err(|_| TryRecvError::Disconnected)
        } else {
            q.jobs.try_recv()
        };
        got.map_err(|e| match e {
            TryRecvError::Empty => NoJob::Empty,
            TryRecvError::Disconnected => NoJob::Closed,
        })
    })
}

fn run(bridge: &Bridge, kernel: &Result<Py<PyAny>, PythonError>, job: Job) {
    match kernel {
        Err(e) => (job.failed)(e.clone()),
        Ok(kernel) => Python::with_gil(|py| {
            if let Some((header, identities)) = &job.current {
                bridge.set_current(header, identities);
            }
            (job.work)(py, kernel.bind(py));
        }),
    }
}

/// Runs the shell's asyncio loop until a job rings the wakeup. False when
/// the loop cannot run here: jobs are then awaited without it.
fn run_idle_loop(kernel: &Py<PyAny>) -> bool {
    Python::with_gil(|py| match kernel.bind(py).call_method0("idle") {
        Ok(ran) => ran.is_truthy().unwrap_or(false),
        Err(e) => {
            tracing::warn!(
                "the asyncio loop cannot run between requests: {}",
                describe(py, &e)
            );
            false
        }
    })
}

/// Serves the comm messages queued for the main thread, from inside the
/// running cell's event loop; other jobs stay queued, in order, for after it.
#[pyfunction]
pub(super) fn serve_comms(py: Python<'_>, kernel: &Bound<'_, PyAny>) -> PyResult<()> {
    let bridge = bridge()?;
    loop {
        let job = MAIN.with(|cell| {
            let mut guard = cell.borrow_mut();
            let q = guard.as_mut()?;
            loop {
                match q.jobs.try_recv() {
                    Ok(job) if job.concurrent => return Some(job),
                    Ok(job) => q.deferred.push_back(job),
                    Err(_) => return None,
                }
            }
        });
        let Some(job) = job else { return Ok(()) };
        let cell = bridge.this_thread_current();
        if let Some((header, identities)) = &job.current {
            bridge.set_current(header, identities);
        }
        (job.work)(py, kernel);
        bridge.restore_current(cell);
    }
}
