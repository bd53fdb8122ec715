//! Control: kernel_info, interrupt and shutdown, served while shell is busy;
//! also code, completion and inspection, which ipykernel serves here too.

use std::sync::Arc;

use serde_json::json;
use tokio::sync::mpsc;
use zeromq::RouterSendHalf;

use super::router;
use crate::kernel::Kernel;
use crate::wire::status::ExecutionState;
use crate::wire::Message;

pub async fn serve(
    kernel: Arc<Kernel>,
    mut sink: RouterSendHalf,
    mut requests: mpsc::Receiver<Message>,
) {
    while let Some(request) = requests.recv().await {
        let parent = request.header.clone();
        kernel.note_control(&request);
        // Busy/idle around control requests too: jupyter_client's
        // wait_for_ready and VS Code poll kernel_info here until iopub talks.
        kernel
            .iopub
            .status(Some(&parent), ExecutionState::Busy)
            .await;
        let mut shutdown = false;
        let reply = match parent.msg_type.as_str() {
            "kernel_info_request" => Some(kernel.kernel_info(&request).await),
            "interrupt_request" => {
                kernel.interrupt();
                Some(kernel.reply(&request, &json!({"status": "ok"})))
            }
            "create_subshell_request" => Some(kernel.create_subshell(&request)),
            "delete_subshell_request" => Some(kernel.delete_subshell(&request)),
            "list_subshell_request" => Some(kernel.list_subshells(&request)),
            "notebookos_steer_request" => Some(kernel.steer(&request).await),
            "notebookos_sync_request" => Some(kernel.sync(&request).await),
            "execute_request"
            | "complete_request"
            | "inspect_request"
            | "is_complete_request"
            | "history_request"
            | "comm_info_request" => kernel.handle_on_control(&request).await.reply,
            "shutdown_request" => {
                let outcome = kernel.shutdown(&request).await;
                shutdown = outcome.shutdown;
                outcome.reply
            }
            other => {
                tracing::warn!("unsupported control message {other:?}, ignored");
                None
            }
        };
        kernel.iopub.flush().await;
        if let Some(reply) = reply {
            router::send("control", &mut sink, &kernel.session, reply).await;
        }
        kernel
            .iopub
            .status(Some(&parent), ExecutionState::Idle)
            .await;
        if shutdown {
            kernel.finish_shutdown();
            return;
        }
    }
}
