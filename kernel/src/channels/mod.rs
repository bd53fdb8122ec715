//! One module per Jupyter socket. Each owns its zmq socket in a task; the
//! rest of the kernel talks to it through channels.

pub mod control;
pub mod guard;
pub mod heartbeat;
pub mod iopub;
pub mod router;
pub mod shell;
pub mod stdin;

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

/// A fresh zmq socket serving an endpoint from the connection file: the
/// socket listens on an ephemeral loopback port, behind a [`guard`] that
/// owns the endpoint and bounds what a client may send.
async fn bind<S: zeromq::Socket>(channel: &'static str, endpoint: &str) -> Result<S, ChannelError> {
    let mut socket = S::new();
    let inner = socket
        .bind("tcp://127.0.0.1:0")
        .await
        .map_err(|source| ChannelError::Bind {
            endpoint: endpoint.to_owned(),
            source,
        })?;
    guard::serve(channel, endpoint, inner.to_string(), guard::limit())
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
