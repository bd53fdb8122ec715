//! Direct messages between replicas: relayed output and input, interrupts,
//! comm messages, digests.

use std::sync::Arc;

use raft_transport::{Message, NodeId, Receipt};
use tokio::sync::mpsc;

use super::entry::Mail;
use super::{lock, Core, CoreEvent};

impl Core {
    pub(super) async fn mail_loop(self: Arc<Self>, mut inbox: mpsc::Receiver<Message>) {
        while let Some(Message {
            from,
            data,
            receipt,
        }) = inbox.recv().await
        {
            match Mail::decode(&data) {
                Ok(mail) => self.on_mail(from, mail, receipt).await,
                Err(e) => tracing::warn!(from, "dropping mail: {e}"),
            }
        }
    }

    /// Handles one mail. Its sender waits until `receipt` is dropped: relayed
    /// output keeps it until published, so the winner reports its cell done
    /// only after the cell's output is out.
    async fn on_mail(self: &Arc<Self>, from: NodeId, mail: Mail, receipt: Receipt) {
        match mail {
            Mail::Iopub(msgs) => {
                if !self.emit(CoreEvent::Iopub {
                    from,
                    msgs,
                    receipt,
                }) {
                    tracing::warn!(
                        from,
                        "iopub relayed to a replica that does not face Jupyter"
                    );
                }
            }
            Mail::InputRequest { request } => {
                if !self.emit(CoreEvent::InputRequest { from, request }) {
                    tracing::warn!(
                        from,
                        "input request sent to a replica that does not face Jupyter"
                    );
                }
            }
            Mail::InputReply { value } => match self.remote_stdin.get() {
                Some(stdin) => stdin.answer(value),
                None => tracing::warn!(from, "input reply with no input pending"),
            },
            Mail::Interrupt => self.interrupt_mailed(),
            Mail::Comm { request } => match request.to_message() {
                Ok(msg) => {
                    // Queued now, in order; awaited aside, so that mail for a
                    // running cell (an interrupt) is not held up behind it.
                    let handled = self.exec.call(&msg);
                    let iopub = self.iopub.clone();
                    tokio::spawn(async move {
                        if let Err(e) = handled.await {
                            tracing::warn!("{} failed: {e}", msg.header.msg_type);
                        }
                        iopub.flush().await;
                    });
                }
                Err(e) => tracing::warn!(from, "malformed relayed comm message: {e}"),
            },
            Mail::Digest {
                nonce,
                replica,
                digest,
            } => self.digest_arrived(from, &nonce, replica, digest),
        }
    }

    pub(super) fn digest_arrived(
        &self,
        from: NodeId,
        nonce: &str,
        replica: NodeId,
        digest: String,
    ) {
        let sent = lock(&self.digests)
            .get(nonce)
            .map(|tx| tx.send((replica, digest)).is_ok());
        if sent != Some(true) {
            tracing::debug!(from, "a digest arrived after its request ended");
        }
    }

    /// Sends mail to a replica; failures are logged (the receiver may be gone).
    pub async fn mail(&self, to: NodeId, mail: &Mail) {
        if let Err(e) = self.node.send_message(to, mail.encode()).await {
            tracing::warn!(to, error = %e, "could not deliver mail");
        }
    }
}
