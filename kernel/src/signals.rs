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

/// A pipe for Python's `signal.set_wakeup_fd`: CPython's C-level handler
/// writes the signal number to it the moment a signal lands, even while no
/// Python code runs. Returns (read end, write end); the write end is
/// non-blocking, as Python requires.
pub fn wakeup_pipe() -> io::Result<(std::fs::File, std::os::fd::OwnedFd)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills both descriptors on success; we own them after.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return Err(io::Error::last_os_error());
        }
        let flags = libc::fcntl(fds[1], libc::F_GETFL);
        libc::fcntl(fds[1], libc::F_SETFL, flags | libc::O_NONBLOCK);
        Ok((
            std::fs::File::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        ))
    }
}

/// Calls `on_sigint` for every SIGINT written to the wakeup pipe, on a
/// thread of its own, until the pipe closes.
pub fn watch_sigint(mut pipe: std::fs::File, on_sigint: impl Fn() + Send + 'static) {
    use std::io::Read;
    let spawned = std::thread::Builder::new()
        .name("sigint-watch".into())
        .spawn(move || {
            let mut buf = [0u8; 64];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        if buf[..n].contains(&(libc::SIGINT as u8)) {
                            on_sigint();
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return,
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot watch for SIGINT: {e}");
    }
}
