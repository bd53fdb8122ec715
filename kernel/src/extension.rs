//! The program as the wheel's extension module, `notebookos._kernel`: the
//! kernel runs inside the Python that `python -m notebookos` started, so
//! cells run in that interpreter as they do under ipykernel. An embedded
//! libpython is not always the same build: Debian's and Ubuntu's Pythons are
//! linked statically and optimised, and their shared library runs the same
//! Python code about 1.6x slower (`bench/interpreter_speed.py`).
//!
//! The thread that calls [`main`] is Python's main thread. It starts the
//! program on another thread and waits; when the kernel starts its
//! interpreter side (`python::PythonRuntime::start`), it is handed here and
//! runs on this thread, so signals and `signal.signal` work as in any Python.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Mutex;

use pyo3::prelude::*;

/// Work for Python's main thread.
pub(crate) type MainJob = Box<dyn FnOnce() + Send>;

/// Set while Python's main thread waits in [`main`] for the kernel's job.
static WAITING_MAIN: Mutex<Option<mpsc::Sender<MainJob>>> = Mutex::new(None);

/// Python's main thread, if it waits for work: taken once, by the kernel.
pub(crate) fn take_main_thread() -> Option<mpsc::Sender<MainJob>> {
    WAITING_MAIN
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
}

/// Runs the program with `argv` (`sys.argv`: the program's name first) and
/// returns its exit status. The kernel itself never returns: it exits the
/// process once its shell has shut down, as the binary does.
#[pyfunction]
fn main(py: Python<'_>, argv: Vec<OsString>) -> PyResult<i32> {
    let executable: PathBuf = py.import("sys")?.getattr("executable")?.extract()?;
    crate::program::set_running_in(executable);
    let (tx, rx) = mpsc::channel::<MainJob>();
    *WAITING_MAIN.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
    let program = std::thread::Builder::new()
        .name("notebookos".into())
        .spawn(move || {
            let code = crate::cli::main(argv);
            // A subcommand that started no interpreter: stop waiting for one.
            take_main_thread();
            code
        })?;
    py.allow_threads(move || {
        if let Ok(job) = rx.recv() {
            job();
        }
    });
    let code = py.allow_threads(|| program.join());
    Ok(code.unwrap_or(101))
}

/// The hash seed to start Python with for these arguments, when they start a
/// replicated kernel: its replicas must hash strings alike, and an
/// interpreter takes its seed only at start.
#[pyfunction]
fn hash_seed(argv: Vec<OsString>) -> Option<u32> {
    let connection_file = crate::cli::replicated_kernel(argv)?;
    crate::replica::front::hash_seed_for(&connection_file).ok()
}

#[pymodule]
fn _kernel(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(main, m)?)?;
    m.add_function(wrap_pyfunction!(hash_seed, m)?)?;
    Ok(())
}
