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
use std::sync::{Arc, Mutex, MutexGuard};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};

use crate::bulk::BlobStore;
use crate::config::TransportTuning;
use crate::error::{Error, Result, TlsError};
use crate::rpc::{self, StreamKind};
use crate::socket::{Released, TrackedSocket};
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
    /// Taken out by [`Transport::close`]: quinn releases the socket only once every
    /// `Endpoint` handle is gone, and openraft's tasks may hold this `Transport` for longer.
    endpoint: Mutex<Option<quinn::Endpoint>>,
    /// Resolves when the OS has the UDP socket back; taken by the first `shutdown`.
    released: Mutex<Option<Released>>,
    /// Every task serving this replica's connections and streams, so that shutdown can end them.
    tasks: Mutex<tokio::task::JoinSet<()>>,
    client_config: quinn::ClientConfig,
    pub(crate) tuning: TransportTuning,
    conns: Mutex<HashMap<NodeId, Cached>>,
    /// Serialises dials per peer so that concurrent RPCs share one handshake.
    dial_locks: Mutex<HashMap<NodeId, Arc<tokio::sync::Mutex<()>>>>,
    /// Fault injection: drop all traffic (tests and chaos drills).
    isolated: AtomicBool,
    /// Set once Raft exists, cleared at shutdown (Raft holds this transport in turn);
    /// streams arriving while it is unset are refused (peers retry).
    raft: Mutex<Option<Raft>>,
    pub(crate) blobs: Arc<BlobStore>,
    pub(crate) blob_streams: Arc<tokio::sync::Semaphore>,
    pub(crate) max_blob_size: u64,
    /// Mailbox messages from peers, in arrival order per sender; taken once by the
    /// application.
    pub(crate) inbox: tokio::sync::mpsc::Sender<crate::Message>,
}

impl Transport {
    pub(crate) fn bind(
        identity: &NodeIdentity,
        listen: SocketAddr,
        tuning: TransportTuning,
        max_blob_size: u64,
        inbox: tokio::sync::mpsc::Sender<crate::Message>,
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
        let (socket, released) = TrackedSocket::wrap(udp_socket(listen, tuning.socket_buffer)?)?;
        // What we accept from peers bounds their MTU discovery as much as the path
        // does; quinn's default (1472) would cap it whatever `max_udp_payload` says.
        let mut endpoint_config = quinn::EndpointConfig::default();
        endpoint_config
            .max_udp_payload_size(tuning.max_udp_payload.max(1472))
            .map_err(|e| crate::Error::Config(format!("max_udp_payload: {e}")))?;
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            endpoint_config,
            Some(server_config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        Ok(Arc::new(Self {
            me: identity.id,
            endpoint: Mutex::new(Some(endpoint)),
            released: Mutex::new(Some(released)),
            tasks: Mutex::new(tokio::task::JoinSet::new()),
            client_config,
            blob_streams: Arc::new(tokio::sync::Semaphore::new(
                tuning.max_concurrent_blob_streams,
            )),
            tuning,
            conns: Mutex::new(HashMap::new()),
            dial_locks: Mutex::new(HashMap::new()),
            isolated: AtomicBool::new(false),
            raft: Mutex::new(None),
            blobs: Arc::new(BlobStore::default()),
            max_blob_size,
            inbox,
        }))
    }

    /// The endpoint, until the transport is closed.
    pub(crate) fn endpoint(&self) -> Option<quinn::Endpoint> {
        relock(&self.endpoint).clone()
    }

    pub(crate) fn local_addr(&self) -> Result<SocketAddr> {
        match self.endpoint() {
            Some(e) => Ok(e.local_addr()?),
            None => Err(Error::Shutdown),
        }
    }

    pub(crate) fn open_connections(&self) -> usize {
        self.endpoint().map_or(0, |e| e.open_connections())
    }

    pub(crate) fn set_raft(&self, raft: Raft) {
        *relock(&self.raft) = Some(raft);
    }

    pub(crate) fn raft(&self) -> Option<Raft> {
        relock(&self.raft).clone()
    }

    /// Runs `task` until it ends or the transport shuts down.
    pub(crate) fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut tasks = relock(&self.tasks);
        // Reap what has finished so the set stays as small as the live tasks.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(task);
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

    fn lock_conns(&self) -> MutexGuard<'_, HashMap<NodeId, Cached>> {
        relock(&self.conns)
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
        let Some(endpoint) = self.endpoint() else {
            return Err(Self::unreachable(peer, "this replica is shut down"));
        };
        let connecting = endpoint
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
        self.spawn(crate::server::serve_connection(
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

    /// Closes every connection and the endpoint, ends the serving tasks, and waits until
    /// the UDP socket is back with the OS (at most `patience`): after this the address can
    /// be bound again.
    pub(crate) async fn shut_down(&self, patience: std::time::Duration) {
        let endpoint = self.close();
        if let Some(endpoint) = endpoint {
            // Lets peers see the close instead of timing out; bounded by the drain period.
            if tokio::time::timeout(patience, endpoint.wait_idle())
                .await
                .is_err()
            {
                tracing::warn!(me = self.me, "connections still draining at shutdown");
            }
        }
        let mut tasks = std::mem::take(&mut *relock(&self.tasks));
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        let released = relock(&self.released).take();
        if let Some(released) = released {
            if tokio::time::timeout(patience, released.wait())
                .await
                .is_err()
            {
                tracing::warn!(me = self.me, "UDP socket still open after shutdown");
            }
        }
    }

    /// Closes everything at once, without waiting; returns the endpoint handle it dropped
    /// from the transport.
    pub(crate) fn close(&self) -> Option<quinn::Endpoint> {
        let conns: Vec<_> = self.lock_conns().drain().map(|(_, c)| c.conn).collect();
        for c in conns {
            c.close(CLOSE_SHUTDOWN.into(), b"shutdown");
        }
        relock(&self.raft).take();
        relock(&self.tasks).abort_all();
        let endpoint = relock(&self.endpoint).take();
        if let Some(e) = &endpoint {
            e.close(CLOSE_SHUTDOWN.into(), b"shutdown");
        }
        endpoint
    }
}

fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means a panic elsewhere; what it guards is still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}
