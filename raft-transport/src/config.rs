//! Configuration of a replica: identity, addresses, Raft timing and QUIC tuning.
//!
//! Defaults are tuned for replicas on one LAN (sub-millisecond RTT):
//!
//! * **Raft heartbeat 50 ms, election timeout 300–600 ms.** A follower starts an
//!   election only after missing ~6 heartbeats, so a few lost datagrams or a GC-like pause
//!   of the kernel process do not depose a healthy leader, while a dead leader is replaced
//!   within about half a second. The randomised range keeps candidates from colliding.
//! * **QUIC keep-alive 1 s, idle timeout 5 s.** Keep-alives keep an otherwise quiet
//!   connection (e.g. follower↔follower) warm; a peer that is silent for 5 s is declared
//!   gone and the next RPC re-dials. The idle timeout is long compared to the election
//!   timeout on purpose: Raft decides about leadership, QUIC only about the socket.
//! * **RPC timeout** is openraft's per-RPC TTL: one heartbeat interval for append entries,
//!   the minimum election timeout for votes; the connect timeout is 1 s. Because an
//!   append-entries batch that misses its TTL is resent unchanged, batches are capped at
//!   512 entries and ~1 MiB (larger ones are split, see `network.rs`).
//! * **Initial RTT 5 ms** instead of quinn's WAN default of 333 ms, so loss recovery on a
//!   fresh connection reacts at LAN speed.
//! * **UDP socket buffers: OS default.** Measured: raising them to 4 MiB removed the few
//!   drops a bulk transfer causes, but then the congestion window grew until the whole
//!   buffer was queued blob data, and Raft commits during a transfer went from ~1 ms to
//!   tens of ms (p99 seconds). Small buffers keep Raft latency low; throughput was the
//!   same within noise.
//! * **Flow-control windows**: 16 MiB per stream, 1 GiB per connection. The connection
//!   window is far larger than the stream windows of all concurrent blob streams put
//!   together, so bulk streams can never use up the connection-wide credit that Raft
//!   RPC streams need: heartbeats do not wait behind a blob.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::tls::NodeIdentity;

/// Everything [`crate::ReplicaNode::start`] needs.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// Our certificate, key and the kernel CA. Its `id` is the replica id.
    pub identity: NodeIdentity,
    /// UDP address to listen on (port 0 picks one).
    pub listen: SocketAddr,
    /// Address that peers should use to reach us; defaults to the bound address.
    pub advertise: Option<SocketAddr>,
    /// Directory for the on-disk log and snapshot. `None` keeps everything in memory.
    pub data_dir: Option<PathBuf>,
    /// fsync the log after every append (survives host crashes; costs latency).
    pub fsync: bool,
    pub heartbeat_interval: Duration,
    pub election_timeout_min: Duration,
    pub election_timeout_max: Duration,
    /// Build a snapshot (and purge the log) after this many applied entries.
    pub snapshot_after_entries: u64,
    /// How many already-snapshotted entries to keep in the log, so that a briefly lagging
    /// follower catches up by log instead of by snapshot.
    pub keep_entries_after_snapshot: u64,
    /// How long one snapshot transfer (send + install) may take.
    pub snapshot_timeout: Duration,
    /// The largest blob (and the largest snapshot) a peer may send us.
    pub max_blob_size: u64,
    pub transport: TransportTuning,
}

impl ReplicaConfig {
    pub fn new(identity: NodeIdentity, listen: SocketAddr) -> Self {
        Self {
            identity,
            listen,
            advertise: None,
            data_dir: None,
            fsync: false,
            heartbeat_interval: Duration::from_millis(50),
            election_timeout_min: Duration::from_millis(300),
            election_timeout_max: Duration::from_millis(600),
            snapshot_after_entries: 5000,
            keep_entries_after_snapshot: 1000,
            snapshot_timeout: Duration::from_secs(60),
            max_blob_size: 8 << 30,
            transport: TransportTuning::default(),
        }
    }

    pub(crate) fn raft_config(&self) -> crate::Result<openraft::Config> {
        let cfg = openraft::Config {
            cluster_name: "notebookos".into(),
            heartbeat_interval: self.heartbeat_interval.as_millis() as u64,
            election_timeout_min: self.election_timeout_min.as_millis() as u64,
            election_timeout_max: self.election_timeout_max.as_millis() as u64,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_after_entries),
            max_in_snapshot_log_to_keep: self.keep_entries_after_snapshot,
            // Snapshots travel whole on one stream; give a large one time to cross.
            install_snapshot_timeout: self.snapshot_timeout.as_millis() as u64,
            // openraft gives an append-entries RPC exactly one heartbeat interval to finish
            // and resends the same batch when it does not, so batches must stay small
            // enough to cross and be stored well within it (see also MAX_APPEND_BYTES).
            max_payload_entries: 512,
            ..Default::default()
        };
        cfg.validate()
            .map_err(|e| crate::Error::Config(e.to_string()))
    }
}

/// QUIC transport knobs (see the module docs for the reasoning behind the defaults).
#[derive(Debug, Clone)]
pub struct TransportTuning {
    pub keep_alive: Duration,
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
    pub initial_rtt: Duration,
    pub stream_window: u64,
    pub connection_window: u64,
    pub send_window: u64,
    /// Upper bound for path-MTU discovery. 1452 suits Ethernet; loopback or jumbo-frame
    /// LANs can go higher, which cuts per-packet CPU cost for bulk transfers.
    pub max_udp_payload: u16,
    /// Concurrent blob streams we accept per connection.
    pub max_concurrent_blob_streams: usize,
    /// UDP socket send/receive buffer to request; `None` keeps the OS default. Larger
    /// buffers avoid drops during bulk bursts, but every queued blob datagram also delays
    /// the Raft packets behind it in the same socket, so the default keeps them small.
    pub socket_buffer: Option<usize>,
}

impl Default for TransportTuning {
    fn default() -> Self {
        Self {
            keep_alive: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
            initial_rtt: Duration::from_millis(5),
            stream_window: 16 << 20,
            connection_window: 1 << 30,
            send_window: 64 << 20,
            max_udp_payload: 1452,
            max_concurrent_blob_streams: 8,
            socket_buffer: None,
        }
    }
}

impl TransportTuning {
    pub(crate) fn quinn_transport(&self) -> crate::Result<quinn::TransportConfig> {
        let varint = |v: u64| {
            quinn::VarInt::from_u64(v).map_err(|_| crate::Error::Config(format!("{v} too large")))
        };
        let idle = quinn::IdleTimeout::try_from(self.idle_timeout)
            .map_err(|_| crate::Error::Config("idle timeout too large".into()))?;
        let mut t = quinn::TransportConfig::default();
        t.keep_alive_interval(Some(self.keep_alive))
            .max_idle_timeout(Some(idle))
            .initial_rtt(self.initial_rtt)
            .stream_receive_window(varint(self.stream_window)?)
            .receive_window(varint(self.connection_window)?)
            .send_window(self.send_window)
            .max_concurrent_bidi_streams(varint(4096)?)
            .max_concurrent_uni_streams(varint(0)?);
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(self.max_udp_payload);
        t.mtu_discovery_config(Some(mtu));
        Ok(t)
    }
}
