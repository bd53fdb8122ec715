//! A request/response service over QUIC with the same mutual TLS as the
//! Raft transport, for cluster control (host agents) rather than Raft.
//!
//! Both ends hold an identity issued by one CA (the cluster's): a peer
//! without one, or with another CA's, fails the handshake. Each request is
//! one bidirectional stream carrying `[len u32 LE][bytes]` each way; what
//! the bytes mean is the application's.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};

use crate::error::{Error, Result, TlsError};
use crate::tls::{node_server_name, NodeIdentity};
use crate::types::NodeId;

/// ALPN of the control service; a Raft peer cannot talk to it by mistake.
pub const CONTROL_ALPN: &[u8] = b"notebookos-control/1";

/// Largest request or response.
pub const MAX_CONTROL_MESSAGE: usize = 16 << 20;

fn server_config(identity: &NodeIdentity) -> Result<quinn::ServerConfig> {
    let mut tls = identity.server_config()?;
    tls.alpn_protocols = vec![CONTROL_ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Pem(format!("QUIC server config: {e}")))?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(crypto)))
}

fn client_config(identity: &NodeIdentity) -> Result<quinn::ClientConfig> {
    let mut tls = identity.client_config()?;
    tls.alpn_protocols = vec![CONTROL_ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Pem(format!("QUIC client config: {e}")))?;
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

async fn read_frame(recv: &mut quinn::RecvStream) -> std::result::Result<Vec<u8>, String> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await.map_err(|e| e.to_string())?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_CONTROL_MESSAGE {
        return Err(format!(
            "message of {len} bytes exceeds {MAX_CONTROL_MESSAGE}"
        ));
    }
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    Ok(body)
}

async fn write_frame(send: &mut quinn::SendStream, body: &[u8]) -> std::result::Result<(), String> {
    let len = u32::try_from(body.len()).map_err(|_| "message too large".to_string())?;
    send.write_all(&len.to_le_bytes())
        .await
        .map_err(|e| e.to_string())?;
    send.write_all(body).await.map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())
}

/// The serving side: one endpoint, a handler per request.
pub struct ControlServer {
    endpoint: quinn::Endpoint,
}

impl ControlServer {
    pub fn bind(identity: &NodeIdentity, listen: SocketAddr) -> Result<Self> {
        let endpoint = quinn::Endpoint::server(server_config(identity)?, listen)?;
        Ok(Self { endpoint })
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.endpoint.local_addr()?)
    }

    /// Answers requests until the endpoint closes; `handler` maps a request
    /// to its response.
    pub async fn serve<H, F>(self, handler: H)
    where
        H: Fn(Bytes) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Vec<u8>> + Send + 'static,
    {
        while let Some(incoming) = self.endpoint.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move {
                let conn = match incoming.await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "control connection refused");
                        return;
                    }
                };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let handler = handler.clone();
                    tokio::spawn(async move {
                        match read_frame(&mut recv).await {
                            Ok(request) => {
                                let response = handler(Bytes::from(request)).await;
                                if let Err(e) = write_frame(&mut send, &response).await {
                                    tracing::debug!("control response not delivered: {e}");
                                }
                            }
                            Err(e) => tracing::warn!("bad control request: {e}"),
                        }
                    });
                }
            });
        }
    }

    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"");
    }
}

/// The calling side: one endpoint, a connection per call (calls are rare:
/// placement, liveness checks, autoscaling).
#[derive(Clone)]
pub struct ControlClient {
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
}

impl ControlClient {
    pub fn new(identity: &NodeIdentity, local: SocketAddr) -> Result<Self> {
        let endpoint = quinn::Endpoint::client(local)?;
        Ok(Self {
            endpoint,
            config: client_config(identity)?,
        })
    }

    /// Sends `request` to the server at `addr`, whose certificate must be
    /// the one issued for `server` by the shared CA; waits up to `timeout`.
    pub async fn call(
        &self,
        addr: SocketAddr,
        server: NodeId,
        request: &[u8],
        timeout: Duration,
    ) -> Result<Bytes> {
        let unreachable = |reason: String| Error::Unreachable {
            peer: server,
            reason,
        };
        let exchange = async {
            let conn = self
                .endpoint
                .connect_with(self.config.clone(), addr, &node_server_name(server))
                .map_err(|e| unreachable(e.to_string()))?
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let (mut send, mut recv) = conn
                .open_bi()
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            write_frame(&mut send, request).await.map_err(unreachable)?;
            let response = read_frame(&mut recv).await.map_err(unreachable)?;
            conn.close(0u32.into(), b"");
            Ok(Bytes::from(response))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| Error::Timeout(timeout))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KernelCa;

    fn loopback() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    #[tokio::test]
    async fn requests_are_answered_and_strangers_refused() {
        let ca = KernelCa::generate("cluster").unwrap();
        let server = ControlServer::bind(&ca.issue_identity(7).unwrap(), loopback()).unwrap();
        let addr = server.local_addr().unwrap();
        tokio::spawn(server.serve(|req: Bytes| async move {
            let mut out = b"echo:".to_vec();
            out.extend_from_slice(&req);
            out
        }));
        let client = ControlClient::new(&ca.issue_identity(1).unwrap(), loopback()).unwrap();
        let got = client
            .call(addr, 7, b"ping", Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(&got[..], b"echo:ping");

        // The certificate must be the one for the server asked for.
        let wrong = client.call(addr, 8, b"ping", Duration::from_secs(10)).await;
        assert!(wrong.is_err(), "{wrong:?}");

        // A client from another cluster's CA gets nothing.
        let other = KernelCa::generate("other").unwrap();
        let stranger = ControlClient::new(&other.issue_identity(1).unwrap(), loopback()).unwrap();
        let refused = stranger
            .call(addr, 7, b"ping", Duration::from_secs(10))
            .await;
        assert!(refused.is_err(), "{refused:?}");
    }
}
