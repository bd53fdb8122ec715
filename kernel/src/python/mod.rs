//! The embedded interpreter. Python's main thread is a dedicated OS thread
//! that serves the main shell; each kernel subshell gets a thread of its
//! own. Every thread runs requests from the tokio side one at a time.

mod bridge;
mod digest;
mod init;
mod jobs;
mod wakeup;

use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Condvar, Mutex};

use bytes::Bytes;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use tokio::sync::oneshot;

pub use bridge::{Bridge, Group, InputChannel};

use crate::connection::Channel;
use crate::signals::{self, ThreadInterrupter};
use crate::wire::{Header, Message};
use bridge::bridge;
use jobs::{Job, Work};
use wakeup::Wakeup;

#[derive(Debug, Clone, thiserror::Error)]
pub enum PythonError {
    #[error("cannot start the Python interpreter: {0}")]
    Init(String),
    #[error("notebookos could not start IPython in this environment: {0}")]
    ShellStart(String),
    #[error("{0}")]
    Exception(String),
    #[error("the Python thread has stopped")]
    Gone,
}

/// Versions reported in kernel_info.
#[derive(Debug, Clone)]
pub struct Versions {
    pub python: String,
    pub ipython: String,
}

/// The shim's kernel object, set once the main thread has built it.
struct KernelCell {
    kernel: Mutex<Option<Result<Py<PyAny>, PythonError>>>,
    ready: Condvar,
    /// The same news for the tokio side.
    started: tokio::sync::watch::Sender<bool>,
}

impl Default for KernelCell {
    fn default() -> Self {
        Self {
            kernel: Mutex::default(),
            ready: Condvar::new(),
            started: tokio::sync::watch::channel(false).0,
        }
    }
}

impl KernelCell {
    fn set(&self, kernel: Result<Py<PyAny>, PythonError>) {
        if let Ok(mut k) = self.kernel.lock() {
            *k = Some(kernel);
        }
        self.ready.notify_all();
        self.started.send_replace(true);
    }

    /// Blocks (without the GIL) until the main thread has started the shell.
    fn wait(&self, py: Python<'_>) -> Result<Py<PyAny>, PythonError> {
        py.allow_threads(|| {
            let mut k = self.kernel.lock().map_err(|_| PythonError::Gone)?;
            while k.is_none() {
                k = self.ready.wait(k).map_err(|_| PythonError::Gone)?;
            }
            Ok::<_, PythonError>(())
        })?;
        let k = self.kernel.lock().map_err(|_| PythonError::Gone)?;
        match k.as_ref() {
            Some(Ok(kernel)) => Ok(kernel.clone_ref(py)),
            Some(Err(e)) => Err(e.clone()),
            None => Err(PythonError::Gone),
        }
    }
}

/// A thread that runs requests; cloneable, and the thread ends when the
/// last clone is dropped.
#[derive(Clone)]
pub struct Executor {
    jobs: std_mpsc::Sender<Job>,
    /// The main thread's: its asyncio loop runs until a job arrives.
    wakeup: Option<Arc<Wakeup>>,
}

impl Executor {
    /// Runs a shell request in the shim (`dispatch`); resolves to the reply
    /// content as JSON, or None for requests without a reply. Queued at
    /// once, so calls run in the order they were made.
    pub fn call(
        &self,
        msg: &Message,
    ) -> impl std::future::Future<Output = Result<Option<String>, PythonError>> + Send + 'static
    {
        self.call_on(msg, Channel::Shell, None)
    }

    /// [`Executor::call`] for a request that came on `channel`; `control`:
    /// the newest request served on control, which the shim's
    /// `get_parent("control")` returns from now on.
    pub fn call_on(
        &self,
        msg: &Message,
        channel: Channel,
        control: Option<&Message>,
    ) -> impl std::future::Future<Output = Result<Option<String>, PythonError>> + Send + 'static
    {
        let message = message_json(msg);
        let control = control.map(|c| (message_json(c), c.identities.clone()));
        let channel = match channel {
            Channel::Control => "control",
            _ => "shell",
        };
        let msg_type = msg.header.msg_type.clone();
        let buffers = msg.buffers.clone();
        let identities = msg.identities.clone();
        // A cell awaiting a widget's answer must get it while it runs.
        let concurrent = crate::wire::comm::is_comm_message(&msg_type);
        self.submit(
            Some((msg.header.clone(), msg.identities.clone())),
            concurrent,
            move |py, kernel| {
                let bytes = |frames: &[Bytes]| -> Vec<Bound<'_, PyBytes>> {
                    frames.iter().map(|b| PyBytes::new(py, b)).collect()
                };
                let control = control
                    .as_ref()
                    .map(|(json, identities)| (json.as_str(), bytes(identities)));
                kernel
                    .call_method1(
                        "dispatch",
                        (
                            msg_type.as_str(),
                            message.as_str(),
                            bytes(&buffers),
                            bytes(&identities),
                            channel,
                            control,
                        ),
                    )
                    .and_then(|r| r.extract::<Option<String>>())
            },
        )
    }

    /// Runs `f` on this executor's Python thread with the shim's kernel object.
    pub async fn run<T, F>(&self, f: F) -> Result<T, PythonError>
    where
        T: Send + 'static,
        F: for<'py> FnOnce(Python<'py>, &Bound<'py, PyAny>) -> PyResult<T> + Send + 'static,
    {
        self.submit(None, false, f).await
    }

    /// Queues `f` now, behind the jobs already queued and ahead of any queued
    /// later, and resolves once it ran.
    pub fn queue<T, F>(
        &self,
        f: F,
    ) -> impl std::future::Future<Output = Result<T, PythonError>> + Send + 'static
    where
        T: Send + 'static,
        F: for<'py> FnOnce(Python<'py>, &Bound<'py, PyAny>) -> PyResult<T> + Send + 'static,
    {
        self.submit(None, false, f)
    }

    fn submit<T, F>(
        &self,
        current: Option<(Header, Vec<Bytes>)>,
        concurrent: bool,
        f: F,
    ) -> impl std::future::Future<Output = Result<T, PythonError>> + Send + 'static
    where
        T: Send + 'static,
        F: for<'py> FnOnce(Python<'py>, &Bound<'py, PyAny>) -> PyResult<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<T, PythonError>>();
        let tx = Arc::new(Mutex::new(Some(tx)));
        let on_fail = tx.clone();
        let work: Work = Box::new(move |py, kernel| {
            let result = f(py, kernel).map_err(|e| PythonError::Exception(describe(py, &e)));
            if let Some(tx) = tx.lock().ok().and_then(|mut t| t.take()) {
                let _ = tx.send(result);
            }
        });
        let failed = Box::new(move |e: PythonError| {
            if let Some(tx) = on_fail.lock().ok().and_then(|mut t| t.take()) {
                let _ = tx.send(Err(e));
            }
        });
        let sent = self
            .jobs
            .send(Job {
                current,
                concurrent,
                work,
                failed,
            })
            .map_err(|_| PythonError::Gone);
        if let Some(w) = &self.wakeup {
            w.ring();
        }
        async move {
            sent?;
            rx.await.map_err(|_| PythonError::Gone)?
        }
    }
}

/// Handle to the interpreter.
pub struct PythonRuntime {
    main: Executor,
    interrupter: ThreadInterrupter,
    versions: Versions,
    kernel: Arc<KernelCell>,
    bridge: Arc<Bridge>,
}

impl PythonRuntime {
    /// Starts the interpreter and returns once it is initialised (IPython
    /// is still being imported in the background: requests queue behind it).
    /// `hash_seed` fixes Python's string hashing (unless PYTHONHASHSEED is set), so
    /// that replicas iterate sets alike.
    pub fn start(
        bridge: Arc<Bridge>,
        options: serde_json::Value,
        hash_seed: Option<u32>,
    ) -> Result<Self, PythonError> {
        // Inside a running Python, its main thread waits to take the work.
        let main_thread = crate::extension::take_main_thread();
        let interpreter = match main_thread {
            Some(_) => Interpreter::Running,
            None => {
                pyo3::append_to_inittab!(_notebookos_module);
                Interpreter::Start { hash_seed }
            }
        };
        let (jobs_tx, jobs_rx) = std_mpsc::channel::<Job>();
        let wakeup = Arc::new(Wakeup::new().map_err(|e| PythonError::Init(e.to_string()))?);
        let mut options = options;
        options["idle_wakeup_fd"] = wakeup.fd().into();
        let (ready_tx, ready_rx) = std_mpsc::channel();
        let kernel = Arc::new(KernelCell::default());
        let (thread_kernel, thread_bridge) = (kernel.clone(), bridge.clone());
        let body = move || {
            python_main(
                thread_bridge,
                thread_kernel,
                options,
                interpreter,
                ready_tx,
                jobs_rx,
            )
        };
        match main_thread {
            Some(main) => main
                .send(Box::new(body))
                .map_err(|_| PythonError::Init("Python's main thread is gone".into()))?,
            None => {
                std::thread::Builder::new()
                    .name("python".into())
                    // CPython's recursion limit assumes a main-thread-sized stack.
                    .stack_size(64 << 20)
                    .spawn(body)
                    .map_err(|e| PythonError::Init(e.to_string()))?;
            }
        }
        let (interrupter, versions) = ready_rx.recv().map_err(|_| PythonError::Gone)??;
        Ok(Self {
            main: Executor {
                jobs: jobs_tx,
                wakeup: Some(wakeup),
            },
            interrupter,
            versions,
            kernel,
            bridge,
        })
    }

    pub fn versions(&self) -> &Versions {
        &self.versions
    }

    /// Resolves once the shell has started (or failed to), so that cells
    /// can run: IPython loads in the background after `start` returns.
    pub async fn started(&self) {
        let mut started = self.kernel.started.subscribe();
        let _ = started.wait_for(|s| *s).await;
    }

    /// The main shell's executor (Python's main thread).
    pub fn main(&self) -> &Executor {
        &self.main
    }

    /// A new Python thread for a subshell.
    pub fn spawn_executor(&self, name: &str) -> Result<Executor, PythonError> {
        let (jobs_tx, jobs_rx) = std_mpsc::channel::<Job>();
        let (kernel, bridge) = (self.kernel.clone(), self.bridge.clone());
        std::thread::Builder::new()
            .name(format!("python-{name}"))
            .stack_size(64 << 20)
            .spawn(move || {
                let k = Python::with_gil(|py| kernel.wait(py));
                jobs::serve(&bridge, &k, jobs_rx);
                bridge.forget_thread();
            })
            .map_err(|e| PythonError::Init(e.to_string()))?;
        Ok(Executor {
            jobs: jobs_tx,
            wakeup: None,
        })
    }

    /// Raises KeyboardInterrupt in the main shell's running cell (a no-op
    /// between cells: the shim's handler ignores it then). `cell`: the
    /// msg_id of a cell handed to the main thread and not ended, which is
    /// interrupted as it starts if it has not started yet.
    pub fn interrupt(&self, cell: Option<String>) {
        if let Some(cell) = cell {
            *self
                .bridge
                .interrupt_pending
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(cell);
        }
        if let Err(e) = self.interrupter.interrupt() {
            tracing::error!("cannot signal the Python thread: {e}");
        }
    }
}

// The inittab entry must have a `'static` name visible to the macro.
use bridge::_notebookos as _notebookos_module;

/// Whose interpreter the Python thread runs on.
enum Interpreter {
    /// One this thread starts (the binary): `hash_seed` fixes string hashing.
    Start { hash_seed: Option<u32> },
    /// The Python this program was imported into, already started.
    Running,
}

fn python_main(
    bridge: Arc<Bridge>,
    kernel_cell: Arc<KernelCell>,
    options: serde_json::Value,
    interpreter: Interpreter,
    ready: std_mpsc::Sender<Result<(ThreadInterrupter, Versions), PythonError>>,
    jobs: std_mpsc::Receiver<Job>,
) {
    if let Err(e) = signals::unblock_sigint_in_this_thread() {
        tracing::warn!("cannot unblock SIGINT on the Python thread: {e}");
    }
    let started = match interpreter {
        // Its seed, executable and paths were set when it started.
        Interpreter::Running => Python::with_gil(|py| {
            let module = pyo3::wrap_pymodule!(_notebookos_module)(py);
            py.import("sys")
                .and_then(|sys| sys.getattr("modules"))
                .and_then(|modules| modules.set_item("_notebookos", module))
                .map_err(|e| PythonError::Init(describe(py, &e)))
        }),
        Interpreter::Start { hash_seed } => {
            let executable = std::env::var("NOTEBOOKOS_PYTHON")
                .ok()
                .filter(|s| !s.is_empty());
            // SAFETY: the only interpreter initialisation in this process.
            unsafe { init::initialize(executable.as_deref(), hash_seed) }
        }
    };
    if let Err(e) = started {
        let _ = ready.send(Err(e));
        return;
    }
    bridge.set_main_thread();
    let versions = Python::with_gil(|py| {
        let v = py.version_info();
        Versions {
            python: format!("{}.{}.{}", v.major, v.minor, v.patch),
            // From package metadata: IPython itself loads in the background.
            ipython: py
                .import("notebookos_shim.versions")
                .and_then(|m| m.call_method0("ipython_version"))
                .and_then(|v| v.extract::<String>())
                .unwrap_or_else(|_| "unknown".into()),
        }
    });
    let _ = ready.send(Ok((ThreadInterrupter::current(), versions)));

    let kernel: Result<Py<PyAny>, PythonError> = Python::with_gil(|py| {
        py.import("notebookos_shim")
            .and_then(|m| m.call_method1("start", (options.to_string(),)))
            .map(Bound::unbind)
            .map_err(|e| PythonError::ShellStart(describe(py, &e)))
    });
    if let Err(e) = &kernel {
        tracing::error!("{e}");
    }
    let for_cell = Python::with_gil(|py| match &kernel {
        Ok(k) => Ok(k.clone_ref(py)),
        Err(e) => Err(e.clone()),
    });
    kernel_cell.set(for_cell);
    jobs::serve_main(&bridge, &kernel, jobs);
}

/// A message as the shim's `dispatch` reads it.
fn message_json(msg: &Message) -> String {
    serde_json::json!({
        "header": msg.header,
        "parent_header": match &msg.parent_header {
            Some(p) => serde_json::json!(p),
            None => serde_json::json!({}),
        },
        "metadata": msg.metadata,
        "content": msg.content,
    })
    .to_string()
}

fn describe(py: Python<'_>, err: &PyErr) -> String {
    let tb = err
        .traceback(py)
        .and_then(|tb| tb.format().ok())
        .unwrap_or_default();
    format!("{tb}{err}")
}
