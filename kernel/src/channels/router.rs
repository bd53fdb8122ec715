//! The receive side shared by shell, control and stdin (ROUTER sockets):
//! frames in, verified [`Message`]s out, bad input logged and dropped.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;
use zeromq::{RouterRecvHalf, RouterSendHalf, RouterSocket, SocketRecv, SocketSend, ZmqMessage};

use super::{ChannelError, Session};
use crate::wire::{Message, Outgoing, ReplayGuard};

/// Per-socket memory of seen signatures; jupyter_client keeps 2^16.
const REPLAY_HISTORY: usize = 1 << 16;

/// Pause after a failed receive (a peer that vanished, a broken socket)
/// before the next: short enough to go unnoticed, long enough that a
/// socket failing over and over cannot spin a core.
pub const RECV_ERROR_BACKOFF: std::time::Duration = std::time::Duration::from_millis(5);

pub async fn bind(
    channel: &'static str,
    endpoint: &str,
    backends: &super::Backends,
) -> Result<(RouterSendHalf, RouterRecvHalf), ChannelError> {
    let socket: RouterSocket = super::bind(channel, endpoint, backends).await?;
    Ok(socket.split())
}

/// Reads, verifies and forwards messages until the receiver goes away.
/// A message that fails verification or parsing is dropped with a log
/// line: a client's mistake never stops the channel.
pub async fn pump(
    name: &'static str,
    mut recv: RouterRecvHalf,
    session: Arc<Session>,
    out: mpsc::Sender<Message>,
) {
    let mut replay = ReplayGuard::new(REPLAY_HISTORY);
    loop {
        let frames = match recv.recv().await {
            Ok(m) => m.into_vec(),
            Err(e) => {
                tracing::warn!(channel = name, "receive failed: {e}");
                // A persistent socket error must not become a busy loop.
                tokio::time::sleep(RECV_ERROR_BACKOFF).await;
                continue;
            }
        };
        match Message::decode(frames, &session.signer, Some(&mut replay)) {
            Ok(msg) => {
                tracing::debug!(channel = name, msg_type = %msg.header.msg_type, "received");
                if out.send(msg).await.is_err() {
                    return;
                }
            }
            Err(e) => tracing::warn!(channel = name, "dropped a message: {e}"),
        }
    }
}

/// Sends a reply; a client that has gone away is logged, not fatal.
pub async fn send(name: &'static str, sink: &mut RouterSendHalf, session: &Session, msg: Outgoing) {
    let frames: Vec<Bytes> = msg.encode(&session.signer);
    let Ok(zmsg) = ZmqMessage::try_from(frames) else {
        return;
    };
    if let Err(e) = sink.send(zmsg).await {
        tracing::warn!(
            channel = name,
            "could not send {}: {e}",
            msg.header.msg_type
        );
    }
}
