//! Three "hosts" (network namespaces) on one virtual switch; one is cut off and comes back.
//!
//! Needs root, iproute2 and the `netns_node` example binary, so it runs only with
//! `NOTEBOOKOS_NETNS_TESTS=1` (see `scripts/netns-test.sh`, which builds the binary first).
//! Otherwise it prints why it is skipped and passes.
//!
//! Layout: namespace `sw` holds a bridge; each host namespace `hN` has `eth0` =
//! 10.77.0.N/24, whose veth peer `swpN` is a bridge port. Cutting a host sets its switch
//! port down, so its packets vanish silently, as with a pulled cable.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use raft_transport::KernelCa;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

const WAIT: Duration = Duration::from_secs(60);

fn skip_reason() -> Option<String> {
    if std::env::var("NOTEBOOKOS_NETNS_TESTS").ok().as_deref() != Some("1") {
        return Some(
            "set NOTEBOOKOS_NETNS_TESTS=1 (and build the netns_node example) to run it".into(),
        );
    }
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("needs root for ip netns".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("iproute2 `ip` is not installed".into());
    }
    None
}

fn node_bin() -> PathBuf {
    if let Ok(p) = std::env::var("NOTEBOOKOS_NETNS_NODE_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("target")
        });
    target.join("debug").join("examples").join("netns_node")
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The namespaces of one test run; removed on drop, even when the test panics.
struct Lab {
    sw: String,
    hosts: Vec<String>,
}

impl Lab {
    fn new(n: usize) -> Self {
        let tag = format!("nbos{}", std::process::id());
        let lab = Lab {
            sw: format!("{tag}-sw"),
            hosts: (1..=n).map(|i| format!("{tag}-h{i}")).collect(),
        };
        ip(&["netns", "add", &lab.sw]);
        ip(&["-n", &lab.sw, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &lab.sw, "link", "set", "br0", "up"]);
        for (i, h) in lab.hosts.iter().enumerate() {
            let port = format!("swp{}", i + 1);
            let addr = format!("10.77.0.{}/24", i + 1);
            ip(&["netns", "add", h]);
            ip(&[
                "-n", &lab.sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", h,
            ]);
            ip(&["-n", &lab.sw, "link", "set", &port, "master", "br0", "up"]);
            ip(&["-n", h, "addr", "add", &addr, "dev", "eth0"]);
            ip(&["-n", h, "link", "set", "eth0", "up"]);
            ip(&["-n", h, "link", "set", "lo", "up"]);
        }
        lab
    }

    fn set_port(&self, host: u64, up: bool) {
        let port = format!("swp{host}");
        ip(&[
            "-n",
            &self.sw,
            "link",
            "set",
            &port,
            if up { "up" } else { "down" },
        ]);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.hosts.iter().chain(std::iter::once(&self.sw)) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

struct Node {
    id: u64,
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

#[derive(Debug, Default)]
struct Status {
    leader: Option<u64>,
    state: String,
    applied: u64,
}

impl Node {
    async fn cmd(&mut self, line: &str) -> String {
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
        self.stdin.flush().await.unwrap();
        tokio::time::timeout(WAIT, self.lines.next_line())
            .await
            .expect("node reply")
            .unwrap()
            .expect("node output")
    }

    async fn status(&mut self) -> Status {
        let line = self.cmd("status").await;
        let mut s = Status::default();
        for kv in line.split_whitespace().skip(1) {
            match kv.split_once('=') {
                Some(("leader", v)) => s.leader = v.parse().ok(),
                Some(("state", v)) => s.state = v.to_string(),
                Some(("applied", v)) => s.applied = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        s
    }

    async fn propose(&mut self, n: usize) -> Option<u64> {
        let line = self.cmd(&format!("propose {n}")).await;
        line.strip_prefix("ok last=").and_then(|v| v.parse().ok())
    }
}

async fn wait_until<F>(what: &str, mut check: F)
where
    F: AsyncFnMut() -> bool,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The id every listed node agrees is leader (and that node says it leads), if any.
async fn agreed_leader(nodes: &mut [Node], among: &[u64]) -> Option<u64> {
    let mut leader = None;
    for n in nodes.iter_mut().filter(|n| among.contains(&n.id)) {
        let s = n.status().await;
        if s.leader.is_none() || (leader.is_some() && leader != s.leader) {
            return None;
        }
        leader = s.leader;
    }
    let l = leader?;
    let s = nodes.iter_mut().find(|n| n.id == l)?.status().await;
    (s.state == "Leader").then_some(l)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_cut_off_and_back_catches_up() {
    if let Some(reason) = skip_reason() {
        eprintln!("SKIPPED host_cut_off_and_back_catches_up: {reason}");
        return;
    }
    let bin = node_bin();
    assert!(
        bin.exists(),
        "{} missing: cargo build -p raft-transport --example netns_node",
        bin.display()
    );

    let lab = Lab::new(3);
    let dir = tempfile::tempdir().unwrap();
    let ca = KernelCa::generate("netns").unwrap();
    let peers = "1=10.77.0.1:7000,2=10.77.0.2:7000,3=10.77.0.3:7000";
    let mut nodes = Vec::new();
    for id in 1..=3u64 {
        let pem = dir.path().join(format!("node{id}.pem"));
        std::fs::write(&pem, ca.issue_identity(id).unwrap().to_pem()).unwrap();
        let mut cmd = tokio::process::Command::new("ip");
        cmd.args(["netns", "exec", &lab.hosts[(id - 1) as usize]])
            .arg(&bin)
            .args([
                "--id",
                &id.to_string(),
                "--listen",
                &format!("10.77.0.{id}:7000"),
            ])
            .arg("--identity")
            .arg(&pem)
            .args(["--peers", peers])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        if id == 1 {
            cmd.arg("--init");
        }
        let mut child = cmd.spawn().unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(ready.starts_with("ready"), "{ready}");
        nodes.push(Node {
            id,
            child,
            stdin,
            lines,
        });
    }

    let mut leader = 0;
    wait_until("a leader", async || {
        match agreed_leader(&mut nodes, &[1, 2, 3]).await {
            Some(l) => {
                leader = l;
                true
            }
            None => false,
        }
    })
    .await;
    let first = nodes[(leader - 1) as usize]
        .propose(100)
        .await
        .expect("propose on leader");

    // Pull the leader's cable; the other two elect a new leader and keep committing.
    lab.set_port(leader, false);
    let rest: Vec<u64> = (1..=3).filter(|i| *i != leader).collect();
    let mut new_leader = 0;
    wait_until("a new leader", async || {
        match agreed_leader(&mut nodes, &rest).await {
            Some(l) if l != leader => {
                new_leader = l;
                true
            }
            _ => false,
        }
    })
    .await;
    let second = nodes[(new_leader - 1) as usize]
        .propose(100)
        .await
        .expect("propose on new leader");
    assert!(second > first);
    assert!(
        nodes[(leader - 1) as usize].status().await.applied < second,
        "cut-off host must lag"
    );

    // Plug it back in: the old leader steps down and catches up.
    lab.set_port(leader, true);
    let old = (leader - 1) as usize;
    wait_until("the old leader to catch up", async || {
        let s = nodes[old].status().await;
        s.applied >= second && s.leader == Some(new_leader)
    })
    .await;

    for n in nodes.iter_mut() {
        let _ = n.cmd("quit").await;
        let _ = tokio::time::timeout(Duration::from_secs(10), n.child.wait()).await;
    }
    drop(lab);
}
