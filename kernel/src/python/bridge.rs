//! `_notebookos`: the built-in module through which the Python shim hands
//! iopub and stdin traffic to Rust.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::ThreadId;
use std::time::Duration;

use bytes::Bytes;
use pyo3::exceptions::{PyEOFError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use serde_json::Value;

use crate::channels::iopub::Iopub;
use crate::wire::{self, Header, Outgoing};

/// Where `input()` asks: Jupyter's stdin socket, or the replica facing it.
pub trait InputChannel: Send + Sync {
    /// Sends an input request; the answer arrives on the returned receiver.
    fn request(
        &self,
        identities: &[Bytes],
        parent: Option<&Header>,
        prompt: String,
        password: bool,
    ) -> std::sync::mpsc::Receiver<String>;
    /// The pending request was interrupted.
    fn cancel(&self);
}

/// What the shim asks of the replica group (absent with a single replica).
pub trait Group: Send + Sync {
    /// Namespace digests of the other replicas, computed at the same point of the
    /// log as `own` (this replica's, taken by the caller).
    fn peer_digests(&self) -> Result<Vec<(u64, String)>, String>;
    /// Replicas, roles and the last cell's winner, as JSON for `%notebookos`.
    fn placement(&self) -> String;
}

/// What the Python side reaches; set once before the interpreter starts.
pub struct Bridge {
    pub iopub: Iopub,
    pub stdin: Arc<dyn InputChannel>,
    group: OnceLock<Arc<dyn Group>>,
    current: Mutex<HashMap<ThreadId, Current>>,
    main_thread: OnceLock<ThreadId>,
    /// An interrupt for a cell (by its request's msg_id) given to the main
    /// thread that may not have started yet: SIGINT then meets the shim's
    /// between-cells handler, so that cell checks this as it starts. Named,
    /// so that one arriving after its cell ended stops no later cell.
    pub(super) interrupt_pending: Mutex<Option<String>>,
}

/// The request a Python thread is serving: its outputs are parented to it
/// and its input requests go to its sender. It stays set after the request
/// ends; threads the user starts write under the main shell's request, as
/// with ipykernel.
#[derive(Default, Clone)]
pub(super) struct Current {
    parent: Option<Header>,
    identities: Vec<Bytes>,
}

static BRIDGE: OnceLock<Arc<Bridge>> = OnceLock::new();

impl Bridge {
    pub fn install(iopub: Iopub, stdin: Arc<dyn InputChannel>) -> Arc<Self> {
        let bridge = Arc::new(Self {
            iopub,
            stdin,
            group: OnceLock::new(),
            current: Mutex::new(HashMap::new()),
            main_thread: OnceLock::new(),
            interrupt_pending: Mutex::new(None),
        });
        // A second install (tests) keeps the first: one interpreter per process.
        BRIDGE.get_or_init(|| bridge.clone()).clone()
    }

    pub fn set_group(&self, group: Arc<dyn Group>) {
        let _ = self.group.set(group);
    }

    pub fn set_main_thread(&self) {
        let _ = self.main_thread.set(std::thread::current().id());
    }

    pub fn set_current(&self, parent: &Header, identities: &[Bytes]) {
        if let Ok(mut c) = self.current.lock() {
            c.insert(
                std::thread::current().id(),
                Current {
                    parent: Some(parent.clone()),
                    identities: identities.to_vec(),
                },
            );
        }
    }

    /// What this thread's output answers now, to put back with
    /// [`Bridge::restore_current`] after a job run inside another.
    pub(super) fn this_thread_current(&self) -> Option<Current> {
        let c = self.current.lock().ok()?;
        c.get(&std::thread::current().id()).cloned()
    }

    pub(super) fn restore_current(&self, saved: Option<Current>) {
        if let Ok(mut c) = self.current.lock() {
            let me = std::thread::current().id();
            match saved {
                Some(saved) => c.insert(me, saved),
                None => c.remove(&me),
            };
        }
    }

    /// Called when a subshell thread ends.
    pub fn forget_thread(&self) {
        if let Ok(mut c) = self.current.lock() {
            c.remove(&std::thread::current().id());
        }
    }

    fn current(&self) -> Current {
        let Ok(c) = self.current.lock() else {
            return Current::default();
        };
        c.get(&std::thread::current().id())
            .or_else(|| self.main_thread.get().and_then(|m| c.get(m)))
            .cloned()
            .unwrap_or_default()
    }
}

pub(super) fn bridge() -> PyResult<&'static Arc<Bridge>> {
    BRIDGE
        .get()
        .ok_or_else(|| PyRuntimeError::new_err("notebookos kernel bridge is not running"))
}

/// Checks that the shim publishes only message types the protocol knows,
/// with contents of the right shape.
fn validate(msg_type: &str, content: Value) -> Result<Value, String> {
    use wire::{comm, display, error, execute, stream};
    fn check<T: serde::de::DeserializeOwned>(v: &Value) -> Result<(), String> {
        T::deserialize(v).map(|_| ()).map_err(|e| e.to_string())
    }
    match msg_type {
        "stream" => check::<stream::Stream>(&content),
        "display_data" | "update_display_data" => check::<display::DisplayData>(&content),
        "clear_output" => check::<display::ClearOutput>(&content),
        "execute_input" => check::<execute::ExecuteInput>(&content),
        "execute_result" => check::<execute::ExecuteResult>(&content),
        "error" => check::<error::ErrorContent>(&content),
        "comm_open" => check::<comm::CommOpen>(&content),
        "comm_msg" => check::<comm::CommMsg>(&content),
        "comm_close" => check::<comm::CommClose>(&content),
        other => Err(format!("not an iopub message type: {other:?}")),
    }?;
    Ok(content)
}

fn parse_json(text: &str, what: &str) -> PyResult<Value> {
    serde_json::from_str(text).map_err(|e| PyValueError::new_err(format!("{what}: {e}")))
}

fn to_bytes(obj: &Bound<'_, PyAny>) -> PyResult<Bytes> {
    if let Ok(b) = obj.downcast::<PyBytes>() {
        return Ok(Bytes::copy_from_slice(b.as_bytes()));
    }
    // memoryview, bytearray, numpy buffers: anything bytes() accepts.
    let b = obj.py().get_type::<PyBytes>().call1((obj,))?;
    let b = b.downcast::<PyBytes>()?;
    Ok(Bytes::copy_from_slice(b.as_bytes()))
}

#[pyfunction]
#[pyo3(signature = (msg_type, content, metadata=None, buffers=None, parent=None))]
fn publish(
    py: Python<'_>,
    msg_type: &str,
    content: &str,
    metadata: Option<&str>,
    buffers: Option<Vec<Bound<'_, PyAny>>>,
    parent: Option<&str>,
) -> PyResult<()> {
    let bridge = bridge()?;
    let content =
        validate(msg_type, parse_json(content, "content")?).map_err(PyValueError::new_err)?;
    let metadata = match metadata {
        Some(m) => parse_json(m, "metadata")?,
        None => Value::Object(Default::default()),
    };
    let buffers = buffers
        .unwrap_or_default()
        .iter()
        .map(to_bytes)
        .collect::<PyResult<Vec<_>>>()?;
    let parent = parent_header(bridge, parent)?;
    let msg = Outgoing::new(
        msg_type,
        &bridge.iopub.session().id,
        parent.as_ref(),
        content,
    )
    .with_metadata(metadata)
    .with_buffers(buffers);
    py.allow_threads(|| bridge.iopub.blocking_publish(msg));
    Ok(())
}

/// The request a message from Python answers: the header it names (a
/// thread's own, `set_thread_parent`; `{}` for none), else the request
/// being handled.
fn parent_header(bridge: &Bridge, parent: Option<&str>) -> PyResult<Option<Header>> {
    Ok(match parent {
        Some(p) => match parse_json(p, "parent")? {
            Value::Object(m) if m.is_empty() => None,
            v => Some(
                serde_json::from_value(v)
                    .map_err(|e| PyValueError::new_err(format!("parent: {e}")))?,
            ),
        },
        None => bridge.current().parent,
    })
}

#[pyfunction]
#[pyo3(signature = (name, text, parent=None))]
fn stream(py: Python<'_>, name: String, text: String, parent: Option<&str>) -> PyResult<()> {
    let bridge = bridge()?;
    let parent = parent_header(bridge, parent)?;
    py.allow_threads(|| bridge.iopub.blocking_stream(parent, name, text));
    Ok(())
}

#[pyfunction]
fn flush(py: Python<'_>) -> PyResult<()> {
    let bridge = bridge()?;
    py.allow_threads(|| bridge.iopub.blocking_flush());
    Ok(())
}

/// Blocks (without the GIL) until the front-end answers. Signals are
/// checked while waiting so an interrupt ends the wait with
/// KeyboardInterrupt, as in ipykernel.
#[pyfunction]
fn input_request(py: Python<'_>, prompt: String, password: bool) -> PyResult<String> {
    let bridge = bridge()?;
    let current = bridge.current();
    let mut rx = py.allow_threads(|| {
        bridge.stdin.request(
            &current.identities,
            current.parent.as_ref(),
            prompt,
            password,
        )
    });
    loop {
        // The receiver is moved in and out: it is Send but not Sync.
        let (result, back) =
            py.allow_threads(move || (rx.recv_timeout(Duration::from_millis(50)), rx));
        rx = back;
        match result {
            Ok(value) => return Ok(value),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if let Err(e) = py.check_signals() {
                    bridge.stdin.cancel();
                    return Err(e);
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(PyEOFError::new_err("input request cancelled"));
            }
        }
    }
}

/// The other replicas' namespace digests, for checking that they agree; an
/// empty list with a single replica.
/// Whether an interrupt came for the cell of `msg_id` before it could take
/// SIGINT; clears any pending interrupt.
#[pyfunction]
fn take_interrupt(msg_id: &str) -> PyResult<bool> {
    let pending = bridge()?
        .interrupt_pending
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    Ok(pending.as_deref() == Some(msg_id))
}

#[pyfunction]
fn peer_digests(py: Python<'_>) -> PyResult<Vec<(u64, String)>> {
    let bridge = bridge()?;
    match bridge.group.get() {
        None => Ok(Vec::new()),
        Some(g) => py
            .allow_threads(|| g.peer_digests())
            .map_err(PyRuntimeError::new_err),
    }
}

/// The group's placement as JSON, or None with a single replica.
#[pyfunction]
fn placement(py: Python<'_>) -> PyResult<Option<String>> {
    let bridge = bridge()?;
    Ok(py.allow_threads(|| bridge.group.get().map(|g| g.placement())))
}

#[pymodule]
pub fn _notebookos(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(take_interrupt, m)?)?;
    m.add_function(wrap_pyfunction!(peer_digests, m)?)?;
    m.add_function(wrap_pyfunction!(placement, m)?)?;
    m.add_function(wrap_pyfunction!(publish, m)?)?;
    m.add_function(wrap_pyfunction!(stream, m)?)?;
    m.add_function(wrap_pyfunction!(flush, m)?)?;
    m.add_function(wrap_pyfunction!(input_request, m)?)?;
    m.add_function(wrap_pyfunction!(super::digest::digest_buffers, m)?)?;
    m.add_function(wrap_pyfunction!(super::jobs::serve_comms, m)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn validates_known_iopub_contents() {
        assert!(validate("stream", json!({"name": "stdout", "text": "x"})).is_ok());
        assert!(validate("stream", json!({"name": "stdout"})).is_err());
        assert!(validate("display_data", json!({"data": {"text/plain": "1"}})).is_ok());
        assert!(validate("execute_reply", json!({})).is_err());
        assert!(validate("comm_msg", json!({"comm_id": "c", "data": {}})).is_ok());
    }
}
