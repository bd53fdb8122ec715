//! Shell: requests served one at a time per (sub)shell, each wrapped in
//! busy/idle. Requests addressed to a subshell (JEP 91) are routed to its
//! own queue and Python thread, so they run while the main shell is busy.

use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use tokio::sync::mpsc;
use zeromq::RouterSendHalf;

use super::router;
use crate::kernel::{Kernel, Outcome, Route};
use crate::python::Executor;
use crate::wire::comm;
use crate::wire::status::ExecutionState;
use crate::wire::Message;

/// The shell socket's send side, shared by the main shell and subshells.
pub type Sink = Arc<tokio::sync::Mutex<RouterSendHalf>>;

/// Where main-shell requests go: in order, one at a time, except comm
/// messages that arrive while a cell runs.
pub struct Lanes {
    pub main: mpsc::Sender<Message>,
    /// Served beside the running cell, as ipykernel serves comms while its
    /// shell is busy: a cell may be awaiting a widget's answer.
    pub comms: mpsc::Sender<Message>,
}

pub async fn route(kernel: Arc<Kernel>, mut incoming: mpsc::Receiver<Message>, lanes: Lanes) {
    while let Some(msg) = incoming.recv().await {
        let target = match &msg.header.subshell_id {
            None if comm::is_comm_message(&msg.header.msg_type) && kernel.cell_running() => {
                lanes.comms.clone()
            }
            None => lanes.main.clone(),
            Some(id) => match kernel.subshell(id) {
                Some(queue) => queue,
                None => {
                    tracing::warn!(
                        "request for unknown subshell {id}; running it on the main shell"
                    );
                    lanes.main.clone()
                }
            },
        };
        if target.send(msg).await.is_err() {
            tracing::warn!("a shell queue closed while a request was routed to it");
        }
    }
}

pub async fn serve(kernel: Arc<Kernel>, exec: Executor, mut requests: mpsc::Receiver<Message>) {
    // After a failed execute with stop_on_error, executes that had already
    // arrived when it failed are answered "aborted" (as ipykernel does);
    // other requests, and anything sent after the failure, run normally.
    let mut aborting_before: Option<Instant> = None;
    while let Some(request) = requests.recv().await {
        if aborting_before.is_some_and(|t| request.received >= t) {
            aborting_before = None;
        }
        let parent = request.header.clone();
        // From before busy: an interrupt the client sends once it sees busy
        // finds the cell, started or not.
        let serving = kernel.serving(&request);
        kernel
            .iopub
            .status(Some(&parent), ExecutionState::Busy)
            .await;
        let outcome = if aborting_before.is_some() && parent.msg_type == "execute_request" {
            let metadata = kernel.execute_metadata(crate::wire::now_iso8601(), "aborted");
            Outcome::reply(
                kernel
                    .reply(&request, &json!({"status": "aborted"}))
                    .with_metadata(metadata),
            )
        } else {
            kernel
                .handle(&exec, &request, Route::for_shell(&request))
                .await
        };
        if outcome.abort_queue {
            aborting_before = Some(Instant::now());
        }
        // Output of the request reaches iopub before its reply and idle.
        kernel.iopub.flush().await;
        if let Some(reply) = outcome.reply {
            let mut sink = kernel.shell_sink.lock().await;
            router::send("shell", &mut sink, &kernel.session, reply).await;
        }
        // Served before idle: a comm message the front-end sends once it sees
        // idle must go after this cell (through the log, with replicas), not
        // beside it, where it would overtake this cell's replicated changes.
        drop(serving);
        kernel
            .iopub
            .status(Some(&parent), ExecutionState::Idle)
            .await;
        if outcome.shutdown {
            kernel.finish_shutdown();
            return;
        }
    }
}
