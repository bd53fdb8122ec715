//! The replica's state machine: a pure, synchronous `apply(entry) -> effects`.
//!
//! Raft's state machine calls [`Applier::apply`] for every committed entry, in log order,
//! on every replica. It updates a small [`GroupState`] (the elections in flight, who faces
//! Jupyter, who is joining, the latest checkpoint, the last few deltas) and returns the
//! [`Effect`]s this replica must carry out: run a cell it won, bid, apply a delta, restore
//! a checkpoint, answer a digest request. It does no I/O and reads no clock, so the same
//! log gives the same effects everywhere, it is tested on constructed logs, and the
//! simulator can drive it. `GroupState` is what a Raft snapshot holds; the log is purged
//! behind it, so memory does not grow with the number of cells.
//!
//! What only this replica knows (whether it is still catching up, the deltas it buffered
//! meanwhile) is kept beside the group state, never in a snapshot.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use raft_transport::NodeId;
use serde::{Deserialize, Serialize};

use super::election::{BidOutcome, Elections};
use super::entry::{CellId, Delta, Entry, Frames};

/// Deltas remembered in the group state, for a replica that catches up by snapshot.
pub const RECENT_DELTAS: usize = 16;
/// Replies of finished cells remembered, for a front that catches up by snapshot.
pub const RECENT_REPLIES: usize = 64;

/// One cell's namespace changes, as the log recorded them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeltaRef {
    /// Log index of the cell's `Done`.
    pub index: u64,
    /// The replica that ran the cell (and holds the delta's blob).
    pub from: NodeId,
    pub delta: Delta,
}

/// The latest checkpoint in the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointRef {
    pub replica: NodeId,
    pub from: NodeId,
    pub blob: [u8; 32],
    pub upto: u64,
}

/// A cell whose `Done` came without its namespace changes: they are only on `replica`
/// until its `Synced`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Unsynced {
    pub cell: CellId,
    pub replica: NodeId,
    /// The cell's `In[n]`, to tell the user which cell it was.
    pub execution_count: Option<i64>,
    /// A front-end's comm message (a widget moved), not a cell.
    #[serde(default)]
    pub comm: bool,
}

/// Changes that died with the only replica holding them (`MemberDown` at `index`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LostChanges {
    pub index: u64,
    pub replica: NodeId,
    /// Oldest first.
    pub cells: Vec<Unsynced>,
}

/// Loss notices remembered, for a front that catches up by snapshot.
pub const RECENT_LOSSES: usize = 16;

/// How a replicated cell ended, as the front reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CellResult {
    /// The winner's reply content (JSON).
    Reply(String),
    /// The winner died while running it.
    Lost { replica: NodeId },
}

/// A replica on its way in: where its `MemberJoin` is, and where it listens
/// (so that whichever replica leads can admit it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Joiner {
    pub at: u64,
    pub addr: String,
}

/// What every replica agrees on, derived from the log alone; a Raft snapshot is this.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupState {
    pub elections: Elections,
    /// The replica facing Jupyter.
    pub front: NodeId,
    /// Voting members, as of the last membership entry.
    pub voters: BTreeSet<NodeId>,
    /// Replicas whose `MemberJoin` is in the log and whose checkpoint is not yet.
    pub joining: BTreeMap<NodeId, Joiner>,
    /// Replicas whose checkpoint is in the log: ready to vote.
    pub checkpointed: BTreeSet<NodeId>,
    pub checkpoint: Option<CheckpointRef>,
    /// The last [`RECENT_DELTAS`] deltas, oldest first.
    pub deltas: VecDeque<DeltaRef>,
    /// Index of the newest delta that fell out of `deltas` (0: none did).
    pub deltas_forgotten_upto: u64,
    /// The last [`RECENT_REPLIES`] finished cells, oldest first.
    pub finished: VecDeque<(CellId, CellResult)>,
    /// The last decided cell's winner.
    pub last_winner: Option<NodeId>,
    /// Replicas steered to yield every cell ([`Entry::Steer`]).
    pub yielding: BTreeSet<NodeId>,
    /// Cells whose changes have not reached the log yet, oldest first; all by one replica,
    /// since only it may lead until they have.
    pub unsynced: VecDeque<Unsynced>,
    /// The last [`RECENT_LOSSES`] losses of unsynced changes.
    pub lost: VecDeque<LostChanges>,
    /// Replicas whose checkpoint is in the log but not yet their `Restored`: their
    /// namespace may still be empty, so they make no checkpoint for anyone.
    /// (Fields are positional in a snapshot: new ones go last.)
    pub restoring: BTreeSet<NodeId>,
}

impl GroupState {
    /// The replica whose namespace is ahead of the others', if one is.
    pub fn holder(&self) -> Option<NodeId> {
        self.unsynced.front().map(|u| u.replica)
    }

    /// Whether `replica`'s LEAD counts: it holds every change committed so far. Any other
    /// replica may lead only once the holder's changes are all in the log (it applies them
    /// before running anything after them).
    pub fn may_lead(&self, replica: NodeId) -> bool {
        self.holder().is_none_or(|h| h == replica)
    }
}

/// What a replica must do because of an entry. Carried out in order by the replica's
/// executor; the ones that touch the namespace (`ApplyDelta`, `Restore`) one at a time.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Bid on a cell: LEAD if this replica can run it now, else YIELD.
    Bid { cell: CellId },
    /// This replica won the cell: run it (`control`: see [`Entry::Request`]).
    Run {
        cell: CellId,
        request: Frames,
        control: Option<Frames>,
    },
    /// Give back any GPUs taken for the cell (the election went elsewhere).
    ReleaseGpus { cell: CellId },
    /// Every live replica yielded: tell the user (the front only).
    Queued { cell: CellId, request: Frames },
    /// The cell ended (the front answers Jupyter).
    Resolve { cell: CellId, result: CellResult },
    /// Apply another replica's namespace changes.
    ApplyDelta(DeltaRef),
    /// Changes only a downed replica held are gone: tell the user (the front only).
    ChangesLost(LostChanges),
    /// This replica's checkpoint is in the log: restore it, then apply `replay`.
    Restore {
        checkpoint: CheckpointRef,
        replay: Vec<DeltaRef>,
    },
    /// Drop a checkpoint blob that was pushed here for someone else.
    DropBlob { blob: [u8; 32] },
    /// A replica asks to join: the Raft leader adds it and sends it a checkpoint.
    AddMember { replica: NodeId, addr: String },
    /// Compute the namespace digest and mail it to `to`.
    AnswerVerify { nonce: String, to: NodeId },
    /// Another replica is down (the front replaces it).
    MemberDown { replica: NodeId },
    /// This replica's namespace can no longer follow the group's: ask to be replaced.
    Leave { reason: String },
    /// This replica was removed from the group, or the kernel shuts down.
    Stop { shutdown: bool },
}

/// This replica's own progress, never shared.
#[derive(Debug, Clone, PartialEq)]
enum Local {
    Current,
    /// Joining: no part in elections until its checkpoint. After its own `MemberJoin`,
    /// deltas are kept to replay those the checkpoint does not include.
    Joining {
        joined: bool,
        buffered: Vec<DeltaRef>,
    },
    /// Left the group after its namespace diverged; waits to be stopped.
    Left,
}

/// The group state plus what this replica alone knows.
#[derive(Debug, Clone)]
pub struct Applier {
    me: NodeId,
    state: GroupState,
    local: Local,
    /// Index of the last entry applied (or of the installed snapshot).
    applied: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("undecodable replica snapshot: {0}")]
    Decode(#[from] postcard::Error),
}

impl Applier {
    /// `joining`: this replica enters a running group and waits for a checkpoint.
    pub fn new(me: NodeId, front: NodeId, joining: bool) -> Self {
        Self {
            me,
            state: GroupState {
                front,
                ..GroupState::default()
            },
            local: if joining {
                Local::Joining {
                    joined: false,
                    buffered: Vec::new(),
                }
            } else {
                Local::Current
            },
            applied: 0,
        }
    }

    pub fn state(&self) -> &GroupState {
        &self.state
    }

    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Catching up (or left): takes no part in elections.
    pub fn is_restoring(&self) -> bool {
        !matches!(self.local, Local::Current)
    }

    /// Whether this replica must yield: catching up, or steered to.
    pub fn must_yield(&self) -> bool {
        self.is_restoring() || self.state.yielding.contains(&self.me)
    }

    /// The namespace diverged; ignore later deltas until this replica is replaced.
    pub fn left(&mut self) {
        self.local = Local::Left;
    }

    pub fn membership(&mut self, voters: BTreeSet<NodeId>) {
        self.state.voters = voters;
    }

    pub fn snapshot(&self) -> Vec<u8> {
        // Plain data into a Vec: cannot fail.
        postcard::to_stdvec(&self.state).unwrap_or_default()
    }

    /// Replaces the group state with a snapshot's taken at `index`. A replica that was
    /// current must still end up with every cell's changes: it applies the snapshot's recent
    /// deltas it had not seen, or, if some fell out of it, leaves to be replaced.
    pub fn install(&mut self, index: u64, data: &[u8]) -> Result<Vec<Effect>, SnapshotError> {
        let state: GroupState = postcard::from_bytes(data)?;
        let before = self.applied;
        let mut restore_now = None;
        let mut fx: Vec<Effect> = state
            .lost
            .iter()
            .filter(|l| l.index > before)
            .cloned()
            .map(Effect::ChangesLost)
            .collect();
        self.state = state;
        self.applied = index;
        match &mut self.local {
            Local::Current => {
                if self.state.deltas_forgotten_upto > before {
                    let reason = format!(
                        "caught up by a snapshot at log index {index} that no longer lists the \
                         deltas after {before}"
                    );
                    self.local = Local::Left;
                    fx.push(Effect::Leave { reason });
                    return Ok(fx);
                }
                fx.extend(
                    self.state
                        .deltas
                        .iter()
                        .filter(|d| d.index > before && d.from != self.me)
                        .cloned()
                        .map(Effect::ApplyDelta),
                );
            }
            Local::Joining { joined, buffered } => {
                // Our own Checkpoint, if the snapshot still lists every delta after it.
                let own =
                    self.state.checkpoint.clone().filter(|c| {
                        c.replica == self.me && self.state.deltas_forgotten_upto <= c.upto
                    });
                if let Some(joiner) = self.state.joining.get(&self.me) {
                    *joined = true;
                    buffer_new(
                        buffered,
                        self.state.deltas.iter().filter(|d| d.index > joiner.at),
                    );
                } else if let Some(checkpoint) = own {
                    // Our own Checkpoint is inside the snapshot: restore it now,
                    // then what the snapshot lists after it.
                    buffer_new(buffered, self.state.deltas.iter());
                    buffered.sort_by_key(|d| d.index);
                    restore_now = Some(checkpoint);
                } else if self.state.checkpointed.contains(&self.me) {
                    // Our checkpoint was overwritten by a later one, or deltas after
                    // it fell out of the snapshot: this replica cannot catch up.
                    let reason = format!(
                        "joined by a snapshot at log index {index} that no longer holds \
                         this replica's checkpoint and the deltas after it"
                    );
                    self.local = Local::Left;
                    fx.push(Effect::Leave { reason });
                    return Ok(fx);
                }
            }
            Local::Left => return Ok(fx),
        }
        if let Some(checkpoint) = restore_now {
            self.start_restore(&mut fx, checkpoint);
        }
        if self.is_restoring() {
            return Ok(fx);
        }
        // Elections the snapshot carries: bid on the open ones, run what we won.
        for (cell, won) in self.state.elections.won_by(self.me) {
            fx.push(Effect::Run {
                cell,
                request: won.request,
                control: won.control,
            });
        }
        self.bid_on_undecided(&mut fx);
        fx.extend(
            self.state
                .finished
                .iter()
                .map(|(cell, result)| Effect::Resolve {
                    cell: cell.clone(),
                    result: result.clone(),
                }),
        );
        Ok(fx)
    }

    /// Applies one committed entry at log index `index`.
    pub fn apply(&mut self, index: u64, entry: Entry) -> Vec<Effect> {
        self.applied = index;
        let mut fx = Vec::new();
        match entry {
            Entry::Request {
                cell,
                request,
                lead,
                control,
                only,
            } => {
                if let Some(owner) = only.filter(|r| self.state.elections.is_down(*r)) {
                    self.finished(&mut fx, cell, CellResult::Lost { replica: owner });
                    return fx;
                }
                self.state
                    .elections
                    .open_for(cell.clone(), request, control.map(|c| *c), only);
                match lead {
                    Some(replica) => self.bid(&mut fx, cell, replica, true),
                    None if self.is_restoring() => {}
                    None if only.is_none_or(|r| r == self.me) => fx.push(Effect::Bid { cell }),
                    None => {}
                }
            }
            Entry::Bid {
                cell,
                replica,
                lead,
            } => self.bid(&mut fx, cell, replica, lead),
            Entry::Done {
                cell,
                replica,
                reply,
                delta,
            } => {
                let Some(finished) = self.state.elections.finish(&cell, replica) else {
                    return fx;
                };
                match delta {
                    Some(delta) => self.changes(&mut fx, index, replica, delta),
                    None => self.state.unsynced.push_back(Unsynced {
                        cell: cell.clone(),
                        replica,
                        execution_count: execution_count(&reply),
                        comm: finished.only.is_some(),
                    }),
                }
                self.finished(&mut fx, cell, CellResult::Reply(reply));
            }
            Entry::Synced {
                cell,
                replica,
                delta,
            } => {
                // None: a duplicate, or its maker was downed first (the loss is reported).
                let pending = self
                    .state
                    .unsynced
                    .iter()
                    .position(|u| u.cell == cell && u.replica == replica);
                if let Some(at) = pending {
                    self.state.unsynced.remove(at);
                    self.changes(&mut fx, index, replica, delta);
                }
            }
            Entry::MemberDown { replica } => {
                for (cell, _) in self.state.elections.replica_down(replica) {
                    self.finished(&mut fx, cell, CellResult::Lost { replica });
                }
                self.lose_unsynced(&mut fx, index, replica);
                self.state.joining.remove(&replica);
                self.state.restoring.remove(&replica);
                if replica == self.me {
                    fx.push(Effect::Stop { shutdown: false });
                } else {
                    fx.push(Effect::MemberDown { replica });
                }
            }
            Entry::MemberJoin {
                replica,
                addr,
                front,
            } => {
                if front {
                    self.state.front = replica;
                }
                self.state.joining.insert(
                    replica,
                    Joiner {
                        at: index,
                        addr: addr.clone(),
                    },
                );
                if replica == self.me {
                    if let Local::Joining { joined, .. } = &mut self.local {
                        *joined = true;
                    }
                } else {
                    fx.push(Effect::AddMember { replica, addr });
                }
            }
            Entry::Checkpoint {
                replica,
                from,
                blob,
                upto,
            } => {
                let checkpoint = CheckpointRef {
                    replica,
                    from,
                    blob,
                    upto,
                };
                // Only its first: a second (two leaders admitting it) must not
                // undo its Restored; a dead replica restores nothing.
                if self.state.checkpointed.insert(replica) && !self.state.elections.is_down(replica)
                {
                    self.state.restoring.insert(replica);
                }
                self.state.joining.remove(&replica);
                self.state.checkpoint = Some(checkpoint.clone());
                if replica == self.me {
                    self.restore(&mut fx, checkpoint);
                } else if from != self.me {
                    // Its maker keeps it a while for a joiner whose push was lost.
                    fx.push(Effect::DropBlob { blob });
                }
            }
            Entry::Restored { replica } => {
                self.state.restoring.remove(&replica);
            }
            Entry::Verify { nonce, from } => {
                if from != self.me && !self.is_restoring() {
                    fx.push(Effect::AnswerVerify { nonce, to: from });
                }
            }
            Entry::Shutdown => fx.push(Effect::Stop { shutdown: true }),
            // Bids read it; a replica that yielded re-bids on its own.
            Entry::Steer { yielding } => self.state.yielding = yielding,
        }
        fx
    }

    fn bid(&mut self, fx: &mut Vec<Effect>, cell: CellId, replica: NodeId, lead: bool) {
        let refused = lead && !self.state.may_lead(replica);
        if refused && replica == self.me {
            fx.push(Effect::ReleaseGpus { cell: cell.clone() });
        }
        let lead = lead && !refused;
        let voters = self.state.voters.clone();
        match self.state.elections.bid(&cell, replica, lead, &voters) {
            BidOutcome::Won(winner) => {
                self.state.last_winner = Some(winner);
                if winner == self.me {
                    if let Some(c) = self.state.elections.get(&cell) {
                        fx.push(Effect::Run {
                            cell,
                            request: c.request.clone(),
                            control: c.control.clone(),
                        });
                    }
                } else {
                    fx.push(Effect::ReleaseGpus { cell });
                }
            }
            BidOutcome::AllYielded => {
                if let Some(c) = self.state.elections.get(&cell) {
                    fx.push(Effect::Queued {
                        cell,
                        request: c.request.clone(),
                    });
                }
            }
            // A late LEAD of ours: its GPUs go back, unless ours is the winning one
            // (a retried proposal applied twice).
            BidOutcome::Ignored
                if replica == self.me
                    && lead
                    && self.state.elections.get(&cell).and_then(|c| c.winner) != Some(self.me) =>
            {
                fx.push(Effect::ReleaseGpus { cell });
            }
            BidOutcome::Open | BidOutcome::Ignored => {}
        }
    }

    fn finished(&mut self, fx: &mut Vec<Effect>, cell: CellId, result: CellResult) {
        self.state
            .finished
            .push_back((cell.clone(), result.clone()));
        while self.state.finished.len() > RECENT_REPLIES {
            self.state.finished.pop_front();
        }
        fx.push(Effect::Resolve { cell, result });
    }

    /// A cell's changes are in the log at `index`: every other replica applies them.
    fn changes(&mut self, fx: &mut Vec<Effect>, index: u64, from: NodeId, delta: Delta) {
        let delta = DeltaRef { index, from, delta };
        self.remember_delta(delta.clone());
        if from != self.me {
            self.take_delta(fx, delta);
        }
    }

    /// `replica` is down: the changes only it held are gone, and the others may lead.
    fn lose_unsynced(&mut self, fx: &mut Vec<Effect>, index: u64, replica: NodeId) {
        let (cells, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.state.unsynced)
            .into_iter()
            .partition(|u| u.replica == replica);
        self.state.unsynced = kept.into();
        if cells.is_empty() {
            return;
        }
        let lost = LostChanges {
            index,
            replica,
            cells,
        };
        self.state.lost.push_back(lost.clone());
        while self.state.lost.len() > RECENT_LOSSES {
            self.state.lost.pop_front();
        }
        fx.push(Effect::ChangesLost(lost));
    }

    fn remember_delta(&mut self, delta: DeltaRef) {
        self.state.deltas.push_back(delta);
        while self.state.deltas.len() > RECENT_DELTAS {
            if let Some(old) = self.state.deltas.pop_front() {
                self.state.deltas_forgotten_upto = old.index;
            }
        }
    }

    fn take_delta(&mut self, fx: &mut Vec<Effect>, delta: DeltaRef) {
        match &mut self.local {
            Local::Current => fx.push(Effect::ApplyDelta(delta)),
            // Before our MemberJoin the checkpoint covers it.
            Local::Joining { joined: false, .. } | Local::Left => {}
            Local::Joining {
                joined: true,
                buffered,
            } => buffered.push(delta),
        }
    }

    fn restore(&mut self, fx: &mut Vec<Effect>, checkpoint: CheckpointRef) {
        if self.start_restore(fx, checkpoint) {
            // Cells that were waiting for bids while we caught up.
            self.bid_on_undecided(fx);
        }
    }

    /// Joining to current: restore `checkpoint`, then replay the deltas buffered
    /// after it. False if this replica was not joining.
    fn start_restore(&mut self, fx: &mut Vec<Effect>, checkpoint: CheckpointRef) -> bool {
        let Local::Joining { buffered, .. } = &mut self.local else {
            return false;
        };
        let replay: Vec<DeltaRef> = std::mem::take(buffered)
            .into_iter()
            .filter(|d| d.index > checkpoint.upto)
            .collect();
        self.local = Local::Current;
        fx.push(Effect::Restore { checkpoint, replay });
        true
    }

    fn bid_on_undecided(&self, fx: &mut Vec<Effect>) {
        let undecided = self.state.elections.undecided_for(self.me);
        fx.extend(undecided.into_iter().map(|cell| Effect::Bid { cell }));
    }
}

/// Appends the deltas `buffered` does not hold yet.
fn buffer_new<'a>(buffered: &mut Vec<DeltaRef>, deltas: impl Iterator<Item = &'a DeltaRef>) {
    for d in deltas {
        if !buffered.iter().any(|b| b.index == d.index) {
            buffered.push(d.clone());
        }
    }
}

/// The `execution_count` of an execute reply's JSON.
fn execution_count(reply: &str) -> Option<i64> {
    #[derive(Deserialize)]
    struct Count {
        execution_count: Option<i64>,
    }
    serde_json::from_str::<Count>(reply).ok()?.execution_count
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn request(cell: &str, lead: Option<NodeId>) -> Entry {
        Entry::Request {
            cell: cell.into(),
            request: Frames::default(),
            lead,
            control: None,
            only: None,
        }
    }

    fn bid(cell: &str, replica: NodeId, lead: bool) -> Entry {
        Entry::Bid {
            cell: cell.into(),
            replica,
            lead,
        }
    }

    fn done(cell: &str, replica: NodeId, tag: &'static [u8]) -> Entry {
        Entry::Done {
            cell: cell.into(),
            replica,
            reply: format!("reply {cell}"),
            delta: Some(Delta::Inline(Bytes::from_static(tag))),
        }
    }

    /// Three replicas of a fresh group, with their voters set.
    fn group() -> Vec<Applier> {
        (1..=3)
            .map(|me| {
                let mut a = Applier::new(me, 1, false);
                a.membership(BTreeSet::from([1, 2, 3]));
                a
            })
            .collect()
    }

    /// Applies `log` (from index `start`) to `a`, returning every effect.
    fn run(a: &mut Applier, start: u64, log: &[Entry]) -> Vec<Effect> {
        log.iter()
            .enumerate()
            .flat_map(|(i, e)| a.apply(start + i as u64, e.clone()))
            .collect()
    }

    fn runs(fx: &[Effect]) -> Vec<&str> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Run { cell, .. } => Some(cell.as_str()),
                _ => None,
            })
            .collect()
    }

    fn deltas(fx: &[Effect]) -> Vec<u64> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::ApplyDelta(d) => Some(d.index),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_proposers_lead_wins_and_only_the_winner_runs() {
        let log = [request("a", Some(1)), bid("a", 2, true), done("a", 1, b"d")];
        let mut g = group();
        let fx: Vec<_> = g.iter_mut().map(|a| run(a, 1, &log)).collect();
        assert_eq!(runs(&fx[0]), vec!["a"]);
        assert!(runs(&fx[1]).is_empty() && runs(&fx[2]).is_empty());
        // Replica 2's late LEAD is ignored: it gives its GPUs back.
        assert!(fx[1].contains(&Effect::ReleaseGpus { cell: "a".into() }));
        // The others apply the winner's delta; the winner does not re-apply its own.
        assert!(deltas(&fx[0]).is_empty());
        assert_eq!(deltas(&fx[1]), vec![3]);
        assert_eq!(deltas(&fx[2]), vec![3]);
        for f in &fx {
            assert!(f.contains(&Effect::Resolve {
                cell: "a".into(),
                result: CellResult::Reply("reply a".into())
            }));
        }
        // Every replica holds the same group state.
        assert_eq!(g[0].state(), g[1].state());
        assert_eq!(g[1].state(), g[2].state());
    }

    fn comm(cell: &str, owner: NodeId) -> Entry {
        Entry::Request {
            cell: cell.into(),
            request: Frames::default(),
            lead: None,
            control: None,
            only: Some(owner),
        }
    }

    #[test]
    fn a_comm_message_runs_only_on_its_owner_or_is_lost_with_it() {
        let log = [comm("m", 2), bid("m", 1, true), bid("m", 2, true)];
        let mut g = group();
        let fx: Vec<_> = g.iter_mut().map(|a| run(a, 1, &log)).collect();
        assert!(!fx[0].contains(&Effect::Bid { cell: "m".into() }));
        assert!(fx[1].contains(&Effect::Bid { cell: "m".into() }));
        assert!(!fx[2].contains(&Effect::Bid { cell: "m".into() }));
        assert!(runs(&fx[0]).is_empty() && runs(&fx[2]).is_empty());
        assert_eq!(runs(&fx[1]), vec!["m"]);

        // Its owner goes down before it ran: the front hears it is lost,
        // and so it hears of a later one for the same owner.
        let log = [comm("n", 3), Entry::MemberDown { replica: 3 }, comm("o", 3)];
        let fx = run(&mut group()[0], 1, &log);
        for cell in ["n", "o"] {
            assert!(fx.contains(&Effect::Resolve {
                cell: cell.into(),
                result: CellResult::Lost { replica: 3 }
            }));
        }

        // It ran, and its owner went down before its changes left: the loss
        // names it as a comm message, not as a cell.
        let log = [
            comm("p", 2),
            bid("p", 2, true),
            done_later("p", 2, 0),
            Entry::MemberDown { replica: 2 },
        ];
        let fx = run(&mut group()[0], 1, &log);
        let comms: Vec<bool> = fx
            .iter()
            .filter_map(|e| match e {
                Effect::ChangesLost(l) => Some(l.cells.iter().map(|u| u.comm)),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(comms, vec![true]);
    }

    #[test]
    fn yields_queue_the_cell_until_a_lead_in_log_order() {
        let log = [
            request("a", None),
            bid("a", 1, false),
            bid("a", 2, false),
            bid("a", 3, false),
            bid("a", 3, true),
            bid("a", 2, true),
        ];
        let mut g = group();
        let fx = run(&mut g[0], 1, &log);
        assert!(fx.contains(&Effect::Bid { cell: "a".into() }));
        assert!(fx.iter().any(|e| matches!(e, Effect::Queued { .. })));
        let fx3 = run(&mut g[2], 1, &log);
        assert_eq!(runs(&fx3), vec!["a"], "the first LEAD (replica 3) wins");
        assert_eq!(g[2].state().last_winner, Some(3));
        assert_eq!(g[0].state(), g[2].state());
    }

    #[test]
    fn a_winner_that_dies_loses_its_cell_and_no_late_done_applies() {
        let log = [
            request("a", Some(2)),
            Entry::MemberDown { replica: 2 },
            done("a", 2, b"late"),
            request("b", None),
            bid("b", 2, true),
        ];
        let mut g = group();
        let fx = run(&mut g[0], 1, &log);
        assert!(fx.contains(&Effect::Resolve {
            cell: "a".into(),
            result: CellResult::Lost { replica: 2 }
        }));
        assert!(fx.contains(&Effect::MemberDown { replica: 2 }));
        assert!(deltas(&fx).is_empty(), "a Done after the winner's death");
        assert!(runs(&fx).is_empty());
        assert_eq!(
            g[0].state().elections.winner("b"),
            None,
            "a downed replica cannot bid"
        );
        // The dead replica itself stops.
        let fx2 = run(&mut g[1], 1, &log[..2]);
        assert!(fx2.contains(&Effect::Stop { shutdown: false }));
    }

    #[test]
    fn a_joiner_restores_its_checkpoint_then_replays_what_it_missed() {
        // Replica 4 joins at index 2; the checkpoint includes deltas up to index 3.
        let log = [
            request("a", Some(1)),
            Entry::MemberJoin {
                replica: 4,
                addr: "127.0.0.1:4".into(),
                front: false,
            },
            done("a", 1, b"a"),
            request("b", Some(1)),
            done("b", 1, b"b"),
            Entry::Checkpoint {
                replica: 4,
                from: 1,
                blob: [7; 32],
                upto: 3,
            },
            request("c", None),
        ];
        let mut joiner = Applier::new(4, 1, true);
        joiner.membership(BTreeSet::from([1, 2, 3]));
        let fx = run(&mut joiner, 1, &log);
        assert!(
            deltas(&fx).is_empty(),
            "nothing applied before the checkpoint"
        );
        let restore = fx.iter().find_map(|e| match e {
            Effect::Restore { checkpoint, replay } => Some((checkpoint.upto, replay.clone())),
            _ => None,
        });
        let (upto, replay) = restore.expect("a restore");
        assert_eq!(upto, 3);
        assert_eq!(replay.iter().map(|d| d.index).collect::<Vec<_>>(), vec![5]);
        assert!(
            fx.contains(&Effect::Bid { cell: "c".into() }),
            "bids once current"
        );
        assert!(!joiner.is_restoring());
        // The others: the leader adds it; a bystander drops the blob pushed to it.
        let mut g = group();
        let fx2 = run(&mut g[1], 1, &log);
        assert!(fx2.contains(&Effect::AddMember {
            replica: 4,
            addr: "127.0.0.1:4".into()
        }));
        assert!(fx2.contains(&Effect::DropBlob { blob: [7; 32] }));
        assert_eq!(g[1].state().checkpointed, BTreeSet::from([4]));
        assert!(g[1].state().joining.is_empty());
        // Until it says its checkpoint is restored, its namespace may be empty.
        assert_eq!(g[1].state().restoring, BTreeSet::from([4]));
        let restored = run(
            &mut g[1],
            1 + log.len() as u64,
            &[Entry::Restored { replica: 4 }],
        );
        assert!(restored.is_empty());
        assert!(g[1].state().restoring.is_empty());
    }

    #[test]
    fn a_joiner_that_dies_restoring_is_no_longer_restoring() {
        let mut a = Applier::new(1, 1, false);
        a.membership(BTreeSet::from([1, 2, 3]));
        let checkpoint = Entry::Checkpoint {
            replica: 4,
            from: 1,
            blob: [7; 32],
            upto: 1,
        };
        run(&mut a, 1, &[checkpoint, Entry::MemberDown { replica: 4 }]);
        assert!(a.state().restoring.is_empty());
    }

    /// A replica that installs a snapshot and then the tail ends in the same group state,
    /// with the same effects for the tail, as one that applied the whole log.
    #[test]
    fn snapshot_plus_tail_equals_the_full_log() {
        let mut log = Vec::new();
        for i in 0..100 {
            let cell = format!("c{i}");
            log.push(request(&cell, Some(1 + i % 3)));
            log.push(bid(&cell, 1 + (i + 1) % 3, false));
            log.push(done(&cell, 1 + i % 3, b"x"));
        }
        log.push(Entry::MemberDown { replica: 3 });
        log.push(request("last", None));
        let cut = 150;
        let mut full = Applier::new(2, 1, false);
        full.membership(BTreeSet::from([1, 2, 3]));
        run(&mut full, 1, &log[..cut]);
        let snapshot = full.snapshot();
        let tail_full = run(&mut full, 1 + cut as u64, &log[cut..]);

        let mut fresh = Applier::new(2, 1, false);
        fresh.applied = cut as u64;
        fresh.install(cut as u64, &snapshot).unwrap();
        let tail_fresh = run(&mut fresh, 1 + cut as u64, &log[cut..]);
        assert_eq!(fresh.state(), full.state());
        assert_eq!(tail_fresh, tail_full);
        // Bounded: the state after 100 cells holds a few deltas and replies, not the log.
        assert_eq!(full.state().deltas.len(), RECENT_DELTAS);
        assert!(full.state().finished.len() <= RECENT_REPLIES);
        assert!(full.state().elections.undecided_for(1) == vec!["last".to_string()]);
    }

    #[test]
    fn a_lagging_replica_catches_up_deltas_from_a_snapshot_or_leaves() {
        let mut log = Vec::new();
        for i in 0..30u64 {
            let cell = format!("c{i}");
            log.push(request(&cell, Some(1)));
            log.push(done(&cell, 1, b"x"));
        }
        let mut leader = group().remove(0);
        run(&mut leader, 1, &log);
        let snap = leader.snapshot();
        // Replica 2 applied up to index 50 (25 cells); the snapshot still lists the rest.
        let mut near = group().remove(1);
        run(&mut near, 1, &log[..50]);
        let fx = near.install(60, &snap).unwrap();
        assert_eq!(deltas(&fx), vec![52, 54, 56, 58, 60]);
        // Replica 3 applied only 10 entries: deltas it needs were forgotten.
        let mut far = group().remove(2);
        run(&mut far, 1, &log[..10]);
        let fx = far.install(60, &snap).unwrap();
        assert!(matches!(fx.as_slice(), [Effect::Leave { .. }]));
        assert!(far.is_restoring());
    }

    #[test]
    fn a_joiner_whose_join_is_inside_the_snapshot_keeps_the_deltas_after_it() {
        let log = [
            Entry::MemberJoin {
                replica: 4,
                addr: "a".into(),
                front: false,
            },
            request("a", Some(1)),
            done("a", 1, b"a"),
        ];
        let mut leader = group().remove(0);
        run(&mut leader, 1, &log);
        let mut joiner = Applier::new(4, 1, true);
        assert!(joiner.install(3, &leader.snapshot()).unwrap().is_empty());
        let fx = joiner.apply(
            4,
            Entry::Checkpoint {
                replica: 4,
                from: 1,
                blob: [1; 32],
                upto: 1,
            },
        );
        let replay = fx.iter().find_map(|e| match e {
            Effect::Restore { replay, .. } => Some(replay.clone()),
            _ => None,
        });
        assert_eq!(
            replay.unwrap().iter().map(|d| d.index).collect::<Vec<_>>(),
            vec![3]
        );
    }

    #[test]
    fn a_joiner_whose_own_checkpoint_is_inside_the_snapshot_restores_it_or_leaves() {
        let checkpoint = Entry::Checkpoint {
            replica: 4,
            from: 1,
            blob: [1; 32],
            upto: 2,
        };
        let join = Entry::MemberJoin {
            replica: 4,
            addr: "a".into(),
            front: false,
        };
        let log = [
            join,
            checkpoint.clone(),
            request("a", Some(1)),
            done("a", 1, b"a"),
        ];
        let mut leader = group().remove(0);
        run(&mut leader, 1, &log);
        let mut joiner = Applier::new(4, 1, true);
        let fx = joiner.install(4, &leader.snapshot()).unwrap();
        let replay = fx.iter().find_map(|e| match e {
            Effect::Restore { checkpoint, replay } => Some((checkpoint.upto, replay.clone())),
            _ => None,
        });
        let (upto, replay) = replay.expect("restores its checkpoint");
        assert_eq!(upto, 2);
        assert_eq!(replay.iter().map(|d| d.index).collect::<Vec<_>>(), vec![4]);
        assert!(!joiner.is_restoring());

        // A later checkpoint (someone else's) overwrote ours: we cannot catch up.
        let other = Entry::Checkpoint {
            replica: 5,
            from: 1,
            blob: [2; 32],
            upto: 4,
        };
        run(&mut leader, 5, &[other]);
        let mut late = Applier::new(4, 1, true);
        let fx = late.install(5, &leader.snapshot()).unwrap();
        assert!(matches!(fx.as_slice(), [Effect::Leave { .. }]), "{fx:?}");
        assert!(late.is_restoring());
    }

    #[test]
    fn a_second_checkpoint_for_a_restored_replica_does_not_make_it_restoring_again() {
        let checkpoint = Entry::Checkpoint {
            replica: 4,
            from: 1,
            blob: [1; 32],
            upto: 1,
        };
        let mut a = group().remove(0);
        run(
            &mut a,
            1,
            &[
                checkpoint.clone(),
                Entry::Restored { replica: 4 },
                checkpoint,
            ],
        );
        assert!(a.state().restoring.is_empty());
    }

    #[test]
    fn a_restarted_front_takes_over_and_shutdown_stops_everyone() {
        let mut g = group();
        let fx = g[1].apply(
            1,
            Entry::MemberJoin {
                replica: 5,
                addr: "x".into(),
                front: true,
            },
        );
        assert_eq!(g[1].state().front, 5);
        assert!(matches!(
            fx.as_slice(),
            [Effect::AddMember { replica: 5, .. }]
        ));
        assert_eq!(
            g[1].apply(2, Entry::Shutdown),
            vec![Effect::Stop { shutdown: true }]
        );
    }

    #[test]
    fn steering_is_in_the_log_and_the_snapshot() {
        let mut g = group();
        let steer = Entry::Steer {
            yielding: BTreeSet::from([1, 3]),
        };
        for a in g.iter_mut() {
            assert!(a.apply(1, steer.clone()).is_empty());
        }
        assert!(g[0].must_yield() && !g[1].must_yield() && g[2].must_yield());
        let mut copy = Applier::new(3, 1, false);
        copy.install(1, &g[0].snapshot()).unwrap();
        assert!(copy.must_yield());
        g[0].apply(
            2,
            Entry::Steer {
                yielding: BTreeSet::new(),
            },
        );
        assert!(!g[0].must_yield());
    }

    #[test]
    fn garbage_snapshots_are_errors() {
        let mut a = Applier::new(1, 1, false);
        assert!(a.install(1, &[0xff, 0xff, 0xff, 0xff]).is_err());
    }

    /// A `Done` whose changes follow in a `Synced`, for `In[count]`.
    fn done_later(cell: &str, replica: NodeId, count: i64) -> Entry {
        Entry::Done {
            cell: cell.into(),
            replica,
            reply: format!(r#"{{"status":"ok","execution_count":{count}}}"#),
            delta: None,
        }
    }

    fn synced(cell: &str, replica: NodeId, tag: &'static [u8]) -> Entry {
        Entry::Synced {
            cell: cell.into(),
            replica,
            delta: Delta::Inline(Bytes::from_static(tag)),
        }
    }

    #[test]
    fn only_the_winner_may_lead_until_its_changes_are_in_the_log() {
        let log = [
            request("a", Some(2)),
            done_later("a", 2, 1),
            request("b", None),
            bid("b", 3, true),
            bid("b", 1, true),
            synced("a", 2, b"d"),
            bid("b", 3, true),
        ];
        let mut g = group();
        let fx: Vec<_> = g.iter_mut().map(|a| run(a, 1, &log)).collect();
        // The reply resolves at the Done, before the changes are in the log.
        assert!(fx[0].contains(&Effect::Resolve {
            cell: "a".into(),
            result: CellResult::Reply(r#"{"status":"ok","execution_count":1}"#.into()),
        }));
        // Replica 3's first LEAD and replica 1's are refused; after the Synced, 3 wins.
        assert_eq!(runs(&fx[2]), vec!["b"]);
        assert!(fx[2].contains(&Effect::ReleaseGpus { cell: "b".into() }));
        // And it applies the changes (at the Synced's index) before it runs the cell.
        let order: Vec<_> = fx[2]
            .iter()
            .filter(|e| matches!(e, Effect::ApplyDelta(_) | Effect::Run { .. }))
            .collect();
        assert!(matches!(order[0], Effect::ApplyDelta(d) if d.index == 6 && d.from == 2));
        assert!(matches!(order[1], Effect::Run { .. }));
        assert!(
            deltas(&fx[1]).is_empty(),
            "the winner does not apply its own"
        );
        assert_eq!(deltas(&fx[0]), vec![6]);
        assert!(g.iter().all(|a| a.state().unsynced.is_empty()));
        assert_eq!(g[0].state(), g[2].state());
    }

    #[test]
    fn the_winner_keeps_the_lead_while_its_changes_stream() {
        let log = [
            request("a", Some(1)),
            done_later("a", 1, 1),
            request("b", Some(1)),
            done_later("b", 1, 2),
        ];
        let mut g = group();
        let fx = run(&mut g[0], 1, &log);
        assert_eq!(runs(&fx), vec!["a", "b"]);
        assert_eq!(g[0].state().holder(), Some(1));
        assert_eq!(g[0].state().unsynced.len(), 2);
        // In the order they ran, each applied once by the others.
        let fx2 = run(&mut g[1], 1, &log);
        let more = run(
            &mut g[1],
            5,
            &[
                synced("a", 1, b"a"),
                synced("b", 1, b"b"),
                synced("b", 1, b"b"),
            ],
        );
        assert!(deltas(&fx2).is_empty());
        assert_eq!(deltas(&more), vec![5, 6]);
    }

    #[test]
    fn changes_lost_with_their_only_holder_are_reported_and_a_late_synced_ignored() {
        let log = [
            request("a", Some(1)),
            synced_done("a", 1),
            request("b", Some(2)),
            done_later("b", 2, 2),
            request("c", Some(2)),
            done_later("c", 2, 3),
            Entry::MemberDown { replica: 2 },
            synced("b", 2, b"late"),
            request("d", Some(3)),
        ];
        let mut g = group();
        let fx = run(&mut g[0], 1, &log);
        let lost: Vec<_> = fx
            .iter()
            .filter_map(|e| match e {
                Effect::ChangesLost(l) => Some(l.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(lost.len(), 1);
        assert_eq!((lost[0].index, lost[0].replica), (7, 2));
        let counts: Vec<_> = lost[0].cells.iter().map(|u| u.execution_count).collect();
        assert_eq!(counts, vec![Some(2), Some(3)]);
        let fx3 = run(&mut g[2], 1, &log);
        assert_eq!(deltas(&fx3), vec![2], "only cell a's changes apply");
        assert_eq!(runs(&fx3), vec!["d"], "a survivor may lead again");
        // A front that catches up by snapshot still hears of the loss.
        let mut late = Applier::new(1, 1, false);
        let fx = late.install(9, &g[2].snapshot()).unwrap();
        assert!(fx.contains(&Effect::ChangesLost(lost[0].clone())));
    }

    fn synced_done(cell: &str, replica: NodeId) -> Entry {
        done(cell, replica, b"a")
    }

    #[test]
    fn a_duplicate_of_the_winning_lead_keeps_its_gpus() {
        let mut g = group();
        let fx = run(&mut g[0], 1, &[request("a", Some(1)), bid("a", 1, true)]);
        assert_eq!(runs(&fx), vec!["a"]);
        assert!(!fx.contains(&Effect::ReleaseGpus { cell: "a".into() }));
    }
}
