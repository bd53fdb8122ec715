//! Carrying out the applier's effects, in log order.

use std::sync::Arc;

use raft_transport::BlobHash;
use tokio::sync::mpsc;

use super::app::Batch;
use super::applier::Effect;
use super::{lock, Core, CoreEvent};

impl Core {
    /// Carries out the applier's effects in log order. Those that change the
    /// namespace are awaited, so deltas apply one at a time and in order; the
    /// rest are spawned or quick.
    pub(super) async fn effect_loop(self: Arc<Self>, mut effects: mpsc::UnboundedReceiver<Batch>) {
        while let Some(batch) = effects.recv().await {
            for effect in batch.effects {
                self.carry_out(effect).await;
            }
            self.applied
                .store(batch.index, std::sync::atomic::Ordering::Release);
            if *self.stop.borrow() {
                return;
            }
        }
    }

    pub(super) async fn carry_out(self: &Arc<Self>, effect: Effect) {
        match effect {
            Effect::Bid { cell } => {
                tokio::spawn(self.clone().bid(cell));
            }
            Effect::Run {
                cell,
                request,
                control,
            } => {
                if lock(&self.running).insert(cell.clone()) {
                    tokio::spawn(self.clone().run_cell(cell, request, control));
                }
            }
            Effect::ReleaseGpus { cell } => {
                if let Some(cached) = self.gpu.give_back(&cell).await {
                    let binding = crate::gpu::Binding::earlier();
                    tokio::spawn(self.clone().offload_when_reclaimed(cached, binding));
                }
            }
            Effect::Queued { cell, request } => {
                self.emit(CoreEvent::Queued { cell, request });
            }
            Effect::Resolve { cell, result } => self.resolve(&cell, result),
            Effect::ApplyDelta(delta) => {
                if *self.ready.borrow() {
                    self.apply_delta(delta).await;
                }
            }
            Effect::ChangesLost(lost) => {
                tracing::warn!(
                    replica = lost.replica,
                    cells = lost.cells.len(),
                    "cells' changes lost with their replica"
                );
                self.emit(CoreEvent::ChangesLost(lost));
            }
            Effect::Restore { checkpoint, replay } => self.restore_from(checkpoint, replay).await,
            Effect::DropBlob { blob } => {
                self.node.remove_blob(&BlobHash(blob));
            }
            Effect::AddMember { replica, addr } => {
                if self.is_leader() {
                    self.admit(replica, addr);
                }
            }
            Effect::AnswerVerify { nonce, to } => {
                tokio::spawn(self.clone().answer_verify(nonce, to));
            }
            Effect::MemberDown { replica } => {
                tracing::info!(replica, "replica down");
                // Removal from Raft's membership: `reconcile_membership`.
                self.emit(CoreEvent::MemberDown { replica });
            }
            Effect::Leave { reason } => {
                tracing::error!("{reason}; this replica leaves the group");
                self.leave();
            }
            Effect::Stop { shutdown } => {
                if !shutdown {
                    // Moved away, replaced, or unable to apply a delta.
                    tracing::warn!("this replica was removed from the group; exiting");
                    self.stop.send_replace(true);
                } else if self.events.is_none() {
                    self.stop.send_replace(true);
                }
            }
        }
    }
}
