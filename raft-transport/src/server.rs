//! Accepting side: connections, the hello handshake, and per-stream dispatch.

use std::sync::Arc;

use openraft::raft::{AppendEntriesRequest, VoteRequest};

use crate::bulk;
use crate::connection::{Transport, CLOSE_IDENTITY};
use crate::rpc::{self, ForwardReply, StreamKind, WireError};
use crate::tls::cert_is_for_node;
use crate::types::{NodeId, Snapshot, SnapshotMeta, TypeConfig, Vote};

/// Accepts connections until the endpoint closes.
pub(crate) async fn accept_loop(transport: Arc<Transport>) {
    let Some(endpoint) = transport.endpoint() else {
        return;
    };
    while let Some(incoming) = endpoint.accept().await {
        if transport.is_isolated() {
            incoming.refuse();
            continue;
        }
        let t = transport.clone();
        transport.spawn(async move {
            let transport = t;
            match incoming.await {
                Ok(conn) => accept_connection(transport, conn).await,
                // Includes peers whose certificate is not signed by the kernel CA.
                Err(e) => tracing::info!(error = %e, "incoming connection failed"),
            }
        });
    }
}

async fn accept_connection(transport: Arc<Transport>, conn: quinn::Connection) {
    let remote = conn.remote_address();
    let (peer, mut hello) =
        match tokio::time::timeout(transport.tuning.connect_timeout, read_hello(&conn)).await {
            Ok(Ok(v)) => v,
            Ok(Err(reason)) => {
                tracing::warn!(%remote, %reason, "refusing peer");
                conn.close(CLOSE_IDENTITY.into(), b"identity");
                return;
            }
            Err(_) => {
                tracing::warn!(%remote, "peer sent no hello in time");
                conn.close(CLOSE_IDENTITY.into(), b"no hello");
                return;
            }
        };
    tracing::debug!(peer, %remote, "accepted connection");
    // Register before acknowledging: once the dialer sees the ack it may treat this as
    // the pair's connection, and a duplicate it closes must find this one in our cache.
    if transport.register(peer, &conn, false) {
        if hello.write_all(&[rpc::STATUS_OK]).await.is_err() {
            return;
        }
        let _ = hello.finish();
        serve_connection(transport, peer, conn).await;
    }
}

/// Reads the dialer's claimed id and checks it against the client certificate, which
/// rustls has already verified to chain to the kernel CA. Returns the stream to ack on.
async fn read_hello(conn: &quinn::Connection) -> Result<(NodeId, quinn::SendStream), String> {
    let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
    let kind = rpc::read_header(&mut recv)
        .await
        .map_err(|e| e.to_string())?;
    if kind != StreamKind::Hello {
        return Err(format!("expected hello, got {kind:?}"));
    }
    let mut id = [0u8; 8];
    recv.read_exact(&mut id).await.map_err(|e| e.to_string())?;
    let peer = NodeId::from_le_bytes(id);
    let certs = conn
        .peer_identity()
        .and_then(|any| {
            any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .ok_or("no client certificate")?;
    let leaf = certs.first().ok_or("empty client certificate chain")?;
    if !cert_is_for_node(leaf, peer) {
        let _ = send.write_all(&[rpc::STATUS_ERR]).await;
        return Err(format!(
            "claims to be node {peer} but its certificate says otherwise"
        ));
    }
    Ok((peer, send))
}

/// Serves the streams a peer opens on `conn` until it closes.
pub(crate) async fn serve_connection(
    transport: Arc<Transport>,
    peer: NodeId,
    conn: quinn::Connection,
) {
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(peer, error = %e, "connection ended");
                return;
            }
        };
        if transport.is_isolated() {
            conn.close(crate::connection::CLOSE_ISOLATED.into(), b"isolated");
            return;
        }
        let t = transport.clone();
        transport.spawn(async move {
            if let Err(e) = serve_stream(&t, peer, send, recv).await {
                tracing::debug!(peer, error = %e, "stream failed");
            }
        });
    }
}

async fn serve_stream(
    transport: &Arc<Transport>,
    peer: NodeId,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<(), WireError> {
    let kind = rpc::read_header(&mut recv).await?;
    // Blobs are served by the blob store alone; everything else needs Raft.
    match kind {
        StreamKind::PutBlob => return bulk::serve_put(transport, peer, send, recv).await,
        StreamKind::PutShared => return bulk::serve_put_shared(transport, peer, send, recv).await,
        StreamKind::GetBlob => return bulk::serve_get(transport, send, recv).await,
        StreamKind::Message => return bulk::serve_message(transport, peer, send, recv).await,
        _ => {}
    }
    let Some(raft) = transport.raft() else {
        return rpc::write_response::<()>(&mut send, Err("raft not started".into())).await;
    };
    // Raft replies are latency-critical: send them ahead of any blob data.
    let _ = send.set_priority(1);
    match kind {
        StreamKind::AppendEntries => {
            let req: AppendEntriesRequest<TypeConfig> = rpc::read_msg(&mut recv).await?;
            let res = raft.append_entries(req).await.map_err(|e| e.to_string());
            rpc::write_response(&mut send, res.as_ref().map_err(Clone::clone)).await
        }
        StreamKind::Vote => {
            let req: VoteRequest<NodeId> = rpc::read_msg(&mut recv).await?;
            let res = raft.vote(req).await.map_err(|e| e.to_string());
            rpc::write_response(&mut send, res.as_ref().map_err(Clone::clone)).await
        }
        StreamKind::Snapshot => {
            let (vote, meta): (Vote, SnapshotMeta) = rpc::read_msg(&mut recv).await?;
            let (data, _) = bulk::read_sized(&mut recv, transport.max_blob_size, false).await?;
            tracing::info!(peer, snapshot = %meta.snapshot_id, bytes = data.len(), "received snapshot");
            let snapshot = Snapshot {
                meta,
                snapshot: Box::new(data),
            };
            let res = raft
                .install_full_snapshot(vote, snapshot)
                .await
                .map_err(|e| e.to_string());
            rpc::write_response(&mut send, res.as_ref().map_err(Clone::clone)).await
        }
        StreamKind::Forward => {
            let data: Vec<u8> = rpc::read_msg(&mut recv).await?;
            let reply = match raft.client_write(data).await {
                Ok(resp) => ForwardReply::Committed {
                    index: resp.log_id.index,
                    term: resp.log_id.leader_id.term,
                },
                Err(e) => match e.forward_to_leader() {
                    Some(f) => ForwardReply::NotLeader {
                        leader: f.leader_id,
                    },
                    None => ForwardReply::Failed(e.to_string()),
                },
            };
            rpc::write_response(&mut send, Ok(&reply)).await
        }
        StreamKind::Hello => Err(WireError::Kind(StreamKind::Hello as u8)),
        StreamKind::PutBlob | StreamKind::PutShared | StreamKind::GetBlob | StreamKind::Message => {
            Ok(())
        }
    }
}
