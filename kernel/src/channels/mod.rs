//! One module per Jupyter socket. Each owns its zmq socket in a task; the
//! rest of the kernel talks to it through channels.

pub mod control;
pub mod guard;
pub mod heartbeat;
pub mod iopub;
pub mod router;
pub mod shell;
pub mod stdin;

use std::path::PathBuf;
use std::sync::Arc;

use crate::wire::Signer;

/// The kernel's own session: its signing key and the session id stamped on
/// every message it sends.
#[derive(Debug)]
pub struct Session {
    pub signer: Signer,
    pub id: String,
}

impl Session {
    pub fn new(signer: Signer) -> Arc<Self> {
        Arc::new(Self {
            signer,
            id: uuid::Uuid::new_v4().to_string(),
        })
    }
}

/// Where the zmq sockets behind the guards listen: unix sockets in a
/// directory of this kernel's own (mode 0700), so that no other user can
/// reach them and the guard cannot be bypassed; and no TCP port is taken that
/// the connection file may have handed to another channel. Removed on drop.
#[derive(Debug)]
pub struct Backends {
    dir: PathBuf,
}

impl Backends {
    pub fn create() -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        // Short on purpose: a unix socket path must fit in 108 bytes.
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|d| d.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let id = uuid::Uuid::new_v4().simple().to_string();
        let dir = base.join(format!("nbos-{}", &id[..12]));
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        Ok(Self { dir })
    }

    fn socket(&self, channel: &str) -> PathBuf {
        self.dir.join(channel)
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), "cannot remove the sockets' directory: {e}");
        }
    }
}

/// A fresh zmq socket serving an endpoint from the connection file: the
/// socket listens in `backends`, behind a [`guard`] that owns the endpoint
/// and bounds what a client may send.
async fn bind<S: zeromq::Socket>(
    channel: &'static str,
    endpoint: &str,
    backends: &Backends,
) -> Result<S, ChannelError> {
    let mut socket = S::new();
    let inner = backends.socket(channel);
    socket
        .bind(&format!("ipc://{}", inner.display()))
        .await
        .map_err(|source| ChannelError::Bind {
            endpoint: endpoint.to_owned(),
            source,
        })?;
    guard::serve(channel, endpoint, inner, guard::limit())
        .await
        .map_err(|source| ChannelError::Guard {
            endpoint: endpoint.to_owned(),
            source,
        })?;
    Ok(socket)
}

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("cannot bind {endpoint}: {source}")]
    Bind {
        endpoint: String,
        #[source]
        source: zeromq::ZmqError,
    },
    #[error("cannot bind {endpoint}: {source}")]
    Guard {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
}
