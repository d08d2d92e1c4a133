//! Connection limits: at most `LOGD_MAX_CONNECTIONS` connections, each
//! bringing its first request within `LOGD_HANDSHAKE_TIMEOUT_MS`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Semaphore;

/// Accepted connections bounded by a semaphore (LOGD_MAX_CONNECTIONS); each
/// must bring its first request (TLS and HTTP/2 handshakes included) within
/// `handshake_timeout` (LOGD_HANDSHAKE_TIMEOUT_MS) or it is closed and its
/// slot freed: idle sockets cannot hold every slot.
pub(crate) fn limited_incoming(
    listener: tokio::net::TcpListener,
    max: usize,
    handshake_timeout: Duration,
    timeouts: prometheus::IntCounter,
) -> impl tokio_stream::Stream<Item = std::io::Result<LimitedConn>> {
    let slots = Arc::new(Semaphore::new(max));
    futures::stream::unfold((listener, slots), move |(listener, slots)| {
        let timeouts = timeouts.clone();
        async move {
            let permit = slots.clone().acquire_owned().await.expect("never closed");
            let res = listener.accept().await.map(|(stream, _)| {
                let _ = stream.set_nodelay(true);
                LimitedConn {
                    stream,
                    _permit: permit,
                    handshake: Some(Box::pin(tokio::time::sleep(handshake_timeout))),
                    handshake_timeout,
                    served: Arc::new(AtomicBool::new(false)),
                    timeouts,
                }
            });
            Some((res, (listener, slots)))
        }
    })
}

/// A TCP connection holding one of the connection slots until dropped.
pub struct LimitedConn {
    stream: tokio::net::TcpStream,
    _permit: tokio::sync::OwnedSemaphorePermit,
    /// Armed until the connection's first request passed the interceptor.
    handshake: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    handshake_timeout: Duration,
    served: Arc<AtomicBool>,
    timeouts: prometheus::IntCounter,
}

/// What the services learn of a connection: its TCP info, and the flag that
/// ends its handshake timeout.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// Addresses.
    #[allow(dead_code)] // for handlers that want the peer; none reads it yet
    pub tcp: tonic::transport::server::TcpConnectInfo,
    served: Arc<AtomicBool>,
}

impl ConnInfo {
    /// The connection a request came on (plaintext or TLS).
    pub(crate) fn of<T>(req: &tonic::Request<T>) -> Option<&ConnInfo> {
        let ext = req.extensions();
        ext.get::<ConnInfo>().or_else(|| {
            ext.get::<tonic::transport::server::TlsConnectInfo<ConnInfo>>()
                .map(|t| t.get_ref())
        })
    }

    /// The connection brought a request: no handshake timeout any more.
    pub(crate) fn mark_served(&self) {
        self.served.store(true, Ordering::Relaxed);
    }
}

impl tokio::io::AsyncRead for LimitedConn {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some(deadline) = this.handshake.as_mut() {
            if this.served.load(Ordering::Relaxed) {
                this.handshake = None;
            } else if deadline.as_mut().poll(cx).is_ready() {
                this.handshake = None;
                this.timeouts.inc();
                // Dropping the connection (hyper does on a read error)
                // frees its slot.
                return std::task::Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no request within LOGD_HANDSHAKE_TIMEOUT_MS ({} ms) of accepting the connection; closed",
                        this.handshake_timeout.as_millis()
                    ),
                )));
            }
        }
        std::pin::Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for LimitedConn {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for LimitedConn {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        ConnInfo {
            tcp: self.stream.connect_info(),
            served: self.served.clone(),
        }
    }
}
