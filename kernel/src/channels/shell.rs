//! Shell: requests served one at a time per (sub)shell, each wrapped in
//! busy/idle. Requests addressed to a subshell (JEP 91) are routed to its
//! own queue and Python thread, so they run while the main shell is busy.

use std::sync::Arc;

use serde_json::json;
use tokio::sync::mpsc;
use zeromq::RouterSendHalf;

use super::router;
use crate::kernel::{Kernel, Outcome};
use crate::python::Executor;
use crate::wire::status::ExecutionState;
use crate::wire::Message;

/// The shell socket's send side, shared by the main shell and subshells.
pub type Sink = Arc<tokio::sync::Mutex<RouterSendHalf>>;

pub async fn route(kernel: Arc<Kernel>, mut incoming: mpsc::Receiver<Message>, main: mpsc::Sender<Message>) {
    while let Some(msg) = incoming.recv().await {
        let target = match &msg.header.subshell_id {
            None => main.clone(),
            Some(id) => match kernel.subshell(id) {
                Some(queue) => queue,
                None => {
                    tracing::warn!("request for unknown subshell {id}; running it on the main shell");
                    main.clone()
                }
            },
        };
        if target.send(msg).await.is_err() {
            tracing::warn!("a shell queue closed while a request was routed to it");
        }
    }
}

pub async fn serve(kernel: Arc<Kernel>, exec: Executor, mut requests: mpsc::Receiver<Message>) {
    let mut aborting = false;
    loop {
        // After a failed execute with stop_on_error, executes that were
        // already queued are answered "aborted"; others run normally.
        let request = if aborting {
            tokio::task::yield_now().await;
            match requests.try_recv() {
                Ok(r) => r,
                Err(_) => {
                    aborting = false;
                    continue;
                }
            }
        } else {
            match requests.recv().await {
                Some(r) => r,
                None => return,
            }
        };
        let parent = request.header.clone();
        kernel.iopub.status(Some(&parent), ExecutionState::Busy).await;
        let outcome = if aborting && parent.msg_type == "execute_request" {
            Outcome {
                reply: Some(kernel.reply(&request, &json!({"status": "aborted"}))),
                ..Default::default()
            }
        } else {
            kernel.handle(&exec, &request).await
        };
        // Output of the request reaches iopub before its reply and idle.
        kernel.iopub.flush().await;
        if let Some(reply) = outcome.reply {
            let mut sink = kernel.shell_sink.lock().await;
            router::send("shell", &mut sink, &kernel.session, reply).await;
        }
        kernel.iopub.status(Some(&parent), ExecutionState::Idle).await;
        aborting |= outcome.abort_queue;
        if outcome.shutdown {
            kernel.finish_shutdown();
            return;
        }
    }
}
