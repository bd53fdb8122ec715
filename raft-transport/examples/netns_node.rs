//! One replica as a process, driven over stdin/stdout. Used by `tests/netns.rs`, which
//! runs one of these inside each network namespace ("host").
//!
//! ```text
//! netns_node --id 1 --listen 10.77.0.1:7000 --identity node1.pem \
//!            --peers 1=10.77.0.1:7000,2=10.77.0.2:7000,3=10.77.0.3:7000 [--init] [--data-dir DIR]
//! ```
//!
//! Commands (one per line) and replies (one line each):
//! * `status`      -> `status id=1 state=Leader leader=1 term=2 applied=57 log=57`
//! * `propose N`   -> `ok last=<index>` | `err <reason>` (N 100-byte entries, pipelined)
//! * `quit`        -> `bye`, then the process exits.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use raft_transport::{NodeIdentity, ReplicaConfig, ReplicaNode};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

struct Args {
    id: u64,
    listen: SocketAddr,
    identity: PathBuf,
    peers: BTreeMap<u64, SocketAddr>,
    init: bool,
    data_dir: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut id = None;
    let mut listen = None;
    let mut identity = None;
    let mut peers = BTreeMap::new();
    let mut init = false;
    let mut data_dir = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--id" => id = Some(val()?.parse()?),
            "--listen" => listen = Some(val()?.parse()?),
            "--identity" => identity = Some(PathBuf::from(val()?)),
            "--data-dir" => data_dir = Some(PathBuf::from(val()?)),
            "--init" => init = true,
            "--peers" => {
                for p in val()?.split(',') {
                    let (pid, addr) = p.split_once('=').context("peer must be ID=ADDR")?;
                    peers.insert(pid.parse()?, addr.parse()?);
                }
            }
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(Args {
        id: id.context("--id")?,
        listen: listen.context("--listen")?,
        identity: identity.context("--identity")?,
        peers,
        init,
        data_dir,
    })
}

fn status_line(node: &ReplicaNode) -> String {
    let m = node.metrics();
    format!(
        "status id={} state={:?} leader={} term={} applied={} log={}",
        m.id,
        m.state,
        m.leader.map_or("none".to_string(), |l| l.to_string()),
        m.term,
        m.last_applied.unwrap_or(0),
        m.last_log_index.unwrap_or(0)
    )
}

async fn propose(node: &ReplicaNode, n: usize) -> Result<u64> {
    let mut pending = Vec::with_capacity(n);
    for _ in 0..n {
        pending.push(node.propose_pipelined(&[0x42u8; 100][..]).await?);
    }
    let mut last = 0;
    for p in pending {
        last = p.committed().await?.index;
    }
    Ok(last)
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args = parse_args()?;
    let pem = std::fs::read_to_string(&args.identity)?;
    let mut cfg = ReplicaConfig::new(NodeIdentity::from_pem(args.id, &pem)?, args.listen);
    cfg.data_dir = args.data_dir;
    let node = ReplicaNode::start(cfg, raft_transport::Journal::default()).await?;
    if args.init {
        node.initialize(args.peers).await?;
    }
    let mut out = tokio::io::stdout();
    out.write_all(format!("ready id={} addr={}\n", args.id, node.addr()).as_bytes())
        .await?;
    out.flush().await?;

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let mut words = line.split_whitespace();
        let reply = match (words.next(), words.next()) {
            (Some("status"), _) => status_line(&node),
            (Some("propose"), Some(n)) => match propose(&node, n.parse()?).await {
                Ok(last) => format!("ok last={last}"),
                Err(e) => format!("err {e}"),
            },
            (Some("quit"), _) => break,
            _ => format!("err unknown command {line:?}"),
        };
        out.write_all(reply.as_bytes()).await?;
        out.write_all(b"\n").await?;
        out.flush().await?;
    }
    node.shutdown().await?;
    out.write_all(b"bye\n").await?;
    out.flush().await?;
    Ok(())
}
