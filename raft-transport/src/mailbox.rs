//! Mailbox messages: direct messages between replicas, outside the log.
//!
//! A sender's [`crate::ReplicaNode::send_message`] returns only once the
//! receiving application is done with the message, that is, once it drops the
//! message's [`Receipt`]. So whatever the sender does next (proposing an entry
//! to the log, say) happens after the message was handled, not merely queued:
//! output a replica relays before it reports a cell finished is published
//! before the report is read.

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::types::NodeId;

/// A message from a peer, and the receipt its sender waits for.
#[derive(Debug)]
pub struct Message {
    pub from: NodeId,
    pub data: Bytes,
    pub receipt: Receipt,
}

/// Dropping this tells the message's sender it was handled. Keep it for as
/// long as the sender must wait: until the message's effect is visible.
#[derive(Debug)]
pub struct Receipt {
    _handled: oneshot::Sender<()>,
}

impl Message {
    pub(crate) fn new(from: NodeId, data: Bytes) -> (Self, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        let message = Self {
            from,
            data,
            receipt: Receipt { _handled: tx },
        };
        (message, rx)
    }
}
