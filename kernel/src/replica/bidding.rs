//! Bidding: whether this replica can run a cell now (not catching up, not
//! steered to yield, granted its GPUs by the agent), and re-bidding while it
//! cannot.

use std::sync::Arc;
use std::time::Duration;

use super::cell::request_code;
use super::entry::{CellId, Entry, Frames};
use super::{lock, Core};

/// How often a replica that yielded checks whether it can lead now.
const REBID_INTERVAL: Duration = Duration::from_millis(200);
/// How often a replica behind the holder of newer changes checks for them.
const SYNC_POLL: Duration = Duration::from_millis(5);

impl Core {
    /// Catching up, steered to yield, or behind a replica whose changes are not
    /// all in the log yet (from the log, never from disk).
    pub(crate) fn must_yield(&self) -> bool {
        lock(&self.applier).must_yield() || !self.may_lead_now() || !*self.ready.borrow()
    }

    /// Whether this replica has every change committed so far.
    fn may_lead_now(&self) -> bool {
        lock(&self.applier).state().may_lead(self.id)
    }

    /// GPUs the cell of `request` asks for.
    pub(crate) fn gpus_wanted(&self, request: &Frames) -> u32 {
        crate::gpu::wanted(&request_code(request), self.gpu.default_gpus())
    }

    /// Every replica holds every committed cell's changes.
    pub(crate) fn changes_synced(&self) -> bool {
        lock(&self.applier).state().holder().is_none()
    }

    /// No cell is open in the group: between cells.
    pub(crate) fn between_cells(&self) -> bool {
        lock(&self.applier).state().elections.none_open()
    }

    /// Whether `cell` is open and only this replica may run it.
    fn pinned_here(&self, cell: &str) -> bool {
        lock(&self.applier)
            .state()
            .elections
            .get(cell)
            .is_some_and(|c| c.only == Some(self.id))
    }

    /// A cell only this replica may run (a comm message for its comm) needs
    /// no GPU and ignores steering; it still waits for every change the log
    /// holds, so it sees the namespace a cell would. A LEAD refused because
    /// newer changes were committed meanwhile is sent again.
    async fn lead_pinned(self: Arc<Self>, cell: CellId) {
        while self.is_undecided(&cell) && !*self.stop.borrow() {
            if self.may_lead_now() && *self.ready.borrow() {
                let bid = Entry::Bid {
                    cell: cell.clone(),
                    replica: self.id,
                    lead: true,
                };
                if let Err(e) = self.propose(&bid).await {
                    tracing::warn!(error = %e, "could not bid");
                }
                tokio::time::sleep(REBID_INTERVAL).await;
            } else {
                tokio::time::sleep(SYNC_POLL).await;
            }
        }
    }

    /// Whether `cell` is open and nobody has won it yet.
    pub(crate) fn is_undecided(&self, cell: &str) -> bool {
        lock(&self.applier)
            .state()
            .elections
            .get(cell)
            .is_some_and(|c| c.winner.is_none())
    }

    /// Whether this replica can run `cell` now: not told to yield, not catching
    /// up, and (for a cell that needs GPUs) granted them by the agent; the grant
    /// is then held for the cell until it ends or the election is lost.
    pub(crate) async fn try_lead(self: &Arc<Self>, cell: &str, request: &Frames) -> bool {
        if self.must_yield() {
            return false;
        }
        let wanted = self.gpus_wanted(request);
        if wanted == 0 {
            return true;
        }
        self.gpu
            .acquire(&self.kernel_id, self.id, cell, wanted)
            .await
    }

    pub(super) async fn bid(self: Arc<Self>, cell: CellId) {
        let Some(request) = self.request_of(&cell) else {
            return;
        };
        if self.pinned_here(&cell) {
            return self.lead_pinned(cell).await;
        }
        // Behind a replica whose changes are still streaming: wait for them (or
        // for its loss) and then bid, rather than yield for a reason that ends
        // in milliseconds; the holder itself leads meanwhile.
        while !self.may_lead_now() && self.is_undecided(&cell) && !*self.stop.borrow() {
            tokio::time::sleep(SYNC_POLL).await;
        }
        let lead = self.try_lead(&cell, &request).await;
        let bid = Entry::Bid {
            cell: cell.clone(),
            replica: self.id,
            lead,
        };
        if let Err(e) = self.propose(&bid).await {
            tracing::warn!(error = %e, "could not bid");
            return;
        }
        if lead {
            return;
        }
        // Yielded: lead as soon as we can, unless someone else does first.
        loop {
            tokio::time::sleep(REBID_INTERVAL).await;
            if !self.is_undecided(&cell) || *self.stop.borrow() {
                return;
            }
            if self.try_lead(&cell, &request).await {
                let bid = Entry::Bid {
                    cell,
                    replica: self.id,
                    lead: true,
                };
                if let Err(e) = self.propose(&bid).await {
                    tracing::warn!(error = %e, "could not bid");
                }
                return;
            }
        }
    }
}
