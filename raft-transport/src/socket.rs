//! The UDP socket under a replica's quinn endpoint, with a signal for when the OS has it back.
//!
//! quinn closes the socket only once its endpoint driver, every connection driver and every
//! write poller have dropped it, which happens on runtime threads some time after the last
//! `Endpoint` handle is gone. A replica restarted on the same address must not race that, so
//! [`ReplicaNode::shutdown`](crate::ReplicaNode::shutdown) waits on [`Released`].

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, Runtime, UdpPoller};

/// Resolves once the socket it was made with has been closed.
pub(crate) struct Released(tokio::sync::watch::Receiver<bool>);

impl Released {
    pub(crate) async fn wait(mut self) {
        // The sender is dropped together with the socket; either way it is gone.
        let _closed = self.0.wait_for(|closed| *closed).await;
    }
}

/// Sends `true` when dropped.
struct DropSignal(tokio::sync::watch::Sender<bool>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        self.0.send_replace(true);
    }
}

/// quinn's tokio socket, unchanged but for the drop signal. Pollers hold the wrapper, not the
/// inner socket, so the wrapper (and its signal) drops last.
pub(crate) struct TrackedSocket {
    // Field order matters: the inner socket closes before the signal fires.
    inner: Arc<dyn AsyncUdpSocket>,
    _signal: DropSignal,
}

impl TrackedSocket {
    pub(crate) fn wrap(socket: std::net::UdpSocket) -> io::Result<(Arc<Self>, Released)> {
        let inner = quinn::TokioRuntime.wrap_udp_socket(socket)?;
        let (tx, rx) = tokio::sync::watch::channel(false);
        let socket = Arc::new(Self {
            inner,
            _signal: DropSignal(tx),
        });
        Ok((socket, Released(rx)))
    }
}

impl fmt::Debug for TrackedSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

struct TrackedPoller {
    inner: Pin<Box<dyn UdpPoller>>,
    _socket: Arc<TrackedSocket>,
}

impl fmt::Debug for TrackedPoller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

impl UdpPoller for TrackedPoller {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        self.get_mut().inner.as_mut().poll_writable(cx)
    }
}

impl AsyncUdpSocket for TrackedSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(TrackedPoller {
            inner: self.inner.clone().create_io_poller(),
            _socket: self,
        })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}
