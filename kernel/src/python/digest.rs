//! `_notebookos.digest(parts)`: the digest the shim compares to tell whether a
//! value changed since the last cell. xxh3-128 over fixed 8 MiB chunks, hashed
//! on every core with the GIL released, then over the chunks' digests: the
//! same bytes give the same digest whatever the number of threads, so replicas
//! on different hosts agree. Not cryptographic: replicas trust each other,
//! and the question is only "did this change", at memory speed.

use std::num::NonZeroUsize;

use pyo3::buffer::PyBuffer;
use pyo3::prelude::*;
use xxhash_rust::xxh3::{xxh3_128, Xxh3};

const CHUNK: usize = 8 << 20;
/// Below this a single thread is faster than starting others.
const PARALLEL_FROM: usize = 32 << 20;

/// The digest of the concatenation of `parts`, as 16 bytes.
pub fn digest(parts: &[&[u8]]) -> [u8; 16] {
    let chunks: Vec<&[u8]> = parts
        .iter()
        .flat_map(|p| p.chunks(CHUNK).chain(p.is_empty().then_some(&p[..])))
        .collect();
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let threads = std::thread::available_parallelism()
        .map(NonZeroUsize::get)
        .unwrap_or(1)
        .min(chunks.len().max(1));
    let hashes: Vec<u128> = if total < PARALLEL_FROM || threads < 2 {
        chunks.iter().map(|c| xxh3_128(c)).collect()
    } else {
        let per = chunks.len().div_ceil(threads);
        std::thread::scope(|s| {
            let workers: Vec<_> = chunks
                .chunks(per)
                .map(|group| s.spawn(move || group.iter().map(|c| xxh3_128(c)).collect::<Vec<_>>()))
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap_or_default())
                .collect()
        })
    };
    let mut outer = Xxh3::new();
    for part in parts {
        outer.update(&(part.len() as u64).to_le_bytes());
    }
    for h in &hashes {
        outer.update(&h.to_le_bytes());
    }
    outer.digest128().to_le_bytes()
}

/// The digest of a sequence of bytes-like objects (each C-contiguous, as the
/// pickle buffers `PickleBuffer.raw()` gives). The buffers are held, so they
/// stay alive while the GIL is released; a thread that writes to one meanwhile
/// gives a digest of neither version, which only makes the value look changed.
#[pyfunction]
pub fn digest_buffers(py: Python<'_>, parts: Vec<PyBuffer<u8>>) -> PyResult<[u8; 16]> {
    let mut slices = Vec::with_capacity(parts.len());
    for buf in &parts {
        if !buf.is_c_contiguous() {
            return Err(pyo3::exceptions::PyBufferError::new_err(
                "digest_buffers needs contiguous buffers",
            ));
        }
        // SAFETY: C-contiguous u8 buffers, kept alive by `parts` until we return.
        let slice =
            unsafe { std::slice::from_raw_parts(buf.buf_ptr() as *const u8, buf.len_bytes()) };
        slices.push(slice);
    }
    Ok(py.allow_threads(|| digest(&slices)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_bytes_equal_digests_and_any_change_shows() {
        let big: Vec<u8> = (0..(PARALLEL_FROM + 3 * CHUNK + 17))
            .map(|i| (i * 31) as u8)
            .collect();
        let d = digest(&[&big]);
        assert_eq!(d, digest(&[&big.clone()]));
        let mut changed = big.clone();
        *changed.last_mut().unwrap() ^= 1;
        assert_ne!(d, digest(&[&changed]));
        changed = big.clone();
        changed[CHUNK] ^= 1;
        assert_ne!(d, digest(&[&changed]));
    }

    #[test]
    fn how_bytes_split_into_parts_counts() {
        assert_ne!(digest(&[b"ab", b"c"]), digest(&[b"a", b"bc"]));
        assert_ne!(digest(&[b"", b"x"]), digest(&[b"x"]));
        assert_ne!(digest(&[]), digest(&[b""]));
    }

    #[test]
    fn parallel_and_serial_agree() {
        // The serial path hashes the same chunks; compare against it directly.
        let big = vec![7u8; PARALLEL_FROM + CHUNK];
        let serial: Vec<u128> = big.chunks(CHUNK).map(xxh3_128).collect();
        let mut outer = Xxh3::new();
        outer.update(&(big.len() as u64).to_le_bytes());
        for h in &serial {
            outer.update(&h.to_le_bytes());
        }
        assert_eq!(digest(&[&big]), outer.digest128().to_le_bytes());
    }
}
