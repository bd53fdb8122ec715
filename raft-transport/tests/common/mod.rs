//! Shared helpers for the loopback cluster tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use raft_transport::{Error, Journal, KernelCa, NodeId, ReplicaConfig, ReplicaNode};

pub const WAIT: Duration = Duration::from_secs(30);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

pub fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

pub fn config(ca: &KernelCa, id: NodeId) -> ReplicaConfig {
    ReplicaConfig::new(ca.issue_identity(id).unwrap(), loopback())
}

/// Each test runs in a process of its own (nextest), so a node's address names its journal.
static JOURNALS: std::sync::Mutex<BTreeMap<SocketAddr, Journal>> =
    std::sync::Mutex::new(BTreeMap::new());

/// Starts a replica whose application keeps every entry ([`journal`]).
pub async fn start(cfg: ReplicaConfig) -> ReplicaNode {
    let j = Journal::default();
    let node = ReplicaNode::start(cfg, j.clone()).await.unwrap();
    JOURNALS.lock().unwrap().insert(node.addr(), j);
    node
}

/// The entries `node` has applied.
pub fn journal(node: &ReplicaNode) -> Journal {
    JOURNALS.lock().unwrap()[&node.addr()].clone()
}

/// Starts `n` replicas (ids 1..=n) with `tweak` applied to each config and forms a group.
pub async fn cluster_with(
    ca: &KernelCa,
    n: u64,
    mut tweak: impl FnMut(&mut ReplicaConfig),
) -> BTreeMap<NodeId, ReplicaNode> {
    let mut nodes = BTreeMap::new();
    for id in 1..=n {
        let mut cfg = config(ca, id);
        tweak(&mut cfg);
        nodes.insert(id, start(cfg).await);
    }
    let members: BTreeMap<NodeId, SocketAddr> =
        nodes.iter().map(|(id, n)| (*id, n.addr())).collect();
    nodes[&1].initialize(members).await.unwrap();
    for node in nodes.values() {
        node.wait_for_leader(WAIT).await.unwrap();
    }
    nodes
}

pub async fn cluster(ca: &KernelCa, n: u64) -> BTreeMap<NodeId, ReplicaNode> {
    cluster_with(ca, n, |_| {}).await
}

/// The replica that all live replicas agree is the leader.
pub async fn leader<'a>(
    nodes: impl IntoIterator<Item = &'a ReplicaNode> + Clone,
) -> &'a ReplicaNode {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        for n in nodes.clone() {
            let m = n.metrics();
            if m.leader == Some(m.id) && m.state == raft_transport::node::ServerState::Leader {
                return n;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "no leader elected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Proposes on whichever replica leads, retrying across elections.
pub async fn propose<'a>(
    nodes: impl IntoIterator<Item = &'a ReplicaNode> + Clone,
    data: Vec<u8>,
) -> u64 {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let l = leader(nodes.clone()).await;
        match l.propose(&data).await {
            Ok(p) => return p.index,
            Err(Error::NotLeader { .. }) | Err(Error::Raft(_))
                if tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("propose failed: {e}"),
        }
    }
}

/// Waits until `node`'s effective membership lists `peer` (membership applies asynchronously).
pub async fn wait_member(node: &ReplicaNode, peer: NodeId) {
    node.raft()
        .wait(Some(WAIT))
        .metrics(
            |m| m.membership_config.membership().get_node(&peer).is_some(),
            "member known",
        )
        .await
        .unwrap();
}

/// Payload `i` padded to 100 bytes.
pub fn payload(i: u64) -> Vec<u8> {
    let mut v = i.to_le_bytes().to_vec();
    v.resize(100, 0xab);
    v
}

pub fn temp_dir() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().to_path_buf();
    (d, p)
}

/// All application entries a replica has applied, as payloads.
pub async fn applied_payloads(node: &ReplicaNode) -> Vec<Vec<u8>> {
    journal(node)
        .entries()
        .into_iter()
        .map(|e| e.data.to_vec())
        .collect()
}

pub async fn shutdown_all(nodes: BTreeMap<NodeId, ReplicaNode>) {
    for n in nodes.values() {
        let _ = n.shutdown().await;
    }
}
