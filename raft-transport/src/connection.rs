//! The quinn endpoint and the one-connection-per-peer cache.
//!
//! Both replicas of a pair may dial each other at the same moment. Each side keeps at most
//! one connection per peer in its cache, and when two exist the one dialed by the lower
//! node id wins on both sides, so the pair converges on a single connection; the loser is
//! closed. Connections are used in both directions: the acceptor serves streams from the
//! dialer and also opens its own RPC streams on the same connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};

use crate::bulk::BlobStore;
use crate::config::TransportTuning;
use crate::error::{Error, Result, TlsError};
use crate::rpc::{self, StreamKind};
use crate::tls::{node_server_name, NodeIdentity};
use crate::types::{NodeId, Raft};

/// Application close codes.
pub(crate) const CLOSE_SUPERSEDED: u32 = 1;
pub(crate) const CLOSE_IDENTITY: u32 = 2;
pub(crate) const CLOSE_SHUTDOWN: u32 = 3;
pub(crate) const CLOSE_ISOLATED: u32 = 4;

/// Binds the UDP socket, optionally with larger kernel buffers (see
/// `TransportTuning::socket_buffer` for why the default leaves them alone).
fn udp_socket(listen: SocketAddr, buffer: Option<usize>) -> std::io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(listen),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    // The kernel caps these at net.core.{r,w}mem_max; a smaller buffer is not an error.
    if let Some(buffer) = buffer {
        if let Err(e) = socket.set_recv_buffer_size(buffer) {
            tracing::debug!(error = %e, "could not set UDP receive buffer");
        }
        if let Err(e) = socket.set_send_buffer_size(buffer) {
            tracing::debug!(error = %e, "could not set UDP send buffer");
        }
    }
    socket.bind(&listen.into())?;
    Ok(socket.into())
}

/// True when `conn` was closed as the loser of a duplicate-dial tie-break (by either side)
/// or closed locally for any reason.
fn closed_by_us(conn: &quinn::Connection) -> bool {
    match conn.close_reason() {
        Some(quinn::ConnectionError::LocallyClosed) => true,
        Some(quinn::ConnectionError::ApplicationClosed(c)) => {
            c.error_code == CLOSE_SUPERSEDED.into()
        }
        _ => false,
    }
}

struct Cached {
    conn: quinn::Connection,
    dialed_by_me: bool,
}

/// Shared by the Raft network, the blob API and the accept loop.
pub(crate) struct Transport {
    pub(crate) me: NodeId,
    pub(crate) endpoint: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    pub(crate) tuning: TransportTuning,
    conns: Mutex<HashMap<NodeId, Cached>>,
    /// Serialises dials per peer so that concurrent RPCs share one handshake.
    dial_locks: Mutex<HashMap<NodeId, Arc<tokio::sync::Mutex<()>>>>,
    /// Fault injection: drop all traffic (tests and chaos drills).
    isolated: AtomicBool,
    /// Set once Raft exists; streams arriving before that are dropped (peers retry).
    pub(crate) raft: OnceLock<Raft>,
    pub(crate) blobs: Arc<BlobStore>,
    pub(crate) blob_streams: Arc<tokio::sync::Semaphore>,
    pub(crate) max_blob_size: u64,
    /// Mailbox messages from peers, in arrival order per sender; taken once by the
    /// application.
    pub(crate) inbox: tokio::sync::mpsc::Sender<(NodeId, bytes::Bytes)>,
}

impl Transport {
    pub(crate) fn bind(
        identity: &NodeIdentity,
        listen: SocketAddr,
        tuning: TransportTuning,
        max_blob_size: u64,
        inbox: tokio::sync::mpsc::Sender<(NodeId, bytes::Bytes)>,
    ) -> Result<Arc<Self>> {
        let transport = Arc::new(tuning.quinn_transport()?);
        let server_crypto = QuicServerConfig::try_from(identity.server_config()?)
            .map_err(|e| TlsError::Pem(format!("QUIC server config: {e}")))?;
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server_config.transport_config(transport.clone());
        let client_crypto = QuicClientConfig::try_from(identity.client_config()?)
            .map_err(|e| TlsError::Pem(format!("QUIC client config: {e}")))?;
        let mut client_config = quinn::ClientConfig::new(Arc::new(client_crypto));
        client_config.transport_config(transport);
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server_config),
            udp_socket(listen, tuning.socket_buffer)?,
            Arc::new(quinn::TokioRuntime),
        )?;
        Ok(Arc::new(Self {
            me: identity.id,
            endpoint,
            client_config,
            blob_streams: Arc::new(tokio::sync::Semaphore::new(
                tuning.max_concurrent_blob_streams,
            )),
            tuning,
            conns: Mutex::new(HashMap::new()),
            dial_locks: Mutex::new(HashMap::new()),
            isolated: AtomicBool::new(false),
            raft: OnceLock::new(),
            blobs: Arc::new(BlobStore::default()),
            max_blob_size,
            inbox,
        }))
    }

    pub(crate) fn is_isolated(&self) -> bool {
        self.isolated.load(Ordering::Relaxed)
    }

    /// Cuts this replica off: every connection is closed, new ones are refused, and
    /// outgoing RPCs fail as unreachable until `set_isolated(false)`.
    pub(crate) fn set_isolated(&self, on: bool) {
        self.isolated.store(on, Ordering::Relaxed);
        if on {
            let conns: Vec<_> = self.lock_conns().drain().map(|(_, c)| c.conn).collect();
            for c in conns {
                c.close(CLOSE_ISOLATED.into(), b"isolated");
            }
        }
    }

    fn lock_conns(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, Cached>> {
        // A poisoned map only means a panic elsewhere; its contents are still consistent.
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cached(&self, peer: NodeId) -> Option<quinn::Connection> {
        let conns = self.lock_conns();
        conns
            .get(&peer)
            .filter(|c| c.conn.close_reason().is_none())
            .map(|c| c.conn.clone())
    }

    /// Records a connection to `peer`; returns false when an existing one wins the
    /// tie-break (the caller's connection has then been closed).
    pub(crate) fn register(
        &self,
        peer: NodeId,
        conn: &quinn::Connection,
        dialed_by_me: bool,
    ) -> bool {
        let canonical_is_mine = self.me < peer;
        let mut conns = self.lock_conns();
        if let Some(existing) = conns.get(&peer) {
            let alive = existing.conn.close_reason().is_none();
            if alive && existing.conn.stable_id() != conn.stable_id() {
                if existing.dialed_by_me == canonical_is_mine {
                    drop(conns);
                    tracing::debug!(peer, "keeping canonical connection, closing duplicate");
                    conn.close(CLOSE_SUPERSEDED.into(), b"duplicate");
                    return false;
                }
                tracing::debug!(peer, "replacing duplicate connection with canonical one");
                existing.conn.close(CLOSE_SUPERSEDED.into(), b"duplicate");
            }
        }
        conns.insert(
            peer,
            Cached {
                conn: conn.clone(),
                dialed_by_me,
            },
        );
        true
    }

    fn forget(&self, peer: NodeId, conn: &quinn::Connection) {
        let mut conns = self.lock_conns();
        if conns
            .get(&peer)
            .is_some_and(|c| c.conn.stable_id() == conn.stable_id())
        {
            conns.remove(&peer);
        }
    }

    fn unreachable(peer: NodeId, reason: impl ToString) -> Error {
        Error::Unreachable {
            peer,
            reason: reason.to_string(),
        }
    }

    /// The live connection to `peer`, dialing `addr` if there is none.
    pub(crate) async fn connection(
        self: &Arc<Self>,
        peer: NodeId,
        addr: &str,
    ) -> Result<quinn::Connection> {
        if self.is_isolated() {
            return Err(Self::unreachable(peer, "this replica is isolated"));
        }
        if let Some(c) = self.cached(peer) {
            return Ok(c);
        }
        let lock = {
            let mut locks = self.dial_locks.lock().unwrap_or_else(|e| e.into_inner());
            locks.entry(peer).or_default().clone()
        };
        let _guard = lock.lock().await;
        if let Some(c) = self.cached(peer) {
            return Ok(c);
        }
        let sock: SocketAddr = match addr.parse() {
            Ok(a) => a,
            Err(e) => return Err(Error::Config(format!("peer {peer} address {addr:?}: {e}"))),
        };
        let connecting = self
            .endpoint
            .connect_with(self.client_config.clone(), sock, &node_server_name(peer))
            .map_err(|e| Self::unreachable(peer, e))?;
        let conn = tokio::time::timeout(self.tuning.connect_timeout, connecting)
            .await
            .map_err(|_| Self::unreachable(peer, "connect timed out"))?
            .map_err(|e| Self::unreachable(peer, e))?;
        if let Err(e) = self.hello(peer, &conn).await {
            // The peer dialed us at the same moment and kept its own connection, which it
            // registered with us before closing ours: use that one.
            if closed_by_us(&conn) {
                if let Some(c) = self.cached(peer) {
                    return Ok(c);
                }
            }
            return Err(e);
        }
        tracing::debug!(peer, %sock, "connected");
        self.register(peer, &conn, true);
        // Serve the peer's streams on our connection too; it is the pair's only one.
        tokio::spawn(crate::server::serve_connection(
            self.clone(),
            peer,
            conn.clone(),
        ));
        Ok(self.cached(peer).unwrap_or(conn))
    }

    /// Tells the acceptor who we are; it checks the claim against our certificate.
    async fn hello(&self, peer: NodeId, conn: &quinn::Connection) -> Result<()> {
        let exchange = async {
            let (mut send, mut recv) = conn
                .open_bi()
                .await
                .map_err(|e| Self::unreachable(peer, e))?;
            let mut msg = rpc::header(StreamKind::Hello).to_vec();
            msg.extend_from_slice(&self.me.to_le_bytes());
            send.write_all(&msg)
                .await
                .map_err(|e| Self::unreachable(peer, e))?;
            send.finish().map_err(|e| Self::unreachable(peer, e))?;
            let mut status = [0u8; 1];
            recv.read_exact(&mut status)
                .await
                .map_err(|e| Self::unreachable(peer, e))?;
            if status[0] != rpc::STATUS_OK {
                return Err(Error::Protocol {
                    peer,
                    reason: "hello rejected".into(),
                });
            }
            Ok(())
        };
        tokio::time::timeout(self.tuning.connect_timeout, exchange)
            .await
            .map_err(|_| Self::unreachable(peer, "hello timed out"))?
    }

    /// Opens a fresh stream to `peer`; re-dials once if the cached connection just died.
    /// Returns the connection too, for `retry_after_failure`. (Callers loop explicitly:
    /// a helper taking an async closure would make their futures non-Send.)
    pub(crate) async fn open_bi(
        self: &Arc<Self>,
        peer: NodeId,
        addr: &str,
    ) -> Result<(quinn::SendStream, quinn::RecvStream, quinn::Connection)> {
        for attempt in 1..=2 {
            let conn = self.connection(peer, addr).await?;
            match conn.open_bi().await {
                Ok((s, r)) => return Ok((s, r, conn)),
                Err(e) => {
                    self.forget(peer, &conn);
                    if attempt == 2 {
                        return Err(Self::unreachable(peer, e));
                    }
                }
            }
        }
        Err(Self::unreachable(peer, "no connection"))
    }

    /// After a failed exchange on `conn`: is it worth one retry on a fresh connection?
    pub(crate) fn retry_after_failure(&self, peer: NodeId, conn: &quinn::Connection) -> bool {
        let retry = closed_by_us(conn) && !self.is_isolated();
        if retry {
            self.forget(peer, conn);
        }
        retry
    }

    pub(crate) fn close(&self) {
        let conns: Vec<_> = self.lock_conns().drain().map(|(_, c)| c.conn).collect();
        for c in conns {
            c.close(CLOSE_SHUTDOWN.into(), b"shutdown");
        }
        self.endpoint.close(CLOSE_SHUTDOWN.into(), b"shutdown");
    }
}
