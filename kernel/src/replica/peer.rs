//! `notebookos-kernel replica --bootstrap FILE`: a replica that does not face
//! Jupyter. It runs cells it wins, applies the others' namespace changes, and
//! relays its output to the front.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use raft_transport::{NodeIdentity, ReplicaNode};
use serde_json::json;
use tokio::sync::mpsc;

use super::group::{self, GroupError};
use super::relay::{self, RemoteStdin};
use super::{Core, CoreConfig};
use crate::channels::{iopub, Session};
use crate::python::{Bridge, PythonRuntime};
use crate::wire::Signer;

/// A peer left without a front (replica 1 died and Jupyter did not restart it)
/// exits after this long, so nothing is left running.
const ORPHAN_GRACE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error(transparent)]
    Group(#[from] GroupError),
    #[error(transparent)]
    Transport(#[from] raft_transport::Error),
    #[error(transparent)]
    Tls(#[from] raft_transport::TlsError),
    #[error(transparent)]
    Python(#[from] crate::python::PythonError),
    #[error(transparent)]
    Wire(#[from] crate::wire::WireError),
    #[error("bad listen address {0}")]
    Listen(String),
}

pub async fn run(bootstrap: &Path) -> Result<i32, PeerError> {
    // Before anything slow: replica 1 may die while we start.
    // SAFETY: getppid has no preconditions.
    let launcher = unsafe { libc::getppid() };
    let b = group::take_bootstrap(bootstrap)?;
    // Peers never sign: the front re-signs everything it publishes.
    let session = Session::new(Signer::new("hmac-sha256", b"")?);
    let (relay_tx, relay_rx) = mpsc::channel(1024);
    let (iopub, publisher) = iopub::relay(relay_tx.clone(), session.clone());
    tokio::spawn(publisher.run());
    let stdin = RemoteStdin::new(relay_tx, session);
    let bridge = Bridge::install(iopub.clone(), stdin.clone());
    let options = json!({"argv": b.argv, "connection_file": null});
    let python = Arc::new(tokio::task::block_in_place(|| {
        PythonRuntime::start(bridge.clone(), options, None)
    })?);

    let identity = NodeIdentity::from_pem(b.id, &b.identity_pem)?;
    let listen = b
        .listen
        .parse()
        .map_err(|_| PeerError::Listen(b.listen.clone()))?;
    let (app, handle) = super::replica_app(b.id, b.front, b.joining);
    let node = ReplicaNode::start(super::replica_config(identity, listen), app).await?;
    group::write_private(&b.addr_file, node.addr().to_string().as_bytes())?;

    let interrupter = python.clone();
    let core = Core::new(CoreConfig {
        kernel_id: b.kernel_id.clone(),
        node,
        exec: python.main().clone(),
        iopub,
        interrupt: Box::new(move || interrupter.interrupt()),
        joining: b.joining,
        app: handle,
    });
    let _ = core.remote_stdin.set(stdin);
    bridge.set_group(core.clone());
    core.start().await;
    tokio::spawn(relay::run(core.clone(), relay_rx));
    tracing::info!(id = b.id, "replica ready");

    tokio::select! {
        _ = core.stopped() => {}
        _ = orphaned(core.clone(), b.front, launcher) => {
            tracing::warn!("no replica has faced Jupyter for {ORPHAN_GRACE:?}; exiting");
            // Nobody will rejoin this group: its state goes too.
            if let Some(dir) = b.addr_file.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), core.node.shutdown()).await;
    Ok(0)
}

/// Resolves when no front has been around for [`ORPHAN_GRACE`]: our launcher
/// died and no new replica 1 joined in its place, or we were removed.
async fn orphaned(core: Arc<Core>, first_front: raft_transport::NodeId, parent: libc::pid_t) {
    let mut since: Option<Instant> = None;
    let mut was_member = false;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let members = core.members();
        let front = core.front_id();
        // SAFETY: as above.
        let launcher_gone = front == first_front && unsafe { libc::getppid() } != parent;
        let front_gone = !members.contains(&front) && was_member;
        let removed = was_member && !members.contains(&core.id);
        was_member |= members.contains(&core.id);
        if removed {
            tracing::warn!("this replica was removed from the group; exiting");
            return;
        }
        if launcher_gone || front_gone {
            let t = *since.get_or_insert_with(Instant::now);
            if t.elapsed() > ORPHAN_GRACE {
                return;
            }
        } else {
            since = None;
        }
    }
}
