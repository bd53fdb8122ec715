//! Heartbeat: a REP socket that echoes. It never touches Python, so it is
//! answered while a cell holds the GIL.

use zeromq::{RepSocket, SocketRecv, SocketSend};

use super::{Backends, ChannelError};

pub async fn bind(endpoint: &str, backends: &Backends) -> Result<RepSocket, ChannelError> {
    super::bind("heartbeat", endpoint, backends).await
}

pub async fn serve(mut socket: RepSocket) {
    loop {
        match socket.recv().await {
            Ok(ping) => {
                if let Err(e) = socket.send(ping).await {
                    tracing::debug!("heartbeat send failed: {e}");
                }
            }
            Err(e) => {
                tracing::debug!("heartbeat receive failed: {e}");
                tokio::time::sleep(super::router::RECV_ERROR_BACKOFF).await;
            }
        }
    }
}
