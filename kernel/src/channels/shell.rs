//! Shell: requests served one at a time, each wrapped in busy/idle.

use std::sync::Arc;

use serde_json::json;
use tokio::sync::mpsc;
use zeromq::RouterSendHalf;

use super::router;
use crate::kernel::Kernel;
use crate::wire::status::ExecutionState;
use crate::wire::Message;

pub async fn serve(kernel: Arc<Kernel>, mut sink: RouterSendHalf, mut requests: mpsc::Receiver<Message>) {
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
            crate::kernel::Outcome {
                reply: Some(kernel.reply(&request, &json!({"status": "aborted"}))),
                ..Default::default()
            }
        } else {
            kernel.handle(&request).await
        };
        // Output of the request reaches iopub before its reply and idle.
        kernel.iopub.flush().await;
        if let Some(reply) = outcome.reply {
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
