//! A peer's iopub and stdin, carried to the replica facing Jupyter.
//!
//! The peer's iopub publisher batches streams as the front's does and hands
//! each message to [`run`], which mails them to the front in order, several
//! per mail when they queue up. Each mail returns once the front has published
//! it, so a flush point completes after the front-end has been sent everything
//! before it. `input()` travels the same queue, so a prompt printed before it
//! arrives first; the answer comes back as mail.

use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::entry::{Frames, Mail};
use super::{lock, Core};
use crate::channels::iopub::Relayed;
use crate::channels::Session;
use crate::python::InputChannel;
use crate::wire::input::InputRequest;
use crate::wire::{Header, Outgoing};

/// Messages folded into one mail at most.
const BATCH: usize = 256;

pub async fn run(core: Arc<Core>, mut queue: mpsc::Receiver<Relayed>) {
    while let Some(first) = queue.recv().await {
        let mut items = vec![first];
        while items.len() < BATCH {
            match queue.try_recv() {
                Ok(item) => items.push(item),
                Err(_) => break,
            }
        }
        let mut batch = Vec::new();
        for item in items {
            match item {
                Relayed::Message(msg) if msg.header.msg_type == "input_request" => {
                    send(&core, std::mem::take(&mut batch)).await;
                    core.mail(
                        core.front_id(),
                        &Mail::InputRequest {
                            request: Frames::from_outgoing(&msg),
                        },
                    )
                    .await;
                }
                Relayed::Message(msg) => batch.push(Frames::from_outgoing(&msg)),
                Relayed::Flushed(done) => {
                    send(&core, std::mem::take(&mut batch)).await;
                    let _ = done.send(());
                }
            }
        }
        send(&core, batch).await;
    }
}

async fn send(core: &Core, batch: Vec<Frames>) {
    if !batch.is_empty() {
        core.mail(core.front_id(), &Mail::Iopub(batch)).await;
    }
}

/// `input()` on a peer.
pub struct RemoteStdin {
    queue: mpsc::Sender<Relayed>,
    session: Arc<Session>,
    waiter: Mutex<Option<std_mpsc::Sender<String>>>,
}

impl RemoteStdin {
    pub fn new(queue: mpsc::Sender<Relayed>, session: Arc<Session>) -> Arc<Self> {
        Arc::new(Self {
            queue,
            session,
            waiter: Mutex::new(None),
        })
    }

    pub fn answer(&self, value: String) {
        match lock(&self.waiter).take() {
            Some(w) => {
                let _ = w.send(value);
            }
            None => tracing::warn!("input reply with no input pending, ignored"),
        }
    }
}

impl InputChannel for RemoteStdin {
    fn request(
        &self,
        identities: &[Bytes],
        parent: Option<&Header>,
        prompt: String,
        password: bool,
    ) -> std_mpsc::Receiver<String> {
        let (tx, rx) = std_mpsc::channel();
        *lock(&self.waiter) = Some(tx);
        let msg = Outgoing::typed(
            "input_request",
            &self.session.id,
            parent,
            &InputRequest { prompt, password },
        )
        .to(identities);
        if self
            .queue
            .blocking_send(Relayed::Message(Box::new(msg)))
            .is_err()
        {
            tracing::warn!("the relay to the front is gone; input request dropped");
        }
        rx
    }

    fn cancel(&self) {
        lock(&self.waiter).take();
    }
}
