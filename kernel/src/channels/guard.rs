//! A size guard in front of each zmq socket.
//!
//! The zmq library buffers a whole frame before handing it over, so a
//! client announcing a 1 GiB frame would make the kernel allocate 1 GiB.
//! The guard owns the connection-file endpoint, forwards each connection
//! byte for byte to the socket (bound in a private directory), and
//! reads the ZMTP 3 framing of what the client sends: a message (or
//! command) larger than the limit closes that connection before its body
//! is read. Replies flow back unread.

use std::io;
use std::path::PathBuf;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener, UnixStream};

/// Largest message a client may send, unless `NOTEBOOKOS_MAX_MESSAGE_BYTES`
/// says otherwise. Jupyter messages are small; buffers (widget uploads)
/// may be large, so this is generous.
pub const DEFAULT_LIMIT: u64 = 256 << 20;

/// The limit in force.
pub fn limit() -> u64 {
    std::env::var("NOTEBOOKOS_MAX_MESSAGE_BYTES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(DEFAULT_LIMIT)
}

/// ZMTP 3 greeting length.
const GREETING: u64 = 64;
const FLAG_MORE: u8 = 0x01;
const FLAG_LONG: u8 = 0x02;
const FLAG_COMMAND: u8 = 0x04;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("a message of {size} bytes exceeds the {limit}-byte limit")]
    TooLarge { size: u64, limit: u64 },
}

/// Follows ZMTP framing across reads, without buffering bodies.
#[derive(Debug)]
pub struct Framing {
    limit: u64,
    state: State,
    /// Bytes of the message being received, over its frames so far.
    message: u64,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Greeting { left: u64 },
    Header { buf: [u8; 9], have: usize },
    Body { left: u64, last: bool },
}

impl Framing {
    pub fn new(limit: u64) -> Self {
        Self {
            limit,
            state: State::Greeting { left: GREETING },
            message: 0,
        }
    }

    /// Accounts for `bytes`, the next bytes the client sent.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), FramingError> {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Greeting { left } | State::Body { left, .. } => {
                    let n = (*left).min(bytes.len() as u64);
                    *left -= n;
                    bytes = &bytes[n as usize..];
                    if *left == 0 {
                        if let State::Body { last: true, .. } = self.state {
                            self.message = 0;
                        }
                        self.state = State::Header {
                            buf: [0; 9],
                            have: 0,
                        };
                    }
                }
                State::Header { buf, have } => {
                    buf[*have] = bytes[0];
                    *have += 1;
                    bytes = &bytes[1..];
                    let flags = buf[0];
                    let need = if flags & FLAG_LONG != 0 { 9 } else { 2 };
                    if *have < need {
                        continue;
                    }
                    let size = if need == 9 {
                        u64::from_be_bytes(buf[1..9].try_into().unwrap_or([0xff; 8]))
                    } else {
                        u64::from(buf[1])
                    };
                    let command = flags & FLAG_COMMAND != 0;
                    let total = if command {
                        size
                    } else {
                        self.message.saturating_add(size)
                    };
                    if total > self.limit {
                        return Err(FramingError::TooLarge {
                            size: total,
                            limit: self.limit,
                        });
                    }
                    let last = command || flags & FLAG_MORE == 0;
                    if !command {
                        self.message = total;
                    }
                    self.state = State::Body { left: size, last };
                    if size == 0 {
                        // An empty frame: straight to the next header.
                        if last {
                            self.message = 0;
                        }
                        self.state = State::Header {
                            buf: [0; 9],
                            have: 0,
                        };
                    }
                }
            }
        }
        Ok(())
    }
}

/// Binds `endpoint` (tcp://ip:port or ipc://path from the connection file)
/// and forwards every connection to `backend` (the zmq socket's unix socket
/// in the kernel's private [`super::Backends`] directory).
pub async fn serve(
    channel: &'static str,
    endpoint: &str,
    backend: PathBuf,
    limit: u64,
) -> io::Result<()> {
    if let Some(path) = endpoint.strip_prefix("ipc://") {
        // A socket file left by an earlier kernel on this connection file.
        match std::fs::remove_file(path) {
            Ok(()) => tracing::debug!(path, "replaced a stale socket file"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(path)?;
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((client, _)) => {
                        tokio::spawn(forward(channel, client, backend.clone(), limit));
                    }
                    Err(e) => accept_failed(channel, e).await,
                }
            }
        });
        return Ok(());
    }
    let addr = endpoint.strip_prefix("tcp://").unwrap_or(endpoint);
    let listener = TcpListener::bind(addr).await?;
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((client, _)) => {
                    if let Err(e) = client.set_nodelay(true) {
                        tracing::debug!(channel, "no TCP_NODELAY on a client: {e}");
                    }
                    tokio::spawn(forward(channel, client, backend.clone(), limit));
                }
                Err(e) => accept_failed(channel, e).await,
            }
        }
    });
    Ok(())
}

async fn accept_failed(channel: &str, e: io::Error) {
    tracing::warn!(channel, "accept failed: {e}");
    // Out of descriptors, say: do not spin.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
}

async fn forward<C>(channel: &'static str, client: C, backend: PathBuf, limit: u64)
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match UnixStream::connect(&backend).await {
        Ok(server) => pipe(channel, client, server, limit).await,
        Err(e) => tracing::warn!(channel, "cannot reach the socket behind the guard: {e}"),
    }
}

/// Copies both ways between a client and the socket, checking the client's framing.
async fn pipe<C, S>(channel: &'static str, client: C, server: S, limit: u64)
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let (mut server_rx, mut server_tx) = tokio::io::split(server);
    let inbound = async {
        let mut framing = Framing::new(limit);
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = client_rx.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, io::Error>(());
            }
            if let Err(e) = framing.feed(&buf[..n]) {
                tracing::warn!(channel, "closing a client connection: {e}");
                return Ok(());
            }
            server_tx.write_all(&buf[..n]).await?;
        }
    };
    let outbound = async {
        tokio::io::copy(&mut server_rx, &mut client_tx).await?;
        client_tx.shutdown().await
    };
    // Either side ending ends the pair: the socket then sees a disconnect
    // and drops any partial message.
    tokio::select! {
        _ = inbound => {}
        _ = outbound => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn greeting() -> Vec<u8> {
        vec![0u8; 64]
    }

    fn frame(flags: u8, body: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        if body.len() > 255 {
            f.push(flags | FLAG_LONG);
            f.extend_from_slice(&(body.len() as u64).to_be_bytes());
        } else {
            f.push(flags);
            f.push(body.len() as u8);
        }
        f.extend_from_slice(body);
        f
    }

    #[test]
    fn messages_under_the_limit_pass_in_any_chunking() {
        let mut stream = greeting();
        stream.extend(frame(FLAG_COMMAND, b"\x05READY"));
        stream.extend(frame(FLAG_MORE, &[1; 300]));
        stream.extend(frame(0, &[2; 600]));
        stream.extend(frame(0, &[3; 900]));
        for chunk in [1, 2, 7, 64, 4096] {
            let mut f = Framing::new(1000);
            for c in stream.chunks(chunk) {
                f.feed(c).unwrap();
            }
        }
    }

    #[test]
    fn a_message_over_the_limit_is_refused_at_its_header() {
        let mut f = Framing::new(1000);
        f.feed(&greeting()).unwrap();
        f.feed(&frame(FLAG_MORE, &[1; 600])).unwrap();
        // The second frame brings the message to 1200: refused before any body.
        let header = &frame(0, &[2; 600])[..9];
        assert_eq!(
            f.feed(header),
            Err(FramingError::TooLarge {
                size: 1200,
                limit: 1000
            })
        );
        // A 1 GiB frame is refused from its 9-byte header alone.
        let mut f = Framing::new(DEFAULT_LIMIT);
        f.feed(&greeting()).unwrap();
        let mut header = vec![FLAG_LONG];
        header.extend_from_slice(&(1u64 << 30).to_be_bytes());
        assert!(f.feed(&header).is_err());
        // So is a length no allocation could hold.
        let mut f = Framing::new(DEFAULT_LIMIT);
        f.feed(&greeting()).unwrap();
        let mut header = vec![FLAG_COMMAND | FLAG_LONG];
        header.extend_from_slice(&u64::MAX.to_be_bytes());
        assert!(f.feed(&header).is_err());
    }

    #[test]
    fn the_count_restarts_with_each_message() {
        let mut f = Framing::new(1000);
        f.feed(&greeting()).unwrap();
        for _ in 0..10 {
            f.feed(&frame(0, &[1; 900])).unwrap();
            f.feed(&frame(0, &[])).unwrap();
        }
    }
}
