//! Loopback benchmark: commit latency, saturation throughput, bulk-stream throughput.
//!
//! ```text
//! cargo run --release -p raft-transport --example bench -- [--samples N] [--entries N] [--blob-mib N] [--blob-only]
//! ```
//!
//! Three replicas run in this one process on 127.0.0.1, so they share the machine's cores
//! with each other (and with the load generator). Numbers are printed, never asserted.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use raft_transport::{KernelCa, NodeId, ReplicaConfig, ReplicaNode, TransportTuning};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Args {
    samples: usize,
    entries: usize,
    blob_mib: usize,
    blob_only: bool,
}

fn args() -> Result<Args> {
    let mut a = Args {
        samples: 5000,
        entries: 100_000,
        blob_mib: 1024,
        blob_only: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || -> Result<usize> { Ok(it.next().context("missing value")?.parse()?) };
        match flag.as_str() {
            "--samples" => a.samples = val()?,
            "--entries" => a.entries = val()?,
            "--blob-mib" => a.blob_mib = val()?,
            "--blob-only" => a.blob_only = true,
            "--bench" => {} // passed by `cargo bench`-style runners
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(a)
}

async fn start_group(
    ca: &KernelCa,
    ids: &[NodeId],
    tuning: &TransportTuning,
) -> Result<BTreeMap<NodeId, ReplicaNode>> {
    let mut nodes = BTreeMap::new();
    for &id in ids {
        let mut cfg = ReplicaConfig::new(ca.issue_identity(id)?, "127.0.0.1:0".parse()?);
        cfg.transport = tuning.clone();
        // Keep snapshots out of the latency measurement's way.
        cfg.snapshot_after_entries = 1_000_000;
        nodes.insert(
            id,
            ReplicaNode::start(cfg, raft_transport::Journal::default()).await?,
        );
    }
    let members: BTreeMap<NodeId, SocketAddr> =
        nodes.iter().map(|(id, n)| (*id, n.addr())).collect();
    nodes[&ids[0]].initialize(members).await?;
    for n in nodes.values() {
        n.wait_for_leader(Duration::from_secs(10)).await?;
    }
    Ok(nodes)
}

fn leader(nodes: &BTreeMap<NodeId, ReplicaNode>) -> Result<&ReplicaNode> {
    let id = nodes
        .values()
        .next()
        .and_then(|n| n.metrics().leader)
        .context("no leader")?;
    nodes.get(&id).context("leader not local")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn tcp_copy(len: usize) -> Result<Duration> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let reader = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        let mut buf = Vec::with_capacity(len);
        let mut chunk = vec![0u8; 1 << 20];
        while buf.len() < len {
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        anyhow::Ok(buf.len())
    });
    let data = vec![0x5au8; len];
    let start = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    for c in data.chunks(1 << 20) {
        s.write_all(c).await?;
    }
    s.shutdown().await?;
    let got = reader.await??;
    let took = start.elapsed();
    if got != len {
        bail!("tcp copy short: {got} of {len}");
    }
    Ok(took)
}

async fn blob_run(label: &str, tuning: TransportTuning, len: usize) -> Result<()> {
    let ca = KernelCa::generate("bench-blob")?;
    let nodes = start_group(&ca, &[1, 2], &tuning).await?;
    let l = leader(&nodes)?;
    let peer = *nodes.keys().find(|id| **id != l.id()).context("no peer")?;
    let data = bytes::Bytes::from(vec![0xa5u8; len]);
    // Warm the connection and the congestion window.
    l.send_blob(peer, vec![1u8; 8 << 20]).await?;
    // While the blob streams, keep committing 100-byte entries. With two voters every
    // commit needs the peer that is receiving the blob, over the same QUIC connection.
    let done = std::sync::atomic::AtomicBool::new(false);
    let start = Instant::now();
    let (sent, mut lat) = tokio::join!(
        async {
            let r = l.send_blob(peer, data.clone()).await;
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            r
        },
        async {
            let mut lat = Vec::new();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                if l.propose(&[0x42u8; 100][..]).await.is_err() {
                    break;
                }
                lat.push(t.elapsed());
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            lat
        }
    );
    let took = start.elapsed();
    let hash = sent?;
    if nodes[&peer].blob(&hash).map(|b| b.len()) != Some(len) {
        bail!("blob missing on receiver");
    }
    println!(
        "bulk blob ({label}): {} MiB in {:.3} s = {:.2} GB/s (sha256 on both ends, TLS 1.3 AES-GCM)",
        len >> 20,
        took.as_secs_f64(),
        len as f64 / took.as_secs_f64() / 1e9
    );
    lat.sort();
    if !lat.is_empty() {
        println!(
            "  commit latency during that transfer (2 voters, same connection, {} samples): median {:?}, p99 {:?}, max {:?}",
            lat.len(),
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            lat[lat.len() - 1]
        );
    }
    for n in nodes.values() {
        n.shutdown().await?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = args()?;
    tracing_subscriber::fmt()
        .with_env_filter(
            // openraft logs peers going away during shutdown as errors; that is noise here.
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error,openraft=off".into()),
        )
        .init();
    println!(
        "machine: {} cores; 3 voters in one process on 127.0.0.1",
        std::thread::available_parallelism()?.get()
    );

    if a.blob_only {
        return compare_bulk(a.blob_mib).await;
    }
    let ca = KernelCa::generate("bench")?;
    let nodes = start_group(&ca, &[1, 2, 3], &TransportTuning::default()).await?;
    let l = leader(&nodes)?;
    let entry = vec![0x42u8; 100];
    for _ in 0..500 {
        l.propose(&entry).await?;
    }

    // Latency: one proposal at a time, from propose() to applied on the leader (which
    // implies replicated to a majority and committed).
    let mut lat = Vec::with_capacity(a.samples);
    for _ in 0..a.samples {
        let t = Instant::now();
        l.propose(&entry).await?;
        lat.push(t.elapsed());
    }
    lat.sort();
    println!(
        "commit latency, 100-byte entry, 3 voters ({} samples): median {:?}, p99 {:?}, min {:?}, max {:?}",
        a.samples,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat[0],
        lat[lat.len() - 1]
    );

    // Saturation: keep a window of proposals in flight.
    let window = 4096;
    let start = Instant::now();
    let mut inflight = std::collections::VecDeque::with_capacity(window);
    for _ in 0..a.entries {
        if inflight.len() == window {
            let p: raft_transport::PendingProposal = inflight.pop_front().context("empty")?;
            p.committed().await?;
        }
        inflight.push_back(l.propose_pipelined(&entry).await?);
    }
    let mut last = 0;
    for p in inflight {
        last = p.committed().await?.index;
    }
    let took = start.elapsed();
    println!(
        "saturation: {} entries of 100 bytes in {:.3} s = {:.0} entries/s (window {window})",
        a.entries,
        took.as_secs_f64(),
        a.entries as f64 / took.as_secs_f64()
    );
    // All replicas must have applied everything before any of them (perhaps the leader)
    // goes away.
    for n in nodes.values() {
        n.wait_applied(last, Duration::from_secs(30)).await?;
    }
    for n in nodes.values() {
        n.shutdown().await?;
    }

    compare_bulk(a.blob_mib).await
}

/// Plain TCP against the bulk stream under each tuning, in the same run.
async fn compare_bulk(blob_mib: usize) -> Result<()> {
    // The TCP reference runs right before each QUIC run: on a shared machine the
    // available CPU drifts, and the comparison should see the same conditions.
    let len = blob_mib << 20;
    let jumbo = TransportTuning {
        max_udp_payload: 65_000,
        ..TransportTuning::default()
    };
    for (label, tuning) in [
        (
            "default tuning, 1452-byte UDP payloads",
            TransportTuning::default(),
        ),
        (
            "loopback tuning, up to 65000-byte UDP payloads",
            jumbo.clone(),
        ),
        (
            "jumbo payloads and 8 MiB socket buffers",
            TransportTuning {
                socket_buffer: Some(8 << 20),
                ..jumbo
            },
        ),
    ] {
        let tcp = tcp_copy(len).await?;
        println!(
            "plain TCP copy (reference): {} MiB in {:.3} s = {:.2} GB/s",
            blob_mib,
            tcp.as_secs_f64(),
            len as f64 / tcp.as_secs_f64() / 1e9
        );
        blob_run(label, tuning, len).await?;
    }
    Ok(())
}
