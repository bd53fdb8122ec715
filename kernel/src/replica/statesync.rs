//! Moving namespace changes between replicas. The shim's `StateSync` pickles
//! (protocol 5, large buffers out of band); this side packs its header and
//! buffers into one byte string for the log or the bulk stream, and unpacks
//! them on the other replicas as writable buffers for unpickling.
//!
//! Layout: `[count u32][header len u64][buffer lens u64 × count][header][buffers]`.

use std::cell::UnsafeCell;
use std::sync::Arc;

use bytes::Bytes;
use pyo3::buffer::PyBuffer;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyList};

use crate::python::{Executor, PythonError};

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("corrupt state delta: {0}")]
pub struct CorruptDelta(&'static str);

/// Below this the copy is not split across threads.
const PARALLEL_COPY: usize = 64 << 20;
const COPY_CHUNK: usize = 16 << 20;

/// Deltas at least this large are made in shared memory, which replicas on this
/// host map instead of receiving a copy (one copy per host).
const SHARED: usize = 1 << 20;

/// One pickled namespace change (or a whole checkpoint), packed. The copy
/// is what makes it a snapshot later cells cannot tear; large ones are
/// copied on every core, into a sealed shared-memory blob.
pub fn pack(header: &[u8], buffers: &[&[u8]]) -> Bytes {
    let len =
        4 + 8 * (1 + buffers.len()) + header.len() + buffers.iter().map(|b| b.len()).sum::<usize>();
    if len >= SHARED {
        match raft_transport::shm::sealed(len, |out| fill(out, header, buffers)) {
            Ok(blob) => return blob,
            Err(e) => tracing::debug!(error = %e, "state delta kept in private memory"),
        }
    }
    let mut out = vec![0; len];
    fill(&mut out, header, buffers);
    Bytes::from(out)
}

/// Writes the layout into `out`, which is exactly as long as it needs.
fn fill(out: &mut [u8], header: &[u8], buffers: &[&[u8]]) {
    let mut at = 0;
    let mut put = |bytes: &[u8]| {
        out[at..at + bytes.len()].copy_from_slice(bytes);
        at += bytes.len();
    };
    put(&(buffers.len() as u32).to_le_bytes());
    put(&(header.len() as u64).to_le_bytes());
    for b in buffers {
        put(&(b.len() as u64).to_le_bytes());
    }
    put(header);
    let mut rest = &mut out[at..];
    let data: usize = buffers.iter().map(|b| b.len()).sum();
    if data < PARALLEL_COPY {
        for b in buffers {
            let (dst, tail) = rest.split_at_mut(b.len());
            dst.copy_from_slice(b);
            rest = tail;
        }
        return;
    }
    // Pairs of (destination, source) chunks, spread over the threads.
    let mut pieces: Vec<(&mut [u8], &[u8])> = Vec::new();
    for b in buffers {
        let (dst, tail) = rest.split_at_mut(b.len());
        rest = tail;
        pieces.extend(dst.chunks_mut(COPY_CHUNK).zip(b.chunks(COPY_CHUNK)));
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = pieces.len().div_ceil(threads.max(1));
    std::thread::scope(|s| {
        for group in pieces.chunks_mut(per.max(1)) {
            s.spawn(move || {
                for (dst, src) in group.iter_mut() {
                    dst.copy_from_slice(src);
                }
            });
        }
    });
}

/// The header and buffers, as slices of `data` (no copy).
pub fn unpack(data: &Bytes) -> Result<(Bytes, Vec<Bytes>), CorruptDelta> {
    let word = |at: usize, n: usize| data.get(at..at + n).ok_or(CorruptDelta("truncated table"));
    let count =
        u32::from_le_bytes(word(0, 4)?.try_into().map_err(|_| CorruptDelta("count"))?) as usize;
    // Each length takes 8 bytes, so a count larger than the data is a lie.
    if count > data.len() / 8 {
        return Err(CorruptDelta("buffer count"));
    }
    let mut lens = Vec::with_capacity(count + 1);
    for i in 0..=count {
        let raw = word(4 + 8 * i, 8)?;
        let len = u64::from_le_bytes(raw.try_into().map_err(|_| CorruptDelta("length"))?);
        lens.push(usize::try_from(len).map_err(|_| CorruptDelta("length"))?);
    }
    let mut at = 4 + 8 * (count + 1);
    let mut parts = Vec::with_capacity(count + 1);
    for len in lens {
        let end = at.checked_add(len).ok_or(CorruptDelta("length"))?;
        if end > data.len() {
            return Err(CorruptDelta("truncated data"));
        }
        parts.push(data.slice(at..end));
        at = end;
    }
    if at != data.len() {
        return Err(CorruptDelta("trailing bytes"));
    }
    let header = parts.remove(0);
    Ok((header, parts))
}

/// Calls `method` on the shim's kernel (returning `(header, [buffers])`) and packs the result.
fn capture<'py>(
    kernel: &Bound<'py, PyAny>,
    method: &str,
    args: impl IntoPyObject<'py, Target = pyo3::types::PyTuple>,
) -> PyResult<Bytes> {
    let result = kernel.call_method1(method, args)?;
    let (header, buffers): (Bound<'_, PyBytes>, Bound<'_, PyList>) = result.extract()?;
    let py = kernel.py();
    let mut held = Vec::with_capacity(buffers.len());
    for b in buffers.iter() {
        held.push(PyBuffer::<u8>::get(&b)?);
    }
    let mut copies = Vec::with_capacity(held.len());
    for buf in &held {
        if buf.is_c_contiguous() {
            // SAFETY: the buffer is C-contiguous, of u8, and kept alive (and the GIL held)
            // while the slice is read.
            let slice =
                unsafe { std::slice::from_raw_parts(buf.buf_ptr() as *const u8, buf.len_bytes()) };
            copies.push(std::borrow::Cow::Borrowed(slice));
        } else {
            copies.push(std::borrow::Cow::Owned(buf.to_vec(py)?));
        }
    }
    let refs: Vec<&[u8]> = copies.iter().map(|c| c.as_ref()).collect();
    // The buffers are held; the cell is over, so only a thread the user left
    // running could write to them meanwhile.
    let head = header.as_bytes();
    Ok(py.allow_threads(|| pack(head, &refs)))
}

fn restore(kernel: &Bound<'_, PyAny>, method: &str, data: Bytes) -> PyResult<()> {
    let (header_bytes, buffers) =
        unpack(&data).map_err(|e| pyo3::exceptions::PyValueError::new_err(e.to_string()))?;
    let py = kernel.py();
    let header = PyBytes::new(py, &header_bytes);
    // Every slice must be gone for `data` to be ours alone.
    drop(header_bytes);
    let offsets: Vec<(usize, usize)> = buffers
        .iter()
        .map(|b| (b.as_ptr() as usize - data.as_ptr() as usize, b.len()))
        .collect();
    drop(buffers);
    let list = PyList::empty(py);
    // A peer's shared-memory delta mapped copy-on-write here: writes stay in this
    // process. (`Bytes` cannot tell whether an owner-backed blob has other handles;
    // the blob store let go of it before the apply, and a copy it served later
    // would fail the fetcher's hash check rather than pass for the original.)
    let owned = if raft_transport::shm::is_private(&data) {
        Ok(Received::Mapped(data))
    } else {
        data.try_into_mut()
            .map(|owned| Received::Owned(UnsafeCell::new(owned)))
    };
    match owned {
        // Usually ours alone: hand Python writable views of it, no copy.
        Ok(owned) => {
            let owned = Arc::new(owned);
            for (start, len) in offsets {
                list.append(Bound::new(
                    py,
                    DeltaBuffer {
                        owned: owned.clone(),
                        start,
                        len,
                    },
                )?)?;
            }
        }
        Err(shared) => {
            for (start, len) in offsets {
                let arr = PyByteArray::new_with(py, len, |dst| {
                    dst.copy_from_slice(&shared[start..start + len]);
                    Ok(())
                })?;
                list.append(arr)?;
            }
        }
    }
    kernel.call_method1(method, (header, list))?;
    Ok(())
}

/// A received delta, owned once; [`DeltaBuffer`]s are disjoint windows on it.
enum Received {
    Owned(UnsafeCell<bytes::BytesMut>),
    /// The only handle on a private, writable mapping of a peer's shared blob.
    Mapped(Bytes),
}

impl Received {
    fn base(&self) -> *mut u8 {
        match self {
            // SAFETY: nothing else holds a reference into the BytesMut.
            Self::Owned(cell) => unsafe { (*cell.get()).as_mut_ptr() },
            // The mapping is PROT_WRITE and MAP_PRIVATE, and no other Bytes shares it.
            Self::Mapped(bytes) => bytes.as_ptr() as *mut u8,
        }
    }
}

// SAFETY: the bytes are only reached through DeltaBuffers, each a disjoint
// range, and Python accesses them with the GIL held.
unsafe impl Sync for Received {}
unsafe impl Send for Received {}

/// One out-of-band pickle buffer of a received delta, exposed to Python as a
/// writable buffer (numpy arrays built on it stay writable), without a copy.
#[pyclass(frozen)]
struct DeltaBuffer {
    owned: Arc<Received>,
    start: usize,
    len: usize,
}

#[pymethods]
impl DeltaBuffer {
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut pyo3::ffi::Py_buffer,
        flags: std::os::raw::c_int,
    ) -> PyResult<()> {
        let this = slf.get();
        // SAFETY: start..start+len lies within the allocation (checked by unpack),
        // and the Arc keeps it alive as long as this object, which the view references.
        let ptr = this.owned.base().add(this.start);
        let len = isize::try_from(this.len)
            .map_err(|_| pyo3::exceptions::PyOverflowError::new_err("buffer too large"))?;
        if pyo3::ffi::PyBuffer_FillInfo(view, slf.as_ptr(), ptr.cast(), len, 0, flags) == -1 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }

    unsafe fn __releasebuffer__(&self, _view: *mut pyo3::ffi::Py_buffer) {}
}

/// After a cell on the winner: what changed, packed (a copy, so later cells
/// cannot tear it). Queued on the Python thread at once, so it runs before
/// any cell queued after this call; it starts once `after` resolves (or is
/// dropped), so that it does not compete with the reply for the CPU.
pub fn capture_delta(
    exec: &Executor,
    code: String,
    after: Option<tokio::sync::oneshot::Receiver<()>>,
    backlog: Arc<Backlog>,
) -> impl std::future::Future<Output = Result<Bytes, PythonError>> + Send + 'static {
    exec.queue(move |py, kernel| {
        py.allow_threads(|| {
            if let Some(after) = after {
                drop(after.blocking_recv());
            }
            backlog.enter();
        });
        capture(kernel, "sync_capture", (code,))
    })
}

/// Bounds how many captured deltas of one replica are not yet committed, so
/// memory stays bounded when cells come faster than their changes can be
/// shipped: the next capture waits on the Python thread, which delays the
/// next cell (never the reply of the one that just ran).
pub struct Backlog {
    limit: usize,
    count: std::sync::Mutex<usize>,
    freed: std::sync::Condvar,
}

impl Backlog {
    /// `NOTEBOOKOS_SYNC_BACKLOG` deltas (default 2).
    pub fn from_env() -> Self {
        let limit = std::env::var("NOTEBOOKOS_SYNC_BACKLOG")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|n| *n > 0)
            .unwrap_or(2);
        Self::new(limit)
    }

    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            count: std::sync::Mutex::new(0),
            freed: std::sync::Condvar::new(),
        }
    }

    /// Blocks until a delta may be captured, and counts it.
    pub fn enter(&self) {
        let mut count = self.count.lock().unwrap_or_else(|e| e.into_inner());
        while *count >= self.limit {
            count = self.freed.wait(count).unwrap_or_else(|e| e.into_inner());
        }
        *count += 1;
    }

    /// A counted delta is committed (or given up).
    pub fn leave(&self) {
        let mut count = self.count.lock().unwrap_or_else(|e| e.into_inner());
        *count = count.saturating_sub(1);
        self.freed.notify_one();
    }
}

pub async fn apply_delta(exec: &Executor, data: Bytes) -> Result<(), PythonError> {
    exec.run(move |_py, kernel| restore(kernel, "sync_apply", data))
        .await
}

pub async fn checkpoint(exec: &Executor) -> Result<Bytes, PythonError> {
    exec.run(|_py, kernel| capture(kernel, "sync_checkpoint", ()))
        .await
}

pub async fn restore_checkpoint(exec: &Executor, data: Bytes) -> Result<(), PythonError> {
    exec.run(move |_py, kernel| restore(kernel, "sync_restore", data))
        .await
}

pub async fn digest(exec: &Executor) -> Result<String, PythonError> {
    exec.run(|_py, kernel| kernel.call_method0("sync_digest")?.extract::<String>())
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_unpack_round_trip() {
        let data = pack(b"head", &[b"one", b"", b"three"]);
        let (h, bufs) = unpack(&data).unwrap();
        assert_eq!(&h[..], b"head");
        assert_eq!(
            bufs.iter().map(|b| b.to_vec()).collect::<Vec<_>>(),
            vec![b"one".to_vec(), vec![], b"three".to_vec()]
        );
        let empty = pack(b"", &[]);
        assert_eq!(unpack(&empty).unwrap().1.len(), 0);
    }

    #[test]
    fn large_buffers_pack_the_same_across_threads() {
        let a: Vec<u8> = (0..PARALLEL_COPY + 3 * COPY_CHUNK + 5)
            .map(|i| (i % 251) as u8)
            .collect();
        let b: Vec<u8> = (0..COPY_CHUNK / 2).map(|i| (i % 13) as u8).collect();
        let data = pack(b"h", &[&a, &[], &b]);
        let (h, bufs) = unpack(&data).unwrap();
        assert_eq!(&h[..], b"h");
        assert!(bufs[0] == a && bufs[1].is_empty() && bufs[2] == b);
    }

    #[test]
    fn the_backlog_admits_its_limit_then_waits_for_a_leave() {
        let backlog = Arc::new(Backlog::new(2));
        backlog.enter();
        backlog.enter();
        let (tx, rx) = std::sync::mpsc::channel();
        let b = backlog.clone();
        let third = std::thread::spawn(move || {
            b.enter();
            tx.send(()).unwrap();
        });
        // Not admitted while two are in flight.
        assert!(rx
            .recv_timeout(std::time::Duration::from_millis(100))
            .is_err());
        backlog.leave();
        rx.recv().unwrap();
        third.join().unwrap();
    }

    #[test]
    fn a_large_delta_is_packed_into_shared_memory() {
        let big = vec![5u8; SHARED];
        let data = pack(b"head", &[b"small", &big]);
        assert!(raft_transport::shm::handle(&data).is_some());
        let (h, bufs) = unpack(&data).unwrap();
        assert_eq!(
            (&h[..], &bufs[0][..], bufs[1].len()),
            (&b"head"[..], &b"small"[..], SHARED)
        );
        assert!(bufs[1].iter().all(|&b| b == 5));
        assert!(raft_transport::shm::handle(&pack(b"head", &[b"small"])).is_none());
    }

    #[test]
    fn corrupt_input_is_an_error() {
        let good = pack(b"head", &[b"one"]).to_vec();
        for cut in 0..good.len() {
            assert!(
                unpack(&Bytes::from(good[..cut].to_vec())).is_err(),
                "cut at {cut}"
            );
        }
        let mut extra = good.clone();
        extra.push(0);
        assert!(unpack(&Bytes::from(extra)).is_err());
        let mut huge = good.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(unpack(&Bytes::from(huge)).is_err());
        let mut long = good;
        long[4..12].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(unpack(&Bytes::from(long)).is_err());
    }
}
