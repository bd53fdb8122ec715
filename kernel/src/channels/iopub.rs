//! IOPub: an XPUB socket owned by one task, which also batches stream text.
//!
//! Every iopub message goes through one ordered queue, so a cell's stream
//! text, displays and the final `idle` reach the client in the order the
//! cell produced them. Stream text is coalesced like ipykernel's OutStream:
//! held for at most [`FLUSH_INTERVAL`] (a `print` is one message, not two),
//! sent at once before any other message, and capped in size so memory
//! stays bounded under a flood of output. XPUB lets the kernel see each
//! subscription and answer it with `iopub_welcome` (protocol 5.4).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use zeromq::{SocketRecv, SocketSend, XPubSocket, ZmqMessage};

use super::{ChannelError, Session};
use crate::wire::status::{ExecutionState, IopubWelcome, Status};
use crate::wire::stream::Stream;
use crate::wire::{Header, Outgoing};

pub const FLUSH_INTERVAL: Duration = Duration::from_millis(200);
/// Flush early past this much pending text.
const MAX_PENDING_TEXT: usize = 1 << 20;
const QUEUE_DEPTH: usize = 1024;

#[derive(Debug)]
enum Event {
    Message(Box<Outgoing>),
    Stream {
        parent: Option<Header>,
        name: String,
        text: String,
    },
    Flush(Option<oneshot::Sender<()>>),
}

/// A cheap, cloneable handle for publishing on iopub.
#[derive(Clone, Debug)]
pub struct Iopub {
    tx: mpsc::Sender<Event>,
    session: Arc<Session>,
}

impl Iopub {
    pub fn session(&self) -> &Arc<Session> {
        &self.session
    }

    pub async fn publish(&self, msg: Outgoing) {
        if self.tx.send(Event::Message(Box::new(msg))).await.is_err() {
            publisher_gone();
        }
    }

    /// For threads outside the runtime (the Python thread).
    pub fn blocking_publish(&self, msg: Outgoing) {
        if self
            .tx
            .blocking_send(Event::Message(Box::new(msg)))
            .is_err()
        {
            publisher_gone();
        }
    }

    /// Stream text, coalesced with the rest of its stream as `print`'s is.
    pub async fn stream(&self, parent: Option<Header>, name: &str, text: &str) {
        let event = Event::Stream {
            parent,
            name: name.to_owned(),
            text: text.to_owned(),
        };
        if self.tx.send(event).await.is_err() {
            publisher_gone();
        }
    }

    pub fn blocking_stream(&self, parent: Option<Header>, name: String, text: String) {
        if self
            .tx
            .blocking_send(Event::Stream { parent, name, text })
            .is_err()
        {
            publisher_gone();
        }
    }

    pub fn blocking_flush(&self) {
        if self.tx.blocking_send(Event::Flush(None)).is_err() {
            publisher_gone();
        }
    }

    /// Resolves once everything queued before it has been written.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Event::Flush(Some(tx))).await.is_err() || rx.await.is_err() {
            publisher_gone();
        }
    }

    pub async fn status(&self, parent: Option<&Header>, state: ExecutionState) {
        let content = Status {
            execution_state: state,
        };
        self.publish(Outgoing::typed(
            "status",
            &self.session.id,
            parent,
            &content,
        ))
        .await;
    }
}

pub async fn bind(
    endpoint: &str,
    backends: &super::Backends,
    session: Arc<Session>,
) -> Result<(Iopub, Publisher), ChannelError> {
    let socket: XPubSocket = super::bind("iopub", endpoint, backends).await?;
    Ok(publisher(Sink::Zmq(socket), session))
}

/// What a relaying iopub hands on: messages, and flush points that complete
/// once everything before them has been handed on.
#[derive(Debug)]
pub enum Relayed {
    Message(Box<Outgoing>),
    Flushed(oneshot::Sender<()>),
}

/// An iopub whose messages, stream batching included, go to `out` instead of
/// a socket: a replica that does not face Jupyter hands them to the one that does.
pub fn relay(out: mpsc::Sender<Relayed>, session: Arc<Session>) -> (Iopub, Publisher) {
    publisher(Sink::Relay(out), session)
}

fn publisher(sink: Sink, session: Arc<Session>) -> (Iopub, Publisher) {
    let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
    (
        Iopub {
            tx,
            session: session.clone(),
        },
        Publisher {
            sink,
            rx,
            session,
            pending: None,
        },
    )
}

enum Sink {
    Zmq(XPubSocket),
    Relay(mpsc::Sender<Relayed>),
}

struct PendingStream {
    parent: Option<Header>,
    name: String,
    text: String,
    deadline: Instant,
}

/// The task side; run it with [`Publisher::run`].
/// Subscription frames from XPUB; a relay has none.
async fn subscription(sink: &mut Sink) -> Result<ZmqMessage, zeromq::ZmqError> {
    match sink {
        Sink::Zmq(socket) => socket.recv().await,
        Sink::Relay(_) => std::future::pending().await,
    }
}

pub struct Publisher {
    sink: Sink,
    rx: mpsc::Receiver<Event>,
    session: Arc<Session>,
    pending: Option<PendingStream>,
}

impl Publisher {
    pub async fn run(mut self) {
        loop {
            let deadline = self.pending.as_ref().map(|p| p.deadline);
            tokio::select! {
                event = self.rx.recv() => match event {
                    Some(event) => self.handle(event).await,
                    None => {
                        self.flush_stream().await;
                        return;
                    }
                },
                sub = subscription(&mut self.sink) => match sub {
                    Ok(frames) => self.on_subscription(frames).await,
                    Err(e) => {
                        tracing::debug!("iopub subscription read failed: {e}");
                        tokio::time::sleep(super::router::RECV_ERROR_BACKOFF).await;
                    }
                },
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    self.flush_stream().await;
                }
            }
        }
    }

    async fn handle(&mut self, event: Event) {
        match event {
            Event::Message(msg) => {
                self.flush_stream().await;
                self.write(*msg).await;
            }
            Event::Stream { parent, name, text } => {
                let same = self
                    .pending
                    .as_ref()
                    .is_some_and(|p| p.name == name && p.parent == parent);
                if !same {
                    self.flush_stream().await;
                }
                match &mut self.pending {
                    Some(p) => p.text.push_str(&text),
                    None => {
                        self.pending = Some(PendingStream {
                            parent,
                            name,
                            text,
                            deadline: Instant::now() + FLUSH_INTERVAL,
                        })
                    }
                }
                if self
                    .pending
                    .as_ref()
                    .is_some_and(|p| p.text.len() >= MAX_PENDING_TEXT)
                {
                    self.flush_stream().await;
                }
            }
            Event::Flush(done) => {
                self.flush_stream().await;
                if let Some(done) = done {
                    match &self.sink {
                        // Flushed only once the relay has delivered what came before.
                        Sink::Relay(out) => {
                            if let Err(mpsc::error::SendError(Relayed::Flushed(done))) =
                                out.send(Relayed::Flushed(done)).await
                            {
                                let _ = done.send(());
                            }
                        }
                        Sink::Zmq(_) => {
                            let _ = done.send(());
                        }
                    }
                }
            }
        }
    }

    async fn flush_stream(&mut self) {
        let Some(p) = self.pending.take() else {
            return;
        };
        let content = Stream {
            name: p.name,
            text: p.text,
        };
        let msg = Outgoing::typed("stream", &self.session.id, p.parent.as_ref(), &content);
        self.write(msg).await;
    }

    /// A subscription frame is `\x01` + topic. Each new subscriber gets a
    /// welcome so it knows it is connected before any cell runs.
    async fn on_subscription(&mut self, frames: ZmqMessage) {
        let Some(frame) = frames.get(0) else {
            return;
        };
        if frame.first() != Some(&1) {
            return;
        }
        let subscription = String::from_utf8_lossy(&frame[1..]).into_owned();
        tracing::debug!(?subscription, "iopub subscriber");
        let welcome = IopubWelcome { subscription };
        let msg = Outgoing::typed("iopub_welcome", &self.session.id, None, &welcome);
        self.write(msg).await;
    }

    async fn write(&mut self, msg: Outgoing) {
        let socket = match &mut self.sink {
            Sink::Zmq(socket) => socket,
            Sink::Relay(out) => {
                if out.send(Relayed::Message(Box::new(msg))).await.is_err() {
                    tracing::warn!("the relay to the front is gone; output dropped");
                }
                return;
            }
        };
        // Topic frame like ipykernel's `kernel.<id>.<msg_type>`; clients
        // subscribe to everything, so it is informational.
        let topic = format!("kernel.{}.{}", self.session.id, msg.header.msg_type);
        let mut frames: Vec<Bytes> = vec![Bytes::from(topic)];
        frames.extend(msg.encode(&self.session.signer));
        let Ok(zmsg) = ZmqMessage::try_from(frames) else {
            return;
        };
        if let Err(e) = socket.send(zmsg).await {
            tracing::warn!("iopub send of {} failed: {e}", msg.header.msg_type);
        }
    }
}

/// Only at shutdown does the publisher end before the kernel does.
fn publisher_gone() {
    tracing::debug!("iopub publisher gone (shutting down); message dropped");
}
