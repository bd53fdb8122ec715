//! Moving namespace changes between replicas. The shim's `StateSync` pickles
//! (protocol 5, large buffers out of band); this side packs its header and
//! buffers into one byte string for the log or the bulk stream, and unpacks
//! them on the other replicas as writable buffers for unpickling.
//!
//! Layout: `[count u32][header len u64][(offset u64, len u64) × count][header]`,
//! then each buffer at its offset. Offsets rise and buffers do not overlap; a
//! buffer starts on a 64-byte boundary (arrays built on it are aligned), or,
//! when the maker will back its own array with the delta's pages, at the
//! array's own offset within a page (see [`Part::page_offset`]).

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

/// One buffer of a delta and where it should start within a page.
#[derive(Clone, Copy)]
pub struct Part<'a> {
    pub data: &'a [u8],
    /// `Some(o)`: start at offset `o` modulo the page size, so that the pages of
    /// the source can later be mapped onto those of the delta.
    pub page_offset: Option<usize>,
}

const ALIGN: usize = 64;

/// The offset of each part and the total length.
fn layout(header: &[u8], parts: &[Part<'_>]) -> (Vec<usize>, usize) {
    let mut at = 4 + 8 + 16 * parts.len() + header.len();
    let offsets = parts
        .iter()
        .map(|p| {
            at = match p.page_offset {
                Some(o) => {
                    let page = raft_transport::shm::page_size();
                    let o = o % page;
                    at + (o + page - at % page) % page
                }
                None => at.next_multiple_of(ALIGN),
            };
            let start = at;
            at += p.data.len();
            start
        })
        .collect();
    (offsets, at)
}

/// One pickled namespace change (or a whole checkpoint), packed. The copy
/// is what makes it a snapshot later cells cannot tear; large ones are
/// copied on every core, into a sealed shared-memory blob. Returns the packed
/// bytes and each part's offset in them.
pub fn pack_parts(header: &[u8], parts: &[Part<'_>]) -> (Bytes, Vec<usize>) {
    let (offsets, len) = layout(header, parts);
    if len >= SHARED {
        match raft_transport::shm::sealed(len, |out| fill(out, header, parts, &offsets)) {
            Ok(blob) => return (blob, offsets),
            Err(e) => tracing::debug!(error = %e, "state delta kept in private memory"),
        }
    }
    let mut out = vec![0; len];
    fill(&mut out, header, parts, &offsets);
    (Bytes::from(out), offsets)
}

/// [`pack_parts`] with every buffer 64-byte aligned.
pub fn pack(header: &[u8], buffers: &[&[u8]]) -> Bytes {
    let parts: Vec<Part<'_>> = buffers
        .iter()
        .map(|data| Part {
            data,
            page_offset: None,
        })
        .collect();
    pack_parts(header, &parts).0
}

/// Writes the layout into `out` (zeroed, exactly as long as it needs).
fn fill(out: &mut [u8], header: &[u8], parts: &[Part<'_>], offsets: &[usize]) {
    let mut at = 0;
    let mut put = |bytes: &[u8]| {
        out[at..at + bytes.len()].copy_from_slice(bytes);
        at += bytes.len();
    };
    put(&(parts.len() as u32).to_le_bytes());
    put(&(header.len() as u64).to_le_bytes());
    for (p, off) in parts.iter().zip(offsets) {
        put(&(*off as u64).to_le_bytes());
        put(&(p.data.len() as u64).to_le_bytes());
    }
    put(header);
    // Pairs of (destination, source) chunks; large deltas spread over the threads.
    let mut pieces: Vec<(&mut [u8], &[u8])> = Vec::new();
    let mut rest = &mut out[at..];
    let mut rest_at = at;
    for (p, off) in parts.iter().zip(offsets) {
        let (_, tail) = rest.split_at_mut(off - rest_at);
        let (dst, tail) = tail.split_at_mut(p.data.len());
        rest = tail;
        rest_at = off + p.data.len();
        pieces.extend(dst.chunks_mut(COPY_CHUNK).zip(p.data.chunks(COPY_CHUNK)));
    }
    let data: usize = parts.iter().map(|p| p.data.len()).sum();
    if data < PARALLEL_COPY {
        for (dst, src) in pieces {
            dst.copy_from_slice(src);
        }
        return;
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
    let word = |at: usize| -> Result<u64, CorruptDelta> {
        let raw = data
            .get(at..at + 8)
            .ok_or(CorruptDelta("truncated table"))?;
        Ok(u64::from_le_bytes(
            raw.try_into().map_err(|_| CorruptDelta("table"))?,
        ))
    };
    let raw = data.get(..4).ok_or(CorruptDelta("truncated table"))?;
    let count = u32::from_le_bytes(raw.try_into().map_err(|_| CorruptDelta("count"))?) as usize;
    // Each entry takes 16 bytes, so a count larger than the data is a lie.
    if count > data.len() / 16 {
        return Err(CorruptDelta("buffer count"));
    }
    let size = |v: u64| usize::try_from(v).map_err(|_| CorruptDelta("length"));
    let header_len = size(word(4)?)?;
    let mut at = (12 + 16 * count)
        .checked_add(header_len)
        .ok_or(CorruptDelta("length"))?;
    if at > data.len() {
        return Err(CorruptDelta("truncated data"));
    }
    let header = data.slice(12 + 16 * count..at);
    let mut parts = Vec::with_capacity(count);
    for i in 0..count {
        let (off, len) = (size(word(12 + 16 * i)?)?, size(word(20 + 16 * i)?)?);
        if off < at {
            return Err(CorruptDelta("overlapping buffers"));
        }
        let end = off.checked_add(len).ok_or(CorruptDelta("length"))?;
        if end > data.len() {
            return Err(CorruptDelta("truncated data"));
        }
        parts.push(data.slice(off..end));
        at = end;
    }
    if at != data.len() {
        return Err(CorruptDelta("trailing bytes"));
    }
    Ok((header, parts))
}

/// Buffers smaller than this are copied into the delta and left alone; larger
/// ones the shim vouches for may be backed by the delta's own pages afterwards.
const BACK_WITH_DELTA: usize = 1 << 20;

/// Whether the replica that ran a cell swaps its arrays' pages for the delta's
/// (`NOTEBOOKOS_SHARE_PAGES`). Sharing makes one physical copy per host, but
/// the first write to each page afterwards copies that page (a copy-on-write
/// fault): an in-place update of a large array then takes several times as long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharePages {
    Always,
    Never,
    /// Only while memory is short: less than a quarter of the host's is available.
    WhenShort,
}

impl SharePages {
    pub fn from_env() -> Self {
        match std::env::var("NOTEBOOKOS_SHARE_PAGES").as_deref() {
            Ok("always") => Self::Always,
            Ok("never") => Self::Never,
            Ok("when-short") | Err(_) => Self::WhenShort,
            Ok(other) => {
                tracing::warn!(
                    value = other,
                    "NOTEBOOKOS_SHARE_PAGES is 'always', 'never' or 'when-short'; using when-short"
                );
                Self::WhenShort
            }
        }
    }

    fn now(self) -> bool {
        match self {
            Self::Always => true,
            Self::Never => false,
            Self::WhenShort => memory_is_short(),
        }
    }
}

fn memory_is_short() -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/meminfo") else {
        return false;
    };
    let field = |name: &str| -> Option<u64> {
        let line = info.lines().find(|l| l.starts_with(name))?;
        line[name.len()..].split_whitespace().next()?.parse().ok()
    };
    match (field("MemAvailable:"), field("MemTotal:")) {
        (Some(available), Some(total)) => available < total / 4,
        _ => false,
    }
}

static SHARE_PAGES: std::sync::OnceLock<SharePages> = std::sync::OnceLock::new();

/// Calls `method` on the shim's kernel (returning `(header, [buffers],
/// [shareable])`) and packs the result.
///
/// One copy per host: a shareable buffer is a numpy array that alone owns
/// memory from the default allocator, in a process where no thread but the
/// kernel's runs (the shim checks both). After the copy, if [`SharePages`]
/// says so, its pages are replaced by the sealed delta's, copy-on-write: the
/// maker and every local peer then share one physical copy of the array until
/// someone writes to it. (Peers always map the delta; this is about the maker.)
fn capture<'py>(
    kernel: &Bound<'py, PyAny>,
    method: &str,
    args: impl IntoPyObject<'py, Target = pyo3::types::PyTuple>,
) -> PyResult<Bytes> {
    let result = kernel.call_method1(method, args)?;
    let (header, buffers, shareable): (Bound<'_, PyBytes>, Bound<'_, PyList>, Vec<bool>) =
        result.extract()?;
    let py = kernel.py();
    let mut held = Vec::with_capacity(buffers.len());
    for b in buffers.iter() {
        held.push(PyBuffer::<u8>::get(&b)?);
    }
    let mut copies = Vec::with_capacity(held.len());
    let mut backed = Vec::with_capacity(held.len());
    for (i, buf) in held.iter().enumerate() {
        if buf.is_c_contiguous() {
            // SAFETY: the buffer is C-contiguous, of u8, and kept alive (and the GIL held)
            // while the slice is read.
            let slice =
                unsafe { std::slice::from_raw_parts(buf.buf_ptr() as *const u8, buf.len_bytes()) };
            copies.push(std::borrow::Cow::Borrowed(slice));
            backed.push(shareable.get(i) == Some(&true) && slice.len() >= BACK_WITH_DELTA);
        } else {
            copies.push(std::borrow::Cow::Owned(buf.to_vec(py)?));
            backed.push(false);
        }
    }
    let parts: Vec<Part<'_>> = copies
        .iter()
        .zip(&backed)
        .map(|(c, &back)| Part {
            data: c.as_ref(),
            page_offset: back.then(|| c.as_ptr() as usize % raft_transport::shm::page_size()),
        })
        .collect();
    // The buffers are held; the cell is over, so only a thread the user left
    // running could write to them meanwhile (and then none is backed).
    let head = header.as_bytes();
    let (packed, offsets) = py.allow_threads(|| pack_parts(head, &parts));
    let share = backed.contains(&true) && SHARE_PAGES.get_or_init(SharePages::from_env).now();
    if share && raft_transport::shm::handle(&packed).is_some() {
        let mut moved = 0;
        for ((part, offset), _) in parts.iter().zip(&offsets).zip(&backed).filter(|(_, b)| **b) {
            // SAFETY: the shim vouched that nothing but this thread writes to the
            // array and no device holds its pages; the GIL is held again, and the
            // bytes at `offset` are a copy of these very bytes.
            match unsafe {
                raft_transport::shm::back_with(
                    &packed,
                    *offset,
                    part.data.as_ptr(),
                    part.data.len(),
                )
            } {
                Ok(n) => moved += n,
                Err(e) => tracing::debug!(error = %e, "an array keeps its own copy"),
            }
        }
        if moved > 0 {
            tracing::debug!(bytes = moved, "arrays now share the delta's pages");
        }
    }
    Ok(packed)
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
