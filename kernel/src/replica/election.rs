//! Who runs a cell, decided from the log alone so every replica agrees.
//!
//! Each replica answers a `Request` with a `Bid`: LEAD if it can run the cell
//! now, YIELD if not. The first LEAD applied for a cell wins; later bids are
//! ignored. Bids from replicas already declared down are ignored too. A cell
//! ends exactly once: by its winner's `Done`, or because its winner went down.
//!
//! Memory is bounded: open cells are the few in flight, and of the finished ones only the
//! last [`FINISHED_KEPT`] are remembered, which is what turns away a duplicate `Request`
//! (a proposal retried while leadership moved arrives within seconds, not thousands of
//! cells later).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

use raft_transport::NodeId;
use serde::{Deserialize, Serialize};

use super::entry::{CellId, Frames};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BidOutcome {
    /// This bid decided the election.
    Won(NodeId),
    /// Every live voter has yielded and nobody leads yet: the cell is queued.
    AllYielded,
    /// Still waiting for bids.
    Open,
    /// The cell is decided, finished or unknown; the bid changes nothing.
    Ignored,
}

/// How many finished cells are remembered to ignore duplicates of their requests.
pub const FINISHED_KEPT: usize = 4096;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    pub request: Frames,
    /// The front's newest control request when the cell was submitted.
    pub control: Option<Frames>,
    pub winner: Option<NodeId>,
    /// Only this replica may run it: a front-end's comm message goes to the
    /// replica whose Python holds the comm.
    pub only: Option<NodeId>,
    yielded: BTreeSet<NodeId>,
}

/// How a cell ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    Done {
        replica: NodeId,
    },
    /// Its winner went down mid-cell.
    Lost {
        replica: NodeId,
    },
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Elections {
    open: HashMap<CellId, Cell>,
    finished: Finished,
    down: BTreeSet<NodeId>,
}

/// The most recently finished cells, oldest first.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "VecDeque<CellId>", into = "VecDeque<CellId>")]
struct Finished {
    order: VecDeque<CellId>,
    set: HashSet<CellId>,
}

impl Finished {
    fn contains(&self, cell: &str) -> bool {
        self.set.contains(cell)
    }

    fn insert(&mut self, cell: CellId) {
        if self.set.insert(cell.clone()) {
            self.order.push_back(cell);
        }
        while self.order.len() > FINISHED_KEPT {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }
}

impl From<VecDeque<CellId>> for Finished {
    fn from(order: VecDeque<CellId>) -> Self {
        let mut f = Finished::default();
        for cell in order {
            f.insert(cell);
        }
        f
    }
}

impl From<Finished> for VecDeque<CellId> {
    fn from(f: Finished) -> Self {
        f.order
    }
}

impl Elections {
    pub fn open(&mut self, cell: CellId, request: Frames, control: Option<Frames>) {
        self.open_for(cell, request, control, None);
    }

    /// Opens a cell that only `only` (if given) may win; it is lost if that
    /// replica goes down first.
    pub fn open_for(
        &mut self,
        cell: CellId,
        request: Frames,
        control: Option<Frames>,
        only: Option<NodeId>,
    ) {
        if self.finished.contains(&cell) {
            return;
        }
        self.open.entry(cell).or_insert(Cell {
            request,
            control,
            winner: None,
            only,
            yielded: BTreeSet::new(),
        });
    }

    /// No cell is open: the kernel is between cells.
    pub fn none_open(&self) -> bool {
        self.open.is_empty()
    }

    pub fn get(&self, cell: &str) -> Option<&Cell> {
        self.open.get(cell)
    }

    /// Applies a bid; `voters` are the members expected to bid.
    pub fn bid(
        &mut self,
        cell: &str,
        replica: NodeId,
        lead: bool,
        voters: &BTreeSet<NodeId>,
    ) -> BidOutcome {
        if self.down.contains(&replica) {
            return BidOutcome::Ignored;
        }
        let Some(c) = self.open.get_mut(cell) else {
            return BidOutcome::Ignored;
        };
        if c.winner.is_some() || c.only.is_some_and(|only| only != replica) {
            return BidOutcome::Ignored;
        }
        if lead {
            c.winner = Some(replica);
            return BidOutcome::Won(replica);
        }
        c.yielded.insert(replica);
        let live: BTreeSet<_> = voters.difference(&self.down).copied().collect();
        if !live.is_empty() && live.is_subset(&c.yielded) {
            BidOutcome::AllYielded
        } else {
            BidOutcome::Open
        }
    }

    /// Ends a cell once; `None` if it already ended (or never existed).
    pub fn finish(&mut self, cell: &str, replica: NodeId) -> Option<Cell> {
        let c = self.open.remove(cell)?;
        if c.winner != Some(replica) {
            // A Done from a replica that did not win cannot happen unless the log
            // is corrupt; keep the cell open for its real winner.
            self.open.insert(cell.to_owned(), c);
            return None;
        }
        self.finished.insert(cell.to_owned());
        Some(c)
    }

    /// Marks a replica down; returns the cells it was running, or that only
    /// it could run, now lost.
    pub fn replica_down(&mut self, replica: NodeId) -> Vec<(CellId, Cell)> {
        self.down.insert(replica);
        let lost: Vec<CellId> = self
            .open
            .iter()
            .filter(|(_, c)| c.winner == Some(replica) || c.only == Some(replica))
            .map(|(id, _)| id.clone())
            .collect();
        lost.into_iter()
            .filter_map(|id| {
                let c = self.open.remove(&id)?;
                self.finished.insert(id.clone());
                Some((id, c))
            })
            .collect()
    }

    pub fn is_down(&self, replica: NodeId) -> bool {
        self.down.contains(&replica)
    }

    /// Open cells still without a winner that `replica` may bid on (one that
    /// yielded re-bids on these).
    pub fn undecided_for(&self, replica: NodeId) -> Vec<CellId> {
        self.open
            .iter()
            .filter(|(_, c)| c.winner.is_none() && c.only.is_none_or(|only| only == replica))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The replica running `cell`, if decided and still open.
    pub fn winner(&self, cell: &str) -> Option<NodeId> {
        self.open.get(cell).and_then(|c| c.winner)
    }

    /// Open cells that `replica` won and has not finished.
    pub fn won_by(&self, replica: NodeId) -> Vec<(CellId, Cell)> {
        self.open
            .iter()
            .filter(|(_, c)| c.winner == Some(replica))
            .map(|(id, c)| (id.clone(), c.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames() -> Frames {
        Frames {
            identities: vec![],
            header: "{}".into(),
            parent_header: "{}".into(),
            metadata: "{}".into(),
            content: "{}".into(),
            buffers: vec![],
        }
    }

    fn voters() -> BTreeSet<NodeId> {
        BTreeSet::from([1, 2, 3])
    }

    #[test]
    fn first_lead_wins_and_later_bids_are_ignored() {
        let mut e = Elections::default();
        e.open("c".into(), frames(), None);
        assert_eq!(e.bid("c", 2, false, &voters()), BidOutcome::Open);
        assert_eq!(e.bid("c", 3, true, &voters()), BidOutcome::Won(3));
        assert_eq!(e.bid("c", 1, true, &voters()), BidOutcome::Ignored);
        assert_eq!(e.winner("c"), Some(3));
    }

    #[test]
    fn all_yield_queues_until_someone_leads() {
        let mut e = Elections::default();
        e.open("c".into(), frames(), None);
        assert_eq!(e.bid("c", 1, false, &voters()), BidOutcome::Open);
        assert_eq!(e.bid("c", 2, false, &voters()), BidOutcome::Open);
        assert_eq!(e.bid("c", 3, false, &voters()), BidOutcome::AllYielded);
        assert_eq!(e.undecided_for(1), vec!["c".to_string()]);
        assert_eq!(e.bid("c", 2, true, &voters()), BidOutcome::Won(2));
        assert!(e.undecided_for(1).is_empty());
    }

    #[test]
    fn a_cell_ends_once_and_only_by_its_winner() {
        let mut e = Elections::default();
        e.open("c".into(), frames(), None);
        e.bid("c", 2, true, &voters());
        assert!(e.finish("c", 3).is_none(), "not the winner");
        assert!(e.finish("c", 2).is_some());
        assert!(e.finish("c", 2).is_none(), "already done");
        // A late duplicate Request does not reopen it.
        e.open("c".into(), frames(), None);
        assert!(e.get("c").is_none());
    }

    #[test]
    fn finished_cells_are_remembered_up_to_a_bound() {
        let mut e = Elections::default();
        for i in 0..(FINISHED_KEPT + 10) {
            let cell = format!("c{i}");
            e.open(cell.clone(), frames(), None);
            e.bid(&cell, 1, true, &voters());
            assert!(e.finish(&cell, 1).is_some());
        }
        assert_eq!(e.finished.order.len(), FINISHED_KEPT);
        assert_eq!(e.finished.set.len(), FINISHED_KEPT);
        // A recent duplicate is refused, a forgotten one would open again.
        let recent = format!("c{}", FINISHED_KEPT + 9);
        e.open(recent.clone(), frames(), None);
        assert!(e.get(&recent).is_none());
        // The bound survives a snapshot round trip.
        let copy: Elections = postcard::from_bytes(&postcard::to_stdvec(&e).unwrap()).unwrap();
        assert_eq!(copy, e);
    }

    #[test]
    fn a_downed_winner_loses_its_cell_and_cannot_bid() {
        let mut e = Elections::default();
        e.open("a".into(), frames(), None);
        e.open("b".into(), frames(), None);
        e.bid("a", 2, true, &voters());
        let lost = e.replica_down(2);
        assert_eq!(lost.len(), 1);
        assert_eq!(lost[0].0, "a");
        assert!(e.finish("a", 2).is_none(), "a late Done is ignored");
        assert_eq!(e.bid("b", 2, true, &voters()), BidOutcome::Ignored);
        // With 2 down, the two live voters yielding is everyone.
        assert_eq!(e.bid("b", 1, false, &voters()), BidOutcome::Open);
        assert_eq!(e.bid("b", 3, false, &voters()), BidOutcome::AllYielded);
    }

    #[test]
    fn a_pinned_cell_is_won_only_by_its_replica_and_lost_with_it() {
        let mut e = Elections::default();
        e.open_for("c".into(), frames(), None, Some(2));
        assert!(e.undecided_for(1).is_empty(), "only 2 bids on it");
        assert_eq!(e.undecided_for(2), vec!["c".to_string()]);
        assert_eq!(e.bid("c", 1, true, &voters()), BidOutcome::Ignored);
        assert_eq!(e.winner("c"), None);
        e.open_for("d".into(), frames(), None, Some(2));
        assert_eq!(e.bid("c", 2, true, &voters()), BidOutcome::Won(2));
        let lost: Vec<CellId> = e.replica_down(2).into_iter().map(|(id, _)| id).collect();
        assert_eq!(
            lost.len(),
            2,
            "the one it runs and the one only it could run"
        );
        assert!(e.none_open());
    }
}
