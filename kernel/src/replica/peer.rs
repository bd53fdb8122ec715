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
    // The node first: the group can form (and the front run its first
    // cell) while this replica's interpreter starts.
    let identity = NodeIdentity::from_pem(b.id, &b.identity_pem)?;
    let listen = b
        .listen
        .parse()
        .map_err(|_| PeerError::Listen(b.listen.clone()))?;
    let (app, handle) = super::replica_app(b.id, b.front, b.joining);
    let node = ReplicaNode::start(super::replica_config(identity, listen), app).await?;
    group::write_private(&b.addr_file, node.addr().to_string().as_bytes())?;

    let options = json!({"argv": b.argv, "connection_file": null});
    let python = Arc::new(tokio::task::block_in_place(|| {
        PythonRuntime::start(bridge.clone(), options, None)
    })?);

    let interrupter = python.clone();
    let core = Core::new(CoreConfig {
        kernel_id: b.kernel_id.clone(),
        node,
        exec: python.main().clone(),
        iopub,
        interrupt: Box::new(move |cell| interrupter.interrupt(cell)),
        joining: b.joining,
        app: handle,
        events: None,
    });
    let _ = core.remote_stdin.set(stdin);
    bridge.set_group(core.clone());
    core.start().await;
    tokio::spawn(relay::run(core.clone(), relay_rx));
    tracing::info!(id = b.id, "replica ready");

    tokio::select! {
        _ = core.stopped() => {}
        why = orphaned(core.clone(), b.front, launcher) => match why {
            Exit::Removed => tracing::warn!("this replica was removed from the group; exiting"),
            Exit::Orphaned => {
                tracing::warn!("no replica has faced Jupyter for {ORPHAN_GRACE:?}; exiting")
            }
        },
    }
    remove_own_files(&b.addr_file);
    match tokio::time::timeout(Duration::from_secs(1), core.node.shutdown()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!("replica shutdown: {e}"),
        Err(_) => tracing::warn!("replica shutdown took over 1 s; exiting anyway"),
    }
    Ok(0)
}

/// Why a peer leaves on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    /// The group no longer lists it (replaced, moved, or left).
    Removed,
    /// No front for [`ORPHAN_GRACE`].
    Orphaned,
}

/// What a leaving peer may delete: its own address file, never the group's
/// state beside it (group file, CA), which the survivors and a restarted
/// replica 1 still need; a kernel started on that connection file later
/// clears state whose replicas are all gone.
fn remove_own_files(addr_file: &Path) {
    group::remove_file(addr_file);
}

/// Resolves when no front has been around for [`ORPHAN_GRACE`]: our launcher
/// died and no new replica 1 joined in its place, or we were removed.
async fn orphaned(
    core: Arc<Core>,
    first_front: raft_transport::NodeId,
    parent: libc::pid_t,
) -> Exit {
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
            return Exit::Removed;
        }
        if launcher_gone || front_gone {
            let t = *since.get_or_insert_with(Instant::now);
            if t.elapsed() > ORPHAN_GRACE {
                return Exit::Orphaned;
            }
        } else {
            since = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::group::{GroupState, StateDir};

    /// A removed replica used to delete the whole state directory, taking the
    /// group file and CA that the survivors and a restarted replica 1 need.
    #[test]
    fn a_leaving_peer_removes_only_its_own_file() {
        let dir = std::env::temp_dir().join(format!("nbos-peer-test-{}", std::process::id()));
        let state = StateDir::private(dir.clone()).unwrap();
        state
            .save(&GroupState {
                kernel_id: "k".into(),
                ca_pem: String::new(),
                hash_seed: 0,
                front: 1,
                members: Vec::new(),
                next_id: 4,
            })
            .unwrap();
        let mine = state.addr_file(3);
        let other = state.addr_file(2);
        group::write_private(&mine, b"127.0.0.1:1").unwrap();
        group::write_private(&other, b"127.0.0.1:2").unwrap();
        remove_own_files(&mine);
        assert!(!mine.exists());
        assert!(other.exists(), "another replica's file is not ours");
        assert!(state.load().unwrap().is_some(), "the group state stays");
        // Leaving twice (or after someone else cleaned up) is fine.
        remove_own_files(&mine);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
