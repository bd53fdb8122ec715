//! What the shim asks of the group: `%notebookos verify` (every replica's
//! namespace digest at the same log position) and `%notebookos` (placement).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use raft_transport::NodeId;
use serde_json::json;
use tokio::sync::mpsc;

use super::entry::{Entry, Mail};
use super::{lock, statesync, Core, Place};
use crate::python::Group;

impl Core {
    pub(super) async fn answer_verify(self: Arc<Self>, nonce: String, to: NodeId) {
        let digest = if !*self.ready.borrow() {
            // It left (a checkpoint or delta that did not apply): its namespace
            // is not the group's, and a digest of it would read as a difference.
            "left the group: its namespace is not the group's".to_string()
        } else {
            match statesync::digest(&self.exec).await {
                Ok(d) => d,
                Err(e) => format!("error: {e}"),
            }
        };
        if to == self.id {
            self.digest_arrived(self.id, &nonce, self.id, digest);
            return;
        }
        let mail = Mail::Digest {
            nonce,
            replica: self.id,
            digest,
        };
        if let Err(e) = self.node.send_message(to, mail.encode()).await {
            tracing::warn!(to, error = %e, "could not send digest");
        }
    }
}

impl Group for Core {
    fn peer_digests(&self) -> Result<Vec<(u64, String)>, String> {
        let nonce = uuid::Uuid::new_v4().to_string();
        let (tx, mut rx) = mpsc::unbounded_channel();
        lock(&self.digests).insert(nonce.clone(), tx);
        let want = self.members().len().saturating_sub(1);
        let entry = Entry::Verify {
            nonce: nonce.clone(),
            from: self.id,
        };
        let result = self.runtime.block_on(async {
            // Digests compare namespaces at one log position: the others must
            // have every earlier cell's changes first.
            if !self.wait_synced(Duration::from_secs(600)).await {
                return Err("replicas still receiving earlier cells' changes".to_string());
            }
            self.propose(&entry).await.map_err(|e| e.to_string())?;
            let mut got = Vec::new();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while got.len() < want {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(d)) => got.push(d),
                    _ => break,
                }
            }
            got.sort();
            Ok(got)
        });
        lock(&self.digests).remove(&nonce);
        result
    }

    fn placement(&self) -> String {
        self.placement_with(&HashMap::new())
    }
}

impl Core {
    /// `%notebookos`'s JSON; `places` are the replicas' processes and servers
    /// where this replica knows them (the front does).
    pub(super) fn placement_with(&self, places: &HashMap<NodeId, Place>) -> String {
        let m = self.node.metrics();
        let front = self.front_id();
        let restoring = lock(&self.applier).state().restoring.clone();
        let replicas: Vec<_> = m
            .voters
            .iter()
            .map(|id| match restoring.contains(id) {
                // Votes (the log is whole there) but its namespace is not yet.
                true => (id, "voter, catching up"),
                false => (id, "voter"),
            })
            .chain(m.learners.iter().map(|id| (id, "catching up")))
            .map(|(id, state)| {
                json!({
                    "id": id,
                    "role": if *id == front { "talks to Jupyter" } else { "peer" },
                    "state": state,
                    "leader": m.leader == Some(*id),
                    "pid": places.get(id).map(|p| p.pid),
                    "host": places.get(id).and_then(|p| p.host.clone()),
                })
            })
            .collect();
        let usage = self.runtime.block_on(async {
            let status =
                tokio::time::timeout(Duration::from_secs(1), self.gpu.agent_status()).await;
            match status {
                Ok(Some(s)) => s.usage.get(&self.kernel_id).cloned(),
                _ => None,
            }
        });
        let (unsynced_cells, holder) = {
            let applier = lock(&self.applier);
            let state = applier.state();
            (state.unsynced.len(), state.holder())
        };
        json!({
            "self": self.id,
            "front": front,
            "replicas": replicas,
            "last_winner": self.running_on(),
            "gpu_usage": usage,
            "replication": {
                "mode": self.sync_mode.name(),
                "unsynced_cells": unsynced_cells,
                "holder": holder,
                // Known where the holder is this replica.
                "unsynced_bytes": (holder == Some(self.id))
                    .then(|| self.unsynced_bytes.load(std::sync::atomic::Ordering::Relaxed)),
            },
        })
        .to_string()
    }
}
