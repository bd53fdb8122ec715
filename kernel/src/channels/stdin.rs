//! Stdin: the kernel asks the front-end for input (`input()`, `getpass`).
//!
//! The request is addressed to the identities of the shell request that is
//! running, as ipykernel does (jupyter_client uses one identity for its
//! shell and stdin sockets).

use std::sync::{mpsc as std_mpsc, Arc, Mutex};

use bytes::Bytes;
use tokio::sync::mpsc;
use zeromq::RouterSendHalf;

use super::{router, ChannelError, Session};
use crate::wire::input::{InputReply, InputRequest};
use crate::wire::{Header, Message, Outgoing};

pub struct Stdin {
    sink: tokio::sync::Mutex<RouterSendHalf>,
    waiter: Mutex<Option<std_mpsc::Sender<String>>>,
    session: Arc<Session>,
    runtime: tokio::runtime::Handle,
}

impl Stdin {
    pub async fn bind(
        endpoint: &str,
        backends: &super::Backends,
        session: Arc<Session>,
    ) -> Result<Arc<Self>, ChannelError> {
        let (sink, recv) = router::bind("stdin", endpoint, backends).await?;
        let stdin = Arc::new(Self {
            sink: tokio::sync::Mutex::new(sink),
            waiter: Mutex::new(None),
            session: session.clone(),
            runtime: tokio::runtime::Handle::current(),
        });
        let (tx, mut rx) = mpsc::channel::<Message>(16);
        tokio::spawn(router::pump("stdin", recv, session, tx));
        let replies = stdin.clone();
        tokio::spawn(async move {
            while let Some(msg) = rx.recv().await {
                replies.on_message(msg);
            }
        });
        Ok(stdin)
    }

    fn on_message(&self, msg: Message) {
        if msg.header.msg_type != "input_reply" {
            tracing::warn!("unexpected {} on stdin, ignored", msg.header.msg_type);
            return;
        }
        let value = match msg.content_as::<InputReply>() {
            Ok(r) => r.value,
            Err(e) => {
                tracing::warn!("malformed input_reply, treated as empty input: {e}");
                String::new()
            }
        };
        let waiter = self.waiter.lock().ok().and_then(|mut w| w.take());
        match waiter {
            Some(w) => {
                let _ = w.send(value);
            }
            None => tracing::warn!("input_reply with no pending input_request, ignored"),
        }
    }
}

impl crate::python::InputChannel for Stdin {
    /// Sends an input_request from a non-runtime thread; the reply arrives
    /// on the returned channel.
    fn request(
        &self,
        identities: &[Bytes],
        parent: Option<&Header>,
        prompt: String,
        password: bool,
    ) -> std_mpsc::Receiver<String> {
        let (tx, rx) = std_mpsc::channel();
        if let Ok(mut w) = self.waiter.lock() {
            *w = Some(tx);
        }
        let msg = Outgoing::typed(
            "input_request",
            &self.session.id,
            parent,
            &InputRequest { prompt, password },
        )
        .to(identities);
        self.runtime.block_on(async {
            let mut sink = self.sink.lock().await;
            router::send("stdin", &mut sink, &self.session, msg).await;
        });
        rx
    }

    fn cancel(&self) {
        if let Ok(mut w) = self.waiter.lock() {
            w.take();
        }
    }
}
