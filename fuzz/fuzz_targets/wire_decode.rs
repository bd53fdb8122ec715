//! The Jupyter message parser and verifier, fed arbitrary frame sets.
//!
//! Input: frames separated by `\0|\0` (so the committed corpus holds real
//! messages that mutate into near-misses). Decoding must return an error,
//! never panic, for anything; typed contents likewise.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use notebookos_kernel::wire::{
    comm, complete, execute, history, inspect, is_complete, shutdown, Message, ReplayGuard, Signer,
};

const SEPARATOR: &[u8] = b"\0|\0";

fn frames(data: &[u8]) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut rest = data;
    while let Some(at) = rest.windows(SEPARATOR.len()).position(|w| w == SEPARATOR) {
        out.push(Bytes::copy_from_slice(&rest[..at]));
        rest = &rest[at + SEPARATOR.len()..];
    }
    out.push(Bytes::copy_from_slice(rest));
    out
}

fuzz_target!(|data: &[u8]| {
    let frames = frames(data);
    // Unsigned sessions reach the JSON parser with anything.
    let Ok(unsigned) = Signer::new("hmac-sha256", b"") else {
        return;
    };
    if let Ok(msg) = Message::decode(frames.clone(), &unsigned, None) {
        let _ = msg.content_as::<execute::ExecuteRequest>();
        let _ = msg.content_as::<complete::CompleteRequest>();
        let _ = msg.content_as::<inspect::InspectRequest>();
        let _ = msg.content_as::<is_complete::IsCompleteRequest>();
        let _ = msg.content_as::<history::HistoryRequest>();
        let _ = msg.content_as::<comm::CommMsg>();
        let _ = msg.content_as::<shutdown::ShutdownRequest>();
    }
    // Signed sessions must reject everything not signed with the key.
    let Ok(signed) = Signer::new("hmac-sha256", b"fuzz-key") else {
        return;
    };
    let mut replay = ReplayGuard::new(8);
    let _ = Message::decode(frames, &signed, Some(&mut replay));
});
