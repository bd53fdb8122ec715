//! A cell's two ends: the front proposes the request and waits for its end;
//! the winner runs it, captures what changed, ships it and reports `Done`.
//! Interrupts go to whichever replica runs the cell.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use raft_transport::NodeId;
use serde_json::json;

use super::deltas::Outbound;
use super::entry::{CellId, Entry, Frames, Mail};
use super::{lock, statesync, CellResult, Core, SyncMode};
use crate::wire::Message;

impl Core {
    /// Runs a request on whichever replica wins it, or on `only`; the front
    /// waits here.
    pub async fn execute(
        self: &Arc<Self>,
        request: &Message,
        control: Option<&Message>,
        only: Option<NodeId>,
    ) -> Result<CellResult, raft_transport::Error> {
        let _submitted = super::InFlight::new(&self.submitting);
        self.wait_ready().await;
        let cell = uuid::Uuid::new_v4().to_string();
        tracing::debug!(cell, ?only, "proposing request");
        let (tx, rx) = tokio::sync::oneshot::channel();
        lock(&self.waiters).insert(cell.clone(), tx);
        // Leading in the request itself saves a commit when this replica can run it.
        let frames = Frames::from_message(request);
        let lead = match only {
            Some(_) => None,
            None => self.try_lead(&cell, &frames).await.then_some(self.id),
        };
        let entry = Entry::Request {
            cell: cell.clone(),
            request: frames,
            lead,
            control: control.map(|c| Box::new(Frames::from_message(c))),
            only,
        };
        if let Err(e) = self.propose(&entry).await {
            lock(&self.waiters).remove(&cell);
            return Err(e);
        }
        rx.await.map_err(|_| raft_transport::Error::Shutdown)
    }

    /// Routes an interrupt to the replica running the cell. A cell the user
    /// sees running may not have started anywhere yet (the group still
    /// forming after start-up, its election open): the interrupt then waits
    /// for it to start, instead of reaching a replica between cells, which
    /// ignores it.
    pub fn interrupt_cell(self: &Arc<Self>) {
        if !self.has_submissions() {
            self.route_interrupt();
            return;
        }
        let core = self.clone();
        tokio::spawn(async move {
            // However long the cell queues (for GPUs, say): it is what the
            // user asked to stop.
            while core.has_submissions() && !core.submitted_cell_started() {
                tokio::time::sleep(POLL).await;
            }
            core.route_interrupt();
        });
    }

    /// Whether cells submitted here are still waiting for their result.
    pub(crate) fn has_submissions(&self) -> bool {
        self.submitting.load(Ordering::SeqCst) > 0
    }

    /// Whether a cell submitted here has a winner.
    fn submitted_cell_started(&self) -> bool {
        let waiting: Vec<CellId> = lock(&self.waiters).keys().cloned().collect();
        let applier = lock(&self.applier);
        waiting
            .iter()
            .any(|cell| applier.state().elections.winner(cell).is_some())
    }

    fn route_interrupt(self: &Arc<Self>) {
        match self.running_on() {
            Some(w) if w != self.id => {
                let core = self.clone();
                tokio::spawn(async move { core.mail(w, &Mail::Interrupt).await });
            }
            _ => self.interrupt_here(),
        }
    }

    /// Interrupts this replica's Python; a cell won here and not finished
    /// may not have started yet, and then is interrupted as it starts.
    pub(super) fn interrupt_here(&self) {
        (self.interrupt)(self.won_here());
    }

    /// An interrupt mailed by the front, which saw this replica win: this
    /// replica may apply that commit a moment later.
    pub(super) fn interrupt_mailed(self: &Arc<Self>) {
        let core = self.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + COMMIT_LAG;
            let mut cell = core.won_here();
            while cell.is_none() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(POLL).await;
                cell = core.won_here();
            }
            (core.interrupt)(cell);
        });
    }

    /// The msg_id of a cell this replica won and has not finished.
    fn won_here(&self) -> Option<String> {
        let won = lock(&self.applier).state().elections.won_by(self.id);
        won.first()
            .and_then(|(_, won)| won.request.to_message().ok())
            .map(|m| m.header.msg_id)
    }

    /// A SIGINT reached this process: if the cell runs elsewhere, pass it on
    /// (one running here got the signal itself).
    pub fn forward_interrupt(self: &Arc<Self>) {
        if let Some(w) = self.running_on().filter(|w| *w != self.id) {
            let core = self.clone();
            self.runtime
                .spawn(async move { core.mail(w, &Mail::Interrupt).await });
        }
    }

    /// The winner's side: run, reply, and replicate what changed: in the
    /// background, after the `Done` (the default), or before it in strict mode.
    pub(super) async fn run_cell(
        self: Arc<Self>,
        cell: CellId,
        request: Frames,
        control: Option<Frames>,
    ) {
        let binding = self.gpu.bind(&cell, &self.exec).await;
        let started = std::time::Instant::now();
        let control = control.and_then(|c| c.to_message().ok());
        let reply = match request.to_message() {
            Ok(msg) => self.execute_here(&msg, control.as_ref()).await,
            Err(e) => error_reply("BadRequest", &e.to_string()),
        };
        let used = started.elapsed();
        // The grant stays cached with the state on its GPUs (or, with caching
        // off, the state is queued to go to host memory first); then the
        // capture of what changed is queued on the Python thread, so it runs
        // before any later cell there.
        match binding {
            Some(binding) if self.gpu.caching() => {
                if let Some(cached) = self.gpu.cache(&cell, used).await {
                    tokio::spawn(self.clone().offload_when_reclaimed(cached, binding));
                }
            }
            Some(binding) => {
                self.gpu.finished(&cell);
                let unbound = binding.unbind(&self.exec);
                let (core, cell) = (self.clone(), cell.clone());
                tokio::spawn(async move {
                    unbound.await;
                    core.gpu.release(&cell, used).await;
                });
            }
            None => self.gpu.release(&cell, used).await,
        }
        let strict = self.sync_mode == SyncMode::Strict;
        let (replied, reply_sent) = tokio::sync::oneshot::channel();
        let captured = Box::pin(statesync::capture_delta(
            &self.exec,
            request_code(&request),
            (!strict).then_some(reply_sent),
            self.backlog.clone(),
        ));
        // Everything the cell printed reaches the front before its Done does.
        self.iopub.flush().await;
        if strict {
            let shipped = self.sync_changes(captured).await;
            let done = Entry::Done {
                cell: cell.clone(),
                replica: self.id,
                reply,
                delta: Some(shipped.delta.clone()),
            };
            if let Err(e) = self.propose(&done).await {
                tracing::error!(error = %e, "could not report a finished cell");
            }
            self.shipped(shipped);
        } else {
            let (committed, done_rx) = tokio::sync::oneshot::channel();
            self.replicate(Outbound {
                cell: cell.clone(),
                captured,
                committed: done_rx,
            });
            let done = Entry::Done {
                cell: cell.clone(),
                replica: self.id,
                reply,
                delta: None,
            };
            let proposed = self.propose(&done).await;
            if let Err(e) = &proposed {
                tracing::error!(error = %e, "could not report a finished cell");
            }
            let _ = replied.send(());
            let _ = committed.send(proposed.is_ok());
        }
        lock(&self.running).remove(&cell);
    }

    /// The GPU state of the last cell stays on the GPUs until another replica
    /// needs them (or they idle); then it moves to host memory and they go back.
    pub(super) async fn offload_when_reclaimed(
        self: Arc<Self>,
        cached: crate::gpu::CachedGrant,
        binding: crate::gpu::Binding,
    ) {
        let id = cached.id;
        let end = cached.ended().await;
        if end == crate::gpu::CacheEnd::Reused {
            return;
        }
        tracing::info!(grant = id, ?end, "moving GPU state to host memory");
        let t = std::time::Instant::now();
        binding.unbind(&self.exec).await;
        self.gpu.release_cached(id, t.elapsed()).await;
    }

    pub(super) async fn execute_here(&self, msg: &Message, control: Option<&Message>) -> String {
        let shell = crate::connection::Channel::Shell;
        match self.exec.call_on(msg, shell, control).await {
            Ok(Some(json)) => json,
            // Comm messages have no reply.
            Ok(None) if msg.header.msg_type != "execute_request" => {
                json!({"status": "ok"}).to_string()
            }
            Ok(None) => error_reply("KernelError", "execute returned no reply"),
            Err(e) => error_reply("KernelError", &e.to_string()),
        }
    }
}

pub(super) fn error_reply(ename: &str, evalue: &str) -> String {
    json!({"status": "error", "ename": ename, "evalue": evalue, "traceback": [], "execution_count": 0})
        .to_string()
}

pub(super) fn request_code(request: &Frames) -> String {
    serde_json::from_str::<serde_json::Value>(&request.content)
        .ok()
        .and_then(|c| c.get("code").and_then(|c| c.as_str()).map(str::to_owned))
        .unwrap_or_default()
}

/// How often a waiting interrupt looks again.
const POLL: Duration = Duration::from_millis(20);
/// How long a mailed interrupt waits for this replica to apply its win.
const COMMIT_LAG: Duration = Duration::from_secs(2);
