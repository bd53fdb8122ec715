//! Wakes the main Python thread's asyncio loop when a request arrives for it.
//!
//! Between requests the main thread runs the shell's asyncio loop, as
//! ipykernel's shell always does, so tasks a cell scheduled go on running.
//! The loop watches this eventfd and stops when it becomes readable; each
//! queued job rings it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

pub struct Wakeup(OwnedFd);

impl Wakeup {
    pub fn new() -> std::io::Result<Self> {
        // SAFETY: eventfd has no memory preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Makes the descriptor readable until the loop drains it.
    pub fn ring(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own. A full
        // counter (EAGAIN) is already readable, so the error is moot.
        unsafe {
            libc::write(
                self.0.as_raw_fd(),
                std::ptr::from_ref(&one).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }

    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::Wakeup;

    fn readable(w: &Wakeup) -> bool {
        let mut n: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64.
        let r = unsafe {
            libc::read(
                w.fd(),
                std::ptr::from_mut(&mut n).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        r == 8 && n > 0
    }

    #[test]
    fn a_ring_is_read_once() {
        let w = Wakeup::new().unwrap();
        assert!(!readable(&w));
        w.ring();
        w.ring();
        assert!(readable(&w));
        assert!(!readable(&w));
    }
}
