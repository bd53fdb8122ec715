//! [`ReplicaNode`]: the façade the kernel uses to run one replica.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use openraft::error::{ClientWriteError, InitializeError, RaftError};
pub use openraft::ServerState;
use openraft::{BasicNode, ChangeMembers};
use serde::Serialize;

use crate::bulk::{self, BlobHash};
use crate::config::ReplicaConfig;
use crate::connection::Transport;
use crate::error::{Error, Result};
use crate::log_store::LogStore;
use crate::network::NetworkFactory;
use crate::state_machine::{Application, StateMachineStore};
use crate::types::{NodeId, Raft, RaftMetrics, TypeConfig};

/// How long a forwarded proposal may take, end to end.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest `shutdown` waits for connections to drain and for the socket to close.
const SHUTDOWN_PATIENCE: Duration = Duration::from_secs(5);

/// Mailbox messages queued before the application reads them; beyond this, senders wait.
const INBOX_DEPTH: usize = 1024;

/// Where a proposed entry landed once it was committed and applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proposed {
    pub index: u64,
    pub term: u64,
}

type ResponderRx =
    <openraft::raft::responder::OneshotResponder<TypeConfig> as openraft::raft::responder::Responder<TypeConfig>>::Receiver;

/// A proposal queued by [`ReplicaNode::propose_pipelined`].
pub struct PendingProposal {
    rx: ResponderRx,
}

impl PendingProposal {
    /// Waits until the entry is committed and applied on the proposing replica.
    pub async fn committed(self) -> Result<Proposed> {
        let resp = self
            .rx
            .await
            .map_err(|_| Error::Shutdown)?
            .map_err(|e| write_error(RaftError::APIError(e)))?;
        Ok(Proposed {
            index: resp.log_id.index,
            term: resp.log_id.leader_id.term,
        })
    }
}

/// A summary of [`RaftMetrics`] for the kernel's status reporting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaMetrics {
    pub id: NodeId,
    pub state: ServerState,
    pub term: u64,
    pub leader: Option<NodeId>,
    pub last_log_index: Option<u64>,
    pub last_applied: Option<u64>,
    pub snapshot_index: Option<u64>,
    pub voters: BTreeSet<NodeId>,
    pub learners: BTreeSet<NodeId>,
    /// QUIC connections open on this replica's endpoint (one per reachable peer once
    /// duplicate dials have been resolved).
    pub open_connections: usize,
}

/// One running replica: the Raft group member, its QUIC endpoint and its blob store.
pub struct ReplicaNode {
    id: NodeId,
    addr: SocketAddr,
    raft: Raft,
    transport: Arc<Transport>,
    sm: StateMachineStore,
    inbox: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<crate::Message>>>,
}

impl ReplicaNode {
    /// Binds the endpoint, opens the log and starts Raft, with `app` applying the committed
    /// entries. A fresh group is then formed by calling [`ReplicaNode::initialize`] on one
    /// replica; a replica added later waits to be added with [`ReplicaNode::add_learner`]
    /// by the leader.
    pub async fn start(config: ReplicaConfig, app: impl Application) -> Result<Self> {
        let id = config.identity.id;
        let raft_config = Arc::new(config.raft_config()?);
        let (inbox_tx, inbox_rx) = tokio::sync::mpsc::channel(INBOX_DEPTH);
        let transport = Transport::bind(
            &config.identity,
            config.listen,
            config.transport.clone(),
            config.max_blob_size,
            inbox_tx,
        )?;
        let bound = transport.local_addr()?;
        let addr = config.advertise.unwrap_or(bound);
        let (log, sm) = match &config.data_dir {
            Some(dir) => (
                LogStore::open(dir, config.fsync)?,
                StateMachineStore::new(app, Some(dir))?,
            ),
            None => (LogStore::in_memory(), StateMachineStore::new(app, None)?),
        };
        let network = NetworkFactory {
            transport: transport.clone(),
        };
        let raft = Raft::new(id, raft_config, network, log, sm.clone())
            .await
            .map_err(|e| Error::Raft(e.to_string()))?;
        transport.set_raft(raft.clone());
        transport.spawn(crate::server::accept_loop(transport.clone()));
        tracing::info!(id, %addr, "replica started");
        Ok(Self {
            id,
            addr,
            raft,
            transport,
            sm,
            inbox: std::sync::Mutex::new(Some(inbox_rx)),
        })
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The address peers use to reach this replica.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The underlying openraft handle, for anything the façade does not cover.
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// Forms a new group of `members` (including this replica). Call it on one replica of a
    /// fresh group; calling it again, or on a group that already exists, is a no-op.
    pub async fn initialize(&self, members: BTreeMap<NodeId, SocketAddr>) -> Result<()> {
        let nodes: BTreeMap<NodeId, BasicNode> = members
            .into_iter()
            .map(|(id, a)| (id, BasicNode::new(a.to_string())))
            .collect();
        match self.raft.initialize(nodes).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(Error::Raft(e.to_string())),
        }
    }

    /// Appends `entry` (the [`Application::Entry`] of every replica's application) to the
    /// replicated log; returns once it is committed and applied on this replica. On a
    /// follower the proposal is forwarded to the leader it knows (one hop);
    /// [`Error::NotLeader`] means no leader is known or leadership just moved.
    pub async fn propose<E: Serialize + ?Sized>(&self, entry: &E) -> Result<Proposed> {
        let data = encode(entry)?;
        let leader = self.raft.metrics().borrow().current_leader;
        if let Some(leader) = leader.filter(|l| *l != self.id) {
            return self.forward(leader, data).await;
        }
        let resp = self.raft.client_write(data).await.map_err(write_error)?;
        Ok(Proposed {
            index: resp.log_id.index,
            term: resp.log_id.leader_id.term,
        })
    }

    async fn forward(&self, leader: NodeId, data: Vec<u8>) -> Result<Proposed> {
        let addr = self.peer_addr(leader)?;
        let proposed = self.forward_to(leader, &addr, data).await?;
        // Same promise as a local proposal: applied here before we return.
        self.wait_applied(proposed.index, FORWARD_TIMEOUT).await?;
        Ok(proposed)
    }

    /// Proposes through `peer` at `addr`, which must be the leader, without being a member
    /// of the group yet (a replica asking to join). Returns once the entry is committed;
    /// nothing is applied here.
    pub async fn propose_via<E: Serialize + ?Sized>(
        &self,
        peer: NodeId,
        addr: &str,
        entry: &E,
    ) -> Result<Proposed> {
        self.forward_to(peer, addr, encode(entry)?).await
    }

    async fn forward_to(&self, leader: NodeId, addr: &str, data: Vec<u8>) -> Result<Proposed> {
        let wire = |e: crate::rpc::WireError| Error::Unreachable {
            peer: leader,
            reason: e.to_string(),
        };
        let buf =
            crate::rpc::encode_request(crate::rpc::StreamKind::Forward, &data).map_err(wire)?;
        let exchange = async {
            let mut attempt = 0;
            loop {
                attempt += 1;
                let (mut send, mut recv, conn) = self.transport.open_bi(leader, addr).await?;
                let res = async {
                    send.write_all(&buf).await?;
                    send.finish()?;
                    crate::rpc::read_response::<crate::rpc::ForwardReply>(&mut recv).await
                }
                .await;
                match res {
                    Err(_) if attempt < 2 && self.transport.retry_after_failure(leader, &conn) => {
                        continue
                    }
                    other => return other.map_err(wire),
                }
            }
        };
        let reply = tokio::time::timeout(FORWARD_TIMEOUT, exchange)
            .await
            .map_err(|_| Error::Timeout(FORWARD_TIMEOUT))??;
        match reply {
            crate::rpc::ForwardReply::Committed { index, term } => Ok(Proposed { index, term }),
            crate::rpc::ForwardReply::NotLeader { leader } => {
                let leader_addr = leader.and_then(|l| self.peer_addr(l).ok());
                Err(Error::NotLeader {
                    leader,
                    leader_addr,
                })
            }
            crate::rpc::ForwardReply::Failed(msg) => Err(Error::Raft(msg)),
        }
    }

    /// Leader only. Queues `data` for the log without waiting for the commit; proposals queued one
    /// after another from one task land in the log in that order. Lets a caller keep many
    /// proposals in flight (pipelining) and await them later.
    pub async fn propose_pipelined<E: Serialize + ?Sized>(
        &self,
        entry: &E,
    ) -> Result<PendingProposal> {
        let rx = self
            .raft
            .client_write_ff(encode(entry)?)
            .await
            .map_err(|e| Error::Raft(e.to_string()))?;
        Ok(PendingProposal { rx })
    }

    /// Index of the last entry applied on this replica (0 before any).
    pub fn last_applied(&self) -> u64 {
        self.sm.last_applied_index()
    }

    /// Adds a non-voting member and waits until it has caught up with the log.
    pub async fn add_learner(&self, id: NodeId, addr: SocketAddr) -> Result<()> {
        self.raft
            .add_learner(id, BasicNode::new(addr.to_string()), true)
            .await
            .map_err(write_error)?;
        Ok(())
    }

    /// Turns a learner into a voter.
    pub async fn promote(&self, id: NodeId) -> Result<()> {
        self.change(ChangeMembers::AddVoterIds(BTreeSet::from([id])))
            .await
    }

    /// Removes a member (voter or learner), e.g. a dead replica being replaced.
    pub async fn remove(&self, id: NodeId) -> Result<()> {
        let is_voter = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == id);
        // `retain = false` in `change` drops a removed voter entirely, not back to learner.
        if is_voter {
            self.change(ChangeMembers::RemoveVoters(BTreeSet::from([id])))
                .await
        } else {
            self.change(ChangeMembers::RemoveNodes(BTreeSet::from([id])))
                .await
        }
    }

    async fn change(&self, change: ChangeMembers<NodeId, BasicNode>) -> Result<()> {
        self.raft
            .change_membership(change, false)
            .await
            .map_err(write_error)?;
        Ok(())
    }

    fn peer_addr(&self, peer: NodeId) -> Result<String> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        m.membership_config
            .membership()
            .get_node(&peer)
            .map(|n| n.addr.clone())
            .ok_or(Error::UnknownPeer(peer))
    }

    /// Pushes a blob to `peer` on its own stream; returns its hash once the peer stored it.
    pub async fn send_blob(&self, peer: NodeId, data: impl Into<Bytes>) -> Result<BlobHash> {
        let addr = self.peer_addr(peer)?;
        bulk::send_blob(&self.transport, peer, &addr, data.into()).await
    }

    /// Fetches a blob that `peer` holds (received or published there) by its hash.
    pub async fn fetch_blob(&self, peer: NodeId, hash: BlobHash) -> Result<Bytes> {
        let addr = self.peer_addr(peer)?;
        bulk::fetch_blob(&self.transport, peer, &addr, hash).await
    }

    /// Sends `data` to `peer`'s mailbox ([`ReplicaNode::take_messages`] there); returns
    /// once the peer's application has handled it (dropped its [`crate::Receipt`]).
    /// Messages one task sends to one peer keep their order.
    pub async fn send_message(&self, peer: NodeId, data: impl Into<Bytes>) -> Result<()> {
        let addr = self.peer_addr(peer)?;
        bulk::send_message(&self.transport, peer, &addr, data.into()).await
    }

    /// The receiving end of this replica's mailbox. There is one; later calls
    /// return `None`.
    pub fn take_messages(&self) -> Option<tokio::sync::mpsc::Receiver<crate::Message>> {
        self.inbox.lock().ok()?.take()
    }

    /// Makes a blob available to peers' [`ReplicaNode::fetch_blob`].
    pub fn publish_blob(&self, data: impl Into<Bytes>) -> BlobHash {
        self.transport.blobs.insert(data.into())
    }

    /// A blob held here (published locally or received from a peer).
    pub fn blob(&self, hash: &BlobHash) -> Option<Bytes> {
        self.transport.blobs.get(hash)
    }

    /// Waits for a blob a peer is pushing to us.
    pub async fn wait_blob(&self, hash: &BlobHash) -> Bytes {
        self.transport.blobs.wait_for(hash).await
    }

    /// Drops a blob from the local store.
    pub fn remove_blob(&self, hash: &BlobHash) -> Option<Bytes> {
        self.transport.blobs.remove(hash)
    }

    pub fn metrics(&self) -> ReplicaMetrics {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        ReplicaMetrics {
            id: m.id,
            state: m.state,
            term: m.current_term,
            leader: m.current_leader,
            last_log_index: m.last_log_index,
            last_applied: m.last_applied.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            voters: membership.voter_ids().collect(),
            learners: membership.learner_ids().collect(),
            open_connections: self.transport.open_connections(),
        }
    }

    /// openraft's full metrics, as a watch channel.
    pub fn raft_metrics(&self) -> tokio::sync::watch::Receiver<RaftMetrics> {
        self.raft.metrics()
    }

    /// Waits until some replica is known as leader and returns its id.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<NodeId> {
        let m = self
            .raft
            .wait(Some(timeout))
            .metrics(|m| m.current_leader.is_some(), "leader known")
            .await
            .map_err(|_| Error::Timeout(timeout))?;
        m.current_leader.ok_or(Error::Timeout(timeout))
    }

    /// Waits until this replica has applied the log up to `index`.
    pub async fn wait_applied(&self, index: u64, timeout: Duration) -> Result<()> {
        self.raft
            .wait(Some(timeout))
            .applied_index_at_least(Some(index), "applied")
            .await
            .map_err(|_| Error::Timeout(timeout))?;
        Ok(())
    }

    /// Fault injection for tests and drills: while isolated, this replica neither sends
    /// nor accepts any traffic, as if its network cable were pulled.
    pub fn set_isolated(&self, isolated: bool) {
        tracing::info!(id = self.id, isolated, "isolation changed");
        self.transport.set_isolated(isolated);
    }

    /// Stops Raft, closes every connection and ends every task serving them. When it
    /// returns, the replica's UDP socket is closed, so its address can be bound again
    /// (a replica restarting in place).
    pub async fn shutdown(&self) -> Result<()> {
        let res = self.raft.shutdown().await;
        self.transport.shut_down(SHUTDOWN_PATIENCE).await;
        res.map_err(|e| Error::Raft(e.to_string()))
    }
}

impl Drop for ReplicaNode {
    /// A replica dropped without [`ReplicaNode::shutdown`] at least stops talking to peers,
    /// so it cannot linger as a zombie member. (openraft's core task stops on `shutdown`.)
    fn drop(&mut self) {
        self.transport.close();
    }
}

/// The log's byte form of an application entry.
fn encode<E: Serialize + ?Sized>(entry: &E) -> Result<Vec<u8>> {
    postcard::to_stdvec(entry).map_err(|e| Error::Encode(e.to_string()))
}

fn write_error(e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> Error {
    if let Some(f) = e.forward_to_leader() {
        return Error::NotLeader {
            leader: f.leader_id,
            leader_addr: f.leader_node.as_ref().map(|n| n.addr.clone()),
        };
    }
    Error::Raft(e.to_string())
}

#[cfg(test)]
mod tests {
    /// The kernel spawns these futures on a multi-threaded runtime, so they must be Send.
    #[allow(dead_code)]
    fn futures_are_send(node: &super::ReplicaNode) {
        fn is_send<T: Send>(_: T) {}
        is_send(node.propose(&[0u8; 0]));
        is_send(node.propose_pipelined(&[0u8; 0]));
        is_send(node.send_blob(1, vec![]));
        is_send(node.fetch_blob(1, crate::BlobHash([0; 32])));
        is_send(node.add_learner(1, "127.0.0.1:1".parse().unwrap()));
        is_send(node.promote(1));
        is_send(node.remove(1));
        is_send(node.shutdown());
        is_send(node.send_message(1, vec![]));
        is_send(node.propose_via(1, "127.0.0.1:1", &[0u8; 0]));
    }
}
