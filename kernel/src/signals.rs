//! SIGINT routing: only the Python thread may receive it.
//!
//! Jupyter's "signal" interrupt mode sends SIGINT to the kernel's process
//! group, and a message-mode interrupt is turned into the same signal. The
//! signal must land on the Python thread: that wakes a blocking `sleep` or
//! `read` with EINTR and lets Python's own handler raise KeyboardInterrupt.
//! So every other thread blocks SIGINT (the mask is inherited by threads
//! spawned after [`block_sigint_in_this_thread`]) and the Python thread
//! unblocks it.

use std::io;

fn set_sigint_mask(how: libc::c_int) -> io::Result<()> {
    // SAFETY: plain libc calls on a locally owned, initialised sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        let rc = libc::pthread_sigmask(how, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
    }
    Ok(())
}

/// Call first thing in `main`, before any other thread exists.
pub fn block_sigint_in_this_thread() -> io::Result<()> {
    set_sigint_mask(libc::SIG_BLOCK)
}

pub fn unblock_sigint_in_this_thread() -> io::Result<()> {
    set_sigint_mask(libc::SIG_UNBLOCK)
}

/// Until Python installs its handler, a SIGINT must not kill the kernel
/// (the default action), so it is ignored.
pub fn ignore_sigint() {
    // SAFETY: setting a disposition to SIG_IGN has no handler to be unsafe in.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
    }
}

/// A handle that can interrupt the thread it was created on.
#[derive(Debug, Clone, Copy)]
pub struct ThreadInterrupter {
    thread: libc::pthread_t,
}

impl ThreadInterrupter {
    pub fn current() -> Self {
        // SAFETY: pthread_self has no preconditions.
        Self {
            thread: unsafe { libc::pthread_self() },
        }
    }

    pub fn interrupt(&self) -> io::Result<()> {
        // SAFETY: the thread is the Python thread, which lives as long as
        // the process (it is never joined), so the id stays valid.
        let rc = unsafe { libc::pthread_kill(self.thread, libc::SIGINT) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(())
    }
}
