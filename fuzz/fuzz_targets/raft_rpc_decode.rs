//! What a replica's QUIC server decodes from a peer's request stream: the
//! header, the length and the postcard body of AppendEntries, Vote,
//! snapshot metadata and forwarded proposals. Only a peer with the kernel's
//! certificate gets this far, but a bug there must still give an error,
//! never a panic or an unbounded allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = raft_transport::decode_request(data);
});
