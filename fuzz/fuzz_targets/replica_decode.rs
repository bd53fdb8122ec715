//! What one replica accepts from another: Raft log entries, mailbox
//! messages, the Jupyter messages inside them, and packed state deltas.
//! Peers are authenticated, but a bug or a corrupt log must still give an
//! error, never a panic or an unbounded allocation.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use notebookos_kernel::replica::entry::{Entry, Mail};
use notebookos_kernel::replica::statesync::unpack;

fuzz_target!(|data: &[u8]| {
    if let Ok(Entry::Request { request, .. }) = Entry::decode(data) {
        let _ = request.to_message();
    }
    if let Ok(Mail::Iopub(msgs)) = Mail::decode(data) {
        for m in msgs {
            let _ = m.to_outgoing();
        }
    }
    let _ = unpack(&Bytes::copy_from_slice(data));
});
