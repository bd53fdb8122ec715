//! openraft's network traits over the QUIC transport: one stream per RPC.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    Fatal, NetworkError, PayloadTooLarge, RPCError, RaftError, ReplicationClosed, StreamingError,
    Timeout, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::connection::Transport;
use crate::error::Error;
use crate::rpc::{self, StreamKind, WireError};
use crate::types::{NodeId, Snapshot, TypeConfig, Vote};

/// Append-entries bodies above this are split: openraft allows such an RPC only one
/// heartbeat interval, so a batch of large entries must not take longer than that to cross.
const MAX_APPEND_BYTES: usize = 1 << 20;

pub(crate) struct NetworkFactory {
    pub(crate) transport: Arc<Transport>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        PeerClient {
            target,
            addr: node.addr.clone(),
            transport: self.transport.clone(),
        }
    }
}

/// openraft's handle to one peer. Cheap: it shares the cached connection.
pub(crate) struct PeerClient {
    target: NodeId,
    addr: String,
    transport: Arc<Transport>,
}

/// Why an RPC failed, before it is shaped into the error type each openraft method wants.
enum CallError {
    Timeout(Duration),
    Unreachable(Error),
    Network(WireError),
}

impl CallError {
    fn into_rpc<E: std::error::Error>(
        self,
        action: RPCTypes,
        me: NodeId,
        target: NodeId,
    ) -> RPCError<NodeId, BasicNode, E> {
        match self {
            CallError::Timeout(timeout) => RPCError::Timeout(Timeout {
                action,
                id: me,
                target,
                timeout,
            }),
            CallError::Unreachable(e) => RPCError::Unreachable(Unreachable::new(&e)),
            // The peer answered with an error: its Raft is shutting down. Treat it like an
            // unreachable peer so openraft backs off instead of hammering it.
            CallError::Network(WireError::Remote(msg)) => {
                RPCError::Unreachable(Unreachable::new(&Error::Raft(msg)))
            }
            CallError::Network(e) => RPCError::Network(NetworkError::new(&e)),
        }
    }
}

impl PeerClient {
    /// One request/response exchange on a fresh stream, retried once if the connection
    /// was a duplicate that the tie-break closed under it.
    async fn exchange<Resp: DeserializeOwned>(&self, parts: &[&[u8]]) -> Result<Resp, CallError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (mut send, mut recv, conn) = self
                .transport
                .open_bi(self.target, &self.addr)
                .await
                .map_err(CallError::Unreachable)?;
            let _ = send.set_priority(1);
            let res: Result<Resp, WireError> = async {
                for p in parts {
                    send.write_all(p).await?;
                }
                send.finish()?;
                rpc::read_response(&mut recv).await
            }
            .await;
            match res {
                Err(_) if attempt < 2 && self.transport.retry_after_failure(self.target, &conn) => {
                    continue
                }
                other => return other.map_err(CallError::Network),
            }
        }
    }

    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        kind: StreamKind,
        req: &Req,
        ttl: Duration,
    ) -> Result<Resp, CallError> {
        let buf = rpc::encode_request(kind, req).map_err(CallError::Network)?;
        tokio::time::timeout(ttl, self.exchange(&[&buf]))
            .await
            .map_err(|_| CallError::Timeout(ttl))?
    }

    async fn send_snapshot(
        &self,
        vote: &Vote,
        snapshot: &Snapshot,
    ) -> Result<SnapshotResponse<NodeId>, CallError> {
        let mut head = rpc::header(StreamKind::Snapshot).to_vec();
        head.extend_from_slice(
            &rpc::encode_msg(&(vote, &snapshot.meta)).map_err(CallError::Network)?,
        );
        head.extend_from_slice(&(snapshot.snapshot.len() as u64).to_le_bytes());
        self.exchange(&[&head, &snapshot.snapshot]).await
    }
}

fn entry_size_hint(e: &crate::types::Entry) -> usize {
    match &e.payload {
        openraft::EntryPayload::Normal(d) => d.len() + 24,
        _ => 64,
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        req: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let n = req.entries.len();
        if n > 1 {
            let bytes: usize = req.entries.iter().map(entry_size_hint).sum();
            if bytes > MAX_APPEND_BYTES {
                // openraft resends a smaller batch when told the payload is too large.
                let fit = (n * MAX_APPEND_BYTES / bytes).clamp(1, n - 1);
                return Err(RPCError::PayloadTooLarge(
                    PayloadTooLarge::new_entries_hint(fit as u64),
                ));
            }
        }
        self.call(StreamKind::AppendEntries, &req, option.hard_ttl())
            .await
            .map_err(|e| e.into_rpc(RPCTypes::AppendEntries, self.transport.me, self.target))
    }

    async fn vote(
        &mut self,
        req: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(StreamKind::Vote, &req, option.hard_ttl())
            .await
            .map_err(|e| e.into_rpc(RPCTypes::Vote, self.transport.me, self.target))
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let ttl = option.hard_ttl();
        tracing::info!(target = self.target, snapshot = %snapshot.meta.snapshot_id, bytes = snapshot.snapshot.len(), "sending snapshot");
        let res = tokio::select! {
            closed = cancel => return Err(StreamingError::Closed(closed)),
            res = tokio::time::timeout(ttl, self.send_snapshot(&vote, &snapshot)) => res,
        };
        let me = self.transport.me;
        match res {
            Ok(Ok(resp)) => Ok(resp),
            Err(_) => Err(StreamingError::Timeout(Timeout {
                action: RPCTypes::InstallSnapshot,
                id: me,
                target: self.target,
                timeout: ttl,
            })),
            Ok(Err(CallError::Timeout(t))) => Err(StreamingError::Timeout(Timeout {
                action: RPCTypes::InstallSnapshot,
                id: me,
                target: self.target,
                timeout: t,
            })),
            Ok(Err(CallError::Unreachable(e))) => {
                Err(StreamingError::Unreachable(Unreachable::new(&e)))
            }
            Ok(Err(CallError::Network(WireError::Remote(msg)))) => Err(
                StreamingError::Unreachable(Unreachable::new(&Error::Raft(msg))),
            ),
            Ok(Err(CallError::Network(e))) => Err(StreamingError::Network(NetworkError::new(&e))),
        }
    }

    fn backoff(&self) -> Backoff {
        // On a LAN an unreachable peer is either dead or partitioned; retry a few times
        // per election timeout so a healed peer catches up quickly.
        Backoff::new(std::iter::repeat(Duration::from_millis(100)))
    }
}
