//! What replicas put in the Raft log ([`Entry`]) and send each other directly
//! ([`Mail`]). Both are postcard-encoded; JSON parts travel as strings because
//! postcard cannot carry `serde_json::Value`.

use std::collections::BTreeSet;

use bytes::Bytes;
use raft_transport::NodeId;
use serde::{Deserialize, Serialize};

use crate::wire::{Header, Message, Outgoing};

/// A kernel-wide unique id for one replicated request (a cell), chosen by the
/// replica facing Jupyter.
pub type CellId = String;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Entry {
    /// A shell request that one replica must run. `lead` carries the
    /// proposer's own LEAD bid, committed with the request (it is then the
    /// first LEAD, so it wins); without it every replica bids. `control`: the
    /// newest request the front served on control, the cell's
    /// `get_parent("control")` wherever it runs. `only`: the one replica that
    /// may run it, which bids once it holds every change (a front-end's comm
    /// message, for the replica whose Python holds the comm).
    Request {
        cell: CellId,
        request: Frames,
        lead: Option<NodeId>,
        control: Option<Box<Frames>>,
        only: Option<NodeId>,
    },
    /// A replica's answer to a Request: it can run it now (`lead`) or not.
    Bid {
        cell: CellId,
        replica: NodeId,
        lead: bool,
    },
    /// The winner finished: its reply, and the namespace changes in strict mode.
    /// Without them (`None`) they follow in a [`Entry::Synced`] of the same cell,
    /// and until then only `replica` may lead.
    Done {
        cell: CellId,
        replica: NodeId,
        reply: String,
        delta: Option<Delta>,
    },
    /// The namespace changes of a cell whose `Done` came without them; a replica
    /// proposes these in the order its cells ran.
    Synced {
        cell: CellId,
        replica: NodeId,
        delta: Delta,
    },
    /// A replica is gone (process exited, host lost); whatever it was running ends.
    MemberDown { replica: NodeId },
    /// A new replica joins and must be brought up to date by a checkpoint.
    MemberJoin {
        replica: NodeId,
        addr: String,
        /// It faces Jupyter (a restarted replica 1).
        front: bool,
    },
    /// The whole namespace for `replica`, pushed to it as a blob by `from`.
    /// It includes every delta of entries up to log index `upto`.
    Checkpoint {
        replica: NodeId,
        from: NodeId,
        blob: [u8; 32],
        upto: u64,
    },
    /// Every replica computes its namespace digest and mails it to `from`.
    Verify { nonce: String, from: NodeId },
    /// The kernel is shutting down: every replica exits.
    Shutdown,
    /// From now on these replicas yield every cell (tests and drills steer
    /// cells with it; see `wire::steer`).
    Steer { yielding: BTreeSet<NodeId> },
    /// `replica` has restored its checkpoint (and replayed what followed it):
    /// its namespace is the group's, so it may make checkpoints for others.
    /// (Variants are numbered by position on the wire: new ones go last.)
    Restored { replica: NodeId },
}

/// Namespace changes of one cell: small ones inline, large ones as a blob each
/// replica received before the entry was proposed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Delta {
    Inline(Bytes),
    Blob { hash: [u8; 32], len: u64 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Mail {
    /// iopub messages a replica produced, for the replica facing Jupyter.
    Iopub(Vec<Frames>),
    /// `input()` on a replica: ask the front-end.
    InputRequest { request: Frames },
    /// The front-end's answer, back to the replica that asked.
    InputReply { value: String },
    /// Interrupt the cell running on the receiving replica.
    Interrupt,
    /// A comm message from the front-end for the comm's owner.
    Comm { request: Frames },
    /// A namespace digest answering [`Entry::Verify`].
    Digest {
        nonce: String,
        replica: NodeId,
        digest: String,
    },
}

/// A Jupyter message without its signature, JSON parts kept as text.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Frames {
    pub identities: Vec<Bytes>,
    pub header: String,
    pub parent_header: String,
    pub metadata: String,
    pub content: String,
    pub buffers: Vec<Bytes>,
}

#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error("undecodable replica message: {0}")]
    Decode(#[from] postcard::Error),
    #[error("malformed message JSON: {0}")]
    Json(#[from] serde_json::Error),
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "{}".into())
}

impl Frames {
    pub fn from_message(m: &Message) -> Self {
        Self::of(
            &m.identities,
            &m.header,
            m.parent_header.as_ref(),
            &m.metadata,
            &m.content,
            &m.buffers,
        )
    }

    pub fn from_outgoing(m: &Outgoing) -> Self {
        Self::of(
            &m.identities,
            &m.header,
            m.parent_header.as_ref(),
            &m.metadata,
            &m.content,
            &m.buffers,
        )
    }

    fn of(
        identities: &[Bytes],
        header: &Header,
        parent: Option<&Header>,
        metadata: &impl Serialize,
        content: &serde_json::Value,
        buffers: &[Bytes],
    ) -> Self {
        Self {
            identities: identities.to_vec(),
            header: json(header),
            parent_header: parent.map_or("{}".into(), json),
            metadata: json(metadata),
            content: json(content),
            buffers: buffers.to_vec(),
        }
    }

    fn parent(&self) -> Result<Option<Header>, EntryError> {
        let v: serde_json::Value = serde_json::from_str(&self.parent_header)?;
        Ok(match v {
            serde_json::Value::Object(m) if m.is_empty() => None,
            serde_json::Value::Null => None,
            v => Some(serde_json::from_value(v)?),
        })
    }

    pub fn to_message(&self) -> Result<Message, EntryError> {
        let metadata = match serde_json::from_str(&self.metadata)? {
            serde_json::Value::Object(m) => m,
            _ => Default::default(),
        };
        Ok(Message {
            identities: self.identities.clone(),
            header: serde_json::from_str(&self.header)?,
            parent_header: self.parent()?,
            metadata,
            content: serde_json::from_str(&self.content)?,
            buffers: self.buffers.clone(),
            received: std::time::Instant::now(),
        })
    }

    pub fn to_outgoing(&self) -> Result<Outgoing, EntryError> {
        Ok(Outgoing {
            identities: self.identities.clone(),
            header: serde_json::from_str(&self.header)?,
            parent_header: self.parent()?,
            metadata: serde_json::from_str(&self.metadata)?,
            content: serde_json::from_str(&self.content)?,
            buffers: self.buffers.clone(),
        })
    }
}

impl Entry {
    /// The variant's name, for logs (entries can hold megabytes).
    pub fn kind(&self) -> &'static str {
        match self {
            Entry::Request { .. } => "Request",
            Entry::Bid { .. } => "Bid",
            Entry::Done { .. } => "Done",
            Entry::Synced { .. } => "Synced",
            Entry::MemberDown { .. } => "MemberDown",
            Entry::MemberJoin { .. } => "MemberJoin",
            Entry::Checkpoint { .. } => "Checkpoint",
            Entry::Restored { .. } => "Restored",
            Entry::Verify { .. } => "Verify",
            Entry::Shutdown => "Shutdown",
            Entry::Steer { .. } => "Steer",
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        // Encoding plain data into a Vec cannot fail.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    pub fn decode(data: &[u8]) -> Result<Self, EntryError> {
        Ok(postcard::from_bytes(data)?)
    }
}

impl Mail {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }

    pub fn decode(data: &[u8]) -> Result<Self, EntryError> {
        Ok(postcard::from_bytes(data)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn entries_round_trip() {
        let out = Outgoing::new("execute_request", "s", None, json!({"code": "1+1"}))
            .to(&[Bytes::from_static(b"id")])
            .with_buffers(vec![Bytes::from_static(b"buf")]);
        let frames = Frames::from_outgoing(&out);
        let e = Entry::Request {
            cell: "c1".into(),
            request: frames.clone(),
            lead: Some(1),
            control: Some(Box::new(frames.clone())),
            only: Some(2),
        };
        assert_eq!(Entry::decode(&e.encode()).unwrap(), e);
        let m = frames.to_message().unwrap();
        assert_eq!(m.content["code"], "1+1");
        assert_eq!(m.identities, vec![Bytes::from_static(b"id")]);
        assert!(m.parent_header.is_none());
        assert_eq!(m.header.msg_type, "execute_request");
    }

    #[test]
    fn variants_keep_their_wire_numbers() {
        // A group may mix builds (a restarted front, a server's agent): a new
        // variant inserted mid-enum would make an old replica read Verify as Shutdown.
        assert_eq!(Entry::MemberDown { replica: 1 }.encode(), vec![4, 1]);
        assert_eq!(Entry::Shutdown.encode(), vec![8]);
        assert_eq!(Entry::Restored { replica: 1 }.encode(), vec![10, 1]);
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(Entry::decode(&[0xff, 0xff, 0xff]).is_err());
        assert!(Mail::decode(&[]).is_err());
        let bad = Frames {
            identities: vec![],
            header: "{".into(),
            parent_header: "{}".into(),
            metadata: "{}".into(),
            content: "{}".into(),
            buffers: vec![],
        };
        assert!(bad.to_message().is_err());
    }
}

/// `cargo test -p notebookos-kernel write_fuzz_seeds -- --ignored` refreshes
/// the replica_decode fuzz corpus with one encoding of each kind.
#[cfg(test)]
#[test]
#[ignore]
fn write_fuzz_seeds() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/replica_decode");
    std::fs::create_dir_all(&dir).unwrap();
    let out = Outgoing::new(
        "execute_request",
        "s",
        None,
        serde_json::json!({"code": "x = 1"}),
    )
    .to(&[Bytes::from_static(b"id")]);
    let frames = Frames::from_outgoing(&out);
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        (
            "request",
            Entry::Request {
                cell: "c".into(),
                request: frames.clone(),
                lead: Some(1),
                control: None,
                only: None,
            }
            .encode(),
        ),
        (
            "bid",
            Entry::Bid {
                cell: "c".into(),
                replica: 2,
                lead: false,
            }
            .encode(),
        ),
        (
            "done",
            Entry::Done {
                cell: "c".into(),
                replica: 2,
                reply: "{}".into(),
                delta: None,
            }
            .encode(),
        ),
        (
            "synced",
            Entry::Synced {
                cell: "c".into(),
                replica: 2,
                delta: Delta::Inline(Bytes::from_static(b"d")),
            }
            .encode(),
        ),
        (
            "join",
            Entry::MemberJoin {
                replica: 4,
                addr: "127.0.0.1:1".into(),
                front: false,
            }
            .encode(),
        ),
        ("iopub", Mail::Iopub(vec![frames]).encode()),
        (
            "delta",
            crate::replica::statesync::pack(b"header", &[b"buffer"]).to_vec(),
        ),
    ];
    for (name, data) in seeds {
        std::fs::write(dir.join(name), data).unwrap();
    }
}
