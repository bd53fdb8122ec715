//! One copy per host: a large blob lives in a sealed memory file (memfd) that replicas
//! on the same host map, instead of each receiving its own copy over QUIC.
//!
//! The maker writes the blob once into a memfd ([`sealed`]), then seals it against every
//! write, shrink and grow, so the bytes are immutable for as long as anyone maps them.
//! A peer on the same host gets a [`Handle`] (the maker's pid and descriptor number, and
//! a random token in the file's name) and maps the file copy-on-write ([`open_private`]):
//! its arrays sit on the very pages the maker wrote, and a write by the peer copies only
//! the page it touches, into that peer alone. The maker drops its mapping once every
//! peer has one; the pages live until the last mapping goes.
//!
//! Linux only; elsewhere [`sealed`] fails and callers keep the bytes in the heap.

use std::fmt;
use std::sync::Mutex;

use bytes::Bytes;

use crate::bulk::BlobHash;

/// Where a peer on the same host finds a sealed blob.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Handle {
    pub pid: u32,
    pub fd: i32,
    pub len: u64,
    pub token: [u8; 16],
}

impl Handle {
    pub const WIRE_LEN: usize = 4 + 4 + 8 + 16;

    pub fn encode(&self) -> [u8; Self::WIRE_LEN] {
        let mut out = [0u8; Self::WIRE_LEN];
        out[..4].copy_from_slice(&self.pid.to_le_bytes());
        out[4..8].copy_from_slice(&self.fd.to_le_bytes());
        out[8..16].copy_from_slice(&self.len.to_le_bytes());
        out[16..].copy_from_slice(&self.token);
        out
    }

    pub fn decode(raw: &[u8; Self::WIRE_LEN]) -> Self {
        let mut four = [0u8; 4];
        let mut eight = [0u8; 8];
        let mut token = [0u8; 16];
        four.copy_from_slice(&raw[..4]);
        let pid = u32::from_le_bytes(four);
        four.copy_from_slice(&raw[4..8]);
        let fd = i32::from_le_bytes(four);
        eight.copy_from_slice(&raw[8..16]);
        token.copy_from_slice(&raw[16..]);
        Self {
            pid,
            fd,
            len: u64::from_le_bytes(eight),
            token,
        }
    }
}

/// The memfd's name, which `/proc/PID/fd/FD` must link to: a descriptor number in a
/// recycled or foreign pid is refused rather than mapped.
fn blob_name(token: &[u8; 16]) -> String {
    let hex: String = token.iter().map(|b| format!("{b:02x}")).collect();
    format!("notebookos-blob-{hex}")
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shm:{}/{} ({} bytes)", self.pid, self.fd, self.len)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    #[error("{what}: {source}")]
    Os {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{0} is not the sealed blob it should be: {1}")]
    Mismatch(String, &'static str),
    #[error("shared memory blobs need Linux")]
    Unsupported,
}

fn os(what: &'static str) -> ShmError {
    ShmError::Os {
        what,
        source: std::io::Error::last_os_error(),
    }
}

/// What this process maps, by address, so that a blob's bytes can say what they are.
enum Kind {
    /// Made here and sealed: shareable through its descriptor.
    Sealed {
        fd: i32,
        token: [u8; 16],
        hash: Option<BlobHash>,
    },
    /// A peer's sealed blob, mapped copy-on-write: ours to write.
    Private,
}

struct Live {
    base: usize,
    len: usize,
    kind: Kind,
}

static LIVE: Mutex<Vec<Live>> = Mutex::new(Vec::new());

fn live() -> std::sync::MutexGuard<'static, Vec<Live>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// A mapping that unmaps (and closes its descriptor) when the last `Bytes` on it goes.
struct Mapping {
    ptr: *mut u8,
    len: usize,
    fd: Option<i32>,
}

// SAFETY: the mapping is plain memory owned by this value; nothing else unmaps it.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl AsRef<[u8]> for Mapping {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `ptr` maps `len` readable bytes until drop.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        live().retain(|l| l.base != self.ptr as usize);
        #[cfg(target_os = "linux")]
        // SAFETY: our own mapping and descriptor, released once.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
            if let Some(fd) = self.fd {
                libc::close(fd);
            }
        }
    }
}

fn token() -> [u8; 16] {
    let mut t = [0u8; 16];
    #[cfg(target_os = "linux")]
    {
        use std::io::Read;
        if std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut t))
            .is_ok()
        {
            return t;
        }
    }
    // Unique within this process is enough for the name check; pid and time spread it.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    t[..12].copy_from_slice(&nanos.to_le_bytes()[..12]);
    t[12..].copy_from_slice(&std::process::id().to_le_bytes());
    t
}

/// A blob of `len` bytes written by `fill` into a new memfd, then sealed and mapped
/// read-only. Peers on this host can map it through [`handle`].
#[cfg(target_os = "linux")]
pub fn sealed(len: usize, fill: impl FnOnce(&mut [u8])) -> Result<Bytes, ShmError> {
    use std::ffi::CString;
    if len == 0 {
        return Err(ShmError::Mismatch(
            "an empty blob".into(),
            "nothing to share",
        ));
    }
    let token = token();
    let name = CString::new(blob_name(&token)).map_err(|_| ShmError::Unsupported)?;
    // SAFETY: plain syscalls on a descriptor and mappings this function owns; every
    // error path closes or unmaps what it made.
    unsafe {
        let fd = libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING);
        if fd < 0 {
            return Err(os("memfd_create"));
        }
        let fail = |what| {
            let e = os(what);
            libc::close(fd);
            e
        };
        if libc::ftruncate(fd, len as libc::off_t) != 0 {
            return Err(fail("ftruncate"));
        }
        let rw = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        );
        if rw == libc::MAP_FAILED {
            return Err(fail("mmap"));
        }
        fill(std::slice::from_raw_parts_mut(rw.cast::<u8>(), len));
        // A writable shared mapping would keep the write seal from being added.
        libc::munmap(rw, len);
        let seals =
            libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        if libc::fcntl(fd, libc::F_ADD_SEALS, seals) != 0 {
            return Err(fail("sealing"));
        }
        let ro = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd,
            0,
        );
        if ro == libc::MAP_FAILED {
            return Err(fail("mmap"));
        }
        let ptr = ro.cast::<u8>();
        live().push(Live {
            base: ptr as usize,
            len,
            kind: Kind::Sealed {
                fd,
                token,
                hash: None,
            },
        });
        Ok(Bytes::from_owner(Mapping {
            ptr,
            len,
            fd: Some(fd),
        }))
    }
}

#[cfg(not(target_os = "linux"))]
pub fn sealed(_len: usize, _fill: impl FnOnce(&mut [u8])) -> Result<Bytes, ShmError> {
    Err(ShmError::Unsupported)
}

/// The handle of a whole sealed blob made here, if `data` is one.
pub fn handle(data: &Bytes) -> Option<Handle> {
    let base = data.as_ptr() as usize;
    live().iter().find_map(|l| match l.kind {
        Kind::Sealed { fd, token, .. } if l.base == base && l.len == data.len() => Some(Handle {
            pid: std::process::id(),
            fd,
            len: l.len as u64,
            token,
        }),
        _ => None,
    })
}

/// The hash of a sealed blob made here, computed once (the bytes cannot change).
pub fn sealed_hash(data: &Bytes) -> Option<BlobHash> {
    let base = data.as_ptr() as usize;
    let known = live().iter().find_map(|l| match l.kind {
        Kind::Sealed { hash, .. } if l.base == base && l.len == data.len() => Some(hash),
        _ => None,
    })?;
    if let Some(h) = known {
        return Some(h);
    }
    let h = BlobHash::of(data);
    for l in live().iter_mut() {
        if let Kind::Sealed { hash, .. } = &mut l.kind {
            if l.base == base {
                *hash = Some(h);
            }
        }
    }
    Some(h)
}

/// Whether `data` lies in a peer's blob mapped copy-on-write here, so that writing
/// through it changes this process's pages alone.
pub fn is_private(data: &Bytes) -> bool {
    let (start, end) = (data.as_ptr() as usize, data.as_ptr() as usize + data.len());
    live()
        .iter()
        .any(|l| matches!(l.kind, Kind::Private) && l.base <= start && end <= l.base + l.len)
}

/// Maps a peer's sealed blob copy-on-write, after checking that the descriptor is that
/// blob: the right name, length and seals.
#[cfg(target_os = "linux")]
pub fn open_private(h: &Handle) -> Result<Bytes, ShmError> {
    use std::os::fd::AsRawFd;
    let path = format!("/proc/{}/fd/{}", h.pid, h.fd);
    let link = std::fs::read_link(&path).map_err(|source| ShmError::Os {
        what: "reading the blob's descriptor",
        source,
    })?;
    let expected = format!("/memfd:{} (deleted)", blob_name(&h.token));
    if link.as_os_str() != expected.as_str() {
        return Err(ShmError::Mismatch(path, "another file"));
    }
    let file = std::fs::File::open(&path).map_err(|source| ShmError::Os {
        what: "opening the blob",
        source,
    })?;
    let len = file
        .metadata()
        .map_err(|source| ShmError::Os {
            what: "stat of the blob",
            source,
        })?
        .len();
    if len != h.len || len == 0 {
        return Err(ShmError::Mismatch(path, "another length"));
    }
    let len = usize::try_from(len).map_err(|_| ShmError::Mismatch(path.clone(), "too large"))?;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl and mmap on a descriptor we hold open; the mapping is ours.
    unsafe {
        let seals = libc::fcntl(fd, libc::F_GET_SEALS);
        let needed = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
        if seals < 0 || seals & needed != needed {
            return Err(ShmError::Mismatch(path, "not sealed"));
        }
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE,
            fd,
            0,
        );
        if p == libc::MAP_FAILED {
            return Err(os("mmap"));
        }
        let ptr = p.cast::<u8>();
        live().push(Live {
            base: ptr as usize,
            len,
            kind: Kind::Private,
        });
        // The mapping keeps the file's pages; the descriptor closes with `file`.
        Ok(Bytes::from_owner(Mapping { ptr, len, fd: None }))
    }
}

#[cfg(not(target_os = "linux"))]
pub fn open_private(_h: &Handle) -> Result<Bytes, ShmError> {
    Err(ShmError::Unsupported)
}

/// The system's page size.
pub fn page_size() -> usize {
    #[cfg(target_os = "linux")]
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    #[cfg(not(target_os = "linux"))]
    let size = 4096;
    usize::try_from(size).unwrap_or(4096).max(1)
}

/// Fewer mappings than Linux's default limit (65530), with room for the process.
const MAX_MAPPINGS: usize = 50_000;

/// Backs the whole pages of `len` bytes at `addr` with the same bytes of a sealed
/// blob made here, which start at `offset` in it: the memory becomes the blob's
/// pages, mapped copy-on-write, and its own copy is freed. Returns how many bytes
/// moved. Only anonymous private memory is remapped (not a file, shared or device
/// mapping), and only while the process is far from its mapping limit.
///
/// # Safety
/// The bytes at `addr` must equal the blob's at `offset` and must not change while
/// this runs: nothing else may write to them (the copy and the remap must see the same
/// bytes, or a write in between is lost), and no device may hold their physical pages
/// (a pinned buffer registered for DMA would keep writing to the old pages).
#[cfg(target_os = "linux")]
pub unsafe fn back_with(
    blob: &Bytes,
    offset: usize,
    addr: *const u8,
    len: usize,
) -> Result<usize, ShmError> {
    let h = handle(blob).ok_or(ShmError::Mismatch("a heap blob".into(), "not shared"))?;
    let page = page_size();
    let start = (addr as usize).next_multiple_of(page);
    let end = (addr as usize + len) / page * page;
    if end <= start {
        return Ok(0);
    }
    let file_offset = offset + (start - addr as usize);
    if !file_offset.is_multiple_of(page) || offset + len > blob.len() {
        return Err(ShmError::Mismatch(
            "the blob".into(),
            "not laid out for these pages",
        ));
    }
    let maps = std::fs::read_to_string("/proc/self/maps").map_err(|source| ShmError::Os {
        what: "reading /proc/self/maps",
        source,
    })?;
    if maps.lines().count() > MAX_MAPPINGS {
        return Err(ShmError::Mismatch(
            "this process".into(),
            "too many mappings",
        ));
    }
    if !private_memory(&maps, start, end) {
        return Err(ShmError::Mismatch(
            format!("memory at {start:#x}"),
            "not anonymous private memory",
        ));
    }
    let p = libc::mmap(
        start as *mut libc::c_void,
        end - start,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_FIXED,
        h.fd,
        file_offset as libc::off_t,
    );
    if p == libc::MAP_FAILED {
        return Err(os("mmap"));
    }
    Ok(end - start)
}

/// Whether `start..end` is covered, without a gap, by writable private mappings
/// that are anonymous or an earlier blob of ours (an array backed before, whose
/// old blob the new one replaces, so that blob is not kept alive by it).
fn private_memory(maps: &str, start: usize, end: usize) -> bool {
    let mut spans: Vec<(usize, usize)> = maps
        .lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let (range, perms, _, _, inode) =
                (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
            let path: Vec<&str> = f.collect();
            let ours = match path.as_slice() {
                [] => inode == "0",
                [name, "(deleted)"] => name.starts_with("/memfd:notebookos-blob-"),
                _ => false,
            };
            if !(ours && perms.starts_with("rw") && perms.ends_with('p')) {
                return None;
            }
            let (lo, hi) = range.split_once('-')?;
            let (lo, hi) = (
                usize::from_str_radix(lo, 16).ok()?,
                usize::from_str_radix(hi, 16).ok()?,
            );
            (lo < end && start < hi).then_some((lo, hi))
        })
        .collect();
    spans.sort_unstable();
    let mut covered = start;
    for (lo, hi) in spans {
        if lo > covered {
            return false;
        }
        covered = covered.max(hi);
    }
    covered >= end
}

#[cfg(not(target_os = "linux"))]
pub unsafe fn back_with(
    _blob: &Bytes,
    _offset: usize,
    _addr: *const u8,
    _len: usize,
) -> Result<usize, ShmError> {
    Err(ShmError::Unsupported)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_blob_is_shared_copy_on_write() {
        let blob = sealed(3 << 20, |b| b.fill(7)).unwrap();
        assert!(blob.iter().all(|&b| b == 7));
        let h = handle(&blob).expect("a sealed blob has a handle");
        assert_eq!(Handle::decode(&h.encode()), h);
        assert!(!is_private(&blob));

        let copy = open_private(&h).unwrap();
        assert!(is_private(&copy) && is_private(&copy.slice(10..20)));
        assert_eq!(copy, blob);
        // Writing the private mapping leaves the sealed bytes alone.
        // SAFETY: a private, writable mapping of ours that nothing else reads now.
        unsafe { *(copy.as_ptr() as *mut u8) = 1 };
        assert_eq!((copy[0], blob[0]), (1, 7));

        // The maker's mapping can go first; the peer's pages stay.
        drop(blob);
        assert_eq!(copy[1], 7);
        let base = copy.as_ptr() as usize;
        drop(copy);
        assert!(
            !live().iter().any(|l| l.base == base),
            "unmapped with its last Bytes"
        );
    }

    #[test]
    fn a_sealed_blob_cannot_be_written_through_its_descriptor() {
        let blob = sealed(4096, |b| b.fill(1)).unwrap();
        let h = handle(&blob).unwrap();
        let n = unsafe { libc::pwrite(h.fd, [0u8].as_ptr().cast(), 1, 0) };
        assert_eq!(n, -1, "the write seal holds");
        assert_eq!(sealed_hash(&blob), Some(BlobHash::of(&blob)));
    }

    #[test]
    fn anonymous_memory_can_be_backed_by_a_blob() {
        let page = page_size();
        let len = 64 * page;
        // SAFETY: a fresh anonymous mapping of ours.
        let anon = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(anon, libc::MAP_FAILED);
        // A source that starts mid-page, laid out at the same offset within a page.
        let src = unsafe { anon.cast::<u8>().add(100) };
        let n = len - 200;
        let mem = unsafe { std::slice::from_raw_parts_mut(src, n) };
        for (i, x) in mem.iter_mut().enumerate() {
            *x = (i % 253) as u8;
        }
        let offset = 100;
        let blob = sealed(offset + n, |b| b[offset..].copy_from_slice(mem)).unwrap();
        let moved = unsafe { back_with(&blob, offset, src, n) }.unwrap();
        assert_eq!(moved, len - 2 * page);
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let at = format!("{:x}-", anon as usize + page);
        assert!(
            maps.lines()
                .any(|l| l.starts_with(&at) && l.contains("/memfd:notebookos-blob-")),
            "{maps}"
        );
        // Same bytes; writes stay private to the array and leave the blob alone.
        assert!(mem.iter().enumerate().all(|(i, &x)| x == (i % 253) as u8));
        mem[page] ^= 0xff;
        assert_eq!(blob[offset + page], (page % 253) as u8);
        assert_eq!(mem[page], ((page % 253) as u8) ^ 0xff);
        // The blob can go; the memory stays.
        drop(blob);
        assert_eq!(mem[2 * page], ((2 * page) % 253) as u8);
        unsafe { libc::munmap(anon, len) };
    }

    #[test]
    fn memory_to_back_is_covered_by_private_mappings_without_a_gap() {
        let maps = "\
1000-3000 rw-p 00000000 00:00 0
3000-5000 rw-p 00000000 00:01 77 /memfd:notebookos-blob-ab (deleted)
5000-6000 rw-p 00000000 00:00 0
7000-8000 rw-p 00000000 00:00 0
8000-9000 rw-s 00000000 00:01 78 /memfd:notebookos-blob-cd (deleted)
9000-a000 rw-p 00000000 08:01 99 /data/file.bin
";
        assert!(private_memory(maps, 0x1000, 0x6000));
        assert!(private_memory(maps, 0x2000, 0x4000));
        assert!(!private_memory(maps, 0x5000, 0x7800), "a gap");
        assert!(!private_memory(maps, 0x8000, 0x9000), "shared");
        assert!(!private_memory(maps, 0x9000, 0xa000), "a file");
    }

    #[test]
    fn only_anonymous_memory_is_backed() {
        let blob = sealed(16 * page_size(), |b| b.fill(1)).unwrap();
        // Another sealed blob's pages are a shared file mapping, not anonymous memory.
        let other = sealed(16 * page_size(), |b| b.fill(1)).unwrap();
        let r = unsafe { back_with(&blob, 0, other.as_ptr(), other.len()) };
        assert!(matches!(r, Err(ShmError::Mismatch(..))), "{r:?}");
        // A heap blob cannot back anything.
        let heap = Bytes::from(vec![1u8; 4096]);
        assert!(unsafe { back_with(&heap, 0, other.as_ptr(), 4096) }.is_err());
    }

    #[test]
    fn a_wrong_handle_is_refused() {
        let blob = sealed(4096, |b| b.fill(1)).unwrap();
        let h = handle(&blob).unwrap();
        let wrong_token = Handle {
            token: [0; 16],
            ..h
        };
        assert!(matches!(
            open_private(&wrong_token),
            Err(ShmError::Mismatch(..))
        ));
        let wrong_len = Handle { len: 8192, ..h };
        assert!(matches!(
            open_private(&wrong_len),
            Err(ShmError::Mismatch(..))
        ));
        let no_such_fd = Handle { fd: 100_000, ..h };
        assert!(open_private(&no_such_fd).is_err());
        // A plain heap blob has no handle.
        assert!(handle(&Bytes::from(vec![1u8; 4096])).is_none());
    }
}
