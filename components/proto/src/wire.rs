//! TCP streams for the gRPC transport that send each burst of HTTP/2 frames in
//! one `write`.
//!
//! Under tonic, h2 sends a DATA frame of 256 bytes or more straight from the
//! message when the socket takes vectored writes, and has to write it out
//! before it can queue another frame. So a unary response left in two writes
//! (headers and message, then the trailers) and a request in three (window
//! updates, headers and message, then the end of the stream), each one waking
//! the peer; and the trailers of a reply could wait behind other work of a busy
//! master while the caller could not finish without them. A [`Gathered`] stream
//! reports that it takes no vectored writes, so h2 copies frames under 1 KiB into
//! its own buffer, and it holds what h2 writes until h2 flushes: then it goes out
//! in one write.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_stream::{Stream, StreamExt};

/// Bytes held until a flush; a write that would pass this sends what is held
/// first, and a larger one goes straight through.
const HOLD: usize = 64 * 1024;

/// A stream whose writes are held until it is flushed (or `HOLD` fills).
pub struct Gathered<T> {
    io: T,
    held: Vec<u8>,
    /// How much of `held` has been written already.
    sent: usize,
}

impl<T> Gathered<T> {
    pub fn new(io: T) -> Self {
        Self {
            io,
            held: Vec::new(),
            sent: 0,
        }
    }
}

impl<T: AsyncWrite + Unpin> Gathered<T> {
    /// Write out everything held.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.held.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.held[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.held.clear();
        self.sent = 0;
        if self.held.capacity() > 4 * HOLD {
            self.held.shrink_to(HOLD);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Gathered<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Gathered<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if me.held.len() + buf.len() > HOLD {
            ready!(me.poll_send(cx))?;
            if buf.len() > HOLD {
                return Pin::new(&mut me.io).poll_write(cx, buf);
            }
        }
        me.held.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        ready!(me.poll_send(cx))?;
        Pin::new(&mut me.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        ready!(me.poll_send(cx))?;
        Pin::new(&mut me.io).poll_shutdown(cx)
    }

    /// No: h2 then copies small frames into its buffer instead of writing each
    /// message on its own (see the module's documentation).
    fn is_write_vectored(&self) -> bool {
        false
    }
}

impl tonic::transport::server::Connected for Gathered<TcpStream> {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// The connections a gRPC server accepts on `addr` (without Nagle's delay), for
/// `tonic::transport::Server::serve_with_incoming`.
pub fn incoming(
    addr: SocketAddr,
) -> io::Result<impl Stream<Item = io::Result<Gathered<TcpStream>>>> {
    Ok(tonic::transport::server::TcpIncoming::bind(addr)?
        .with_nodelay(Some(true))
        .map(|conn| conn.map(Gathered::new)))
}

/// Connects a tonic `Endpoint` (`connect_with_connector_lazy`) over TCP without
/// Nagle's delay.
pub fn connector() -> impl tower::Service<
    http::Uri,
    Response = hyper_util::rt::TokioIo<Gathered<TcpStream>>,
    Error = io::Error,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    tower::service_fn(|uri: http::Uri| async move {
        let host = uri
            .host()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{uri}: no host")))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(80);
        let s = TcpStream::connect((host.as_str(), port)).await?;
        s.set_nodelay(true)?;
        Ok(hyper_util::rt::TokioIo::new(Gathered::new(s)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn holds_writes_until_flushed() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut g = Gathered::new(a);
        // So h2 copies small frames into its buffer rather than flushing each.
        assert!(!g.is_write_vectored());
        g.write_all(b"headers").await.unwrap();
        g.write_all(b"+message").await.unwrap();
        // Nothing reached the peer yet.
        let mut buf = [0u8; 64];
        let early =
            tokio::time::timeout(std::time::Duration::from_millis(50), b.read(&mut buf)).await;
        assert!(early.is_err(), "bytes left before the flush");
        g.flush().await.unwrap();
        let n = b.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"headers+message");
    }

    #[tokio::test]
    async fn large_writes_and_a_slow_peer_lose_nothing() {
        // A pipe far smaller than what is written: every write must wait for the reader.
        let (a, mut b) = tokio::io::duplex(4096);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut g = Gathered::new(a);
        let mut want = Vec::new();
        for i in 0..200u32 {
            // Small frames, then one over HOLD now and then.
            let len = if i % 50 == 49 {
                HOLD + 1000
            } else {
                37 + (i as usize * 131) % 3000
            };
            let chunk: Vec<u8> = (0..len).map(|j| (i as usize + j) as u8).collect();
            g.write_all(&chunk).await.unwrap();
            want.extend_from_slice(&chunk);
            if i % 7 == 0 {
                g.flush().await.unwrap();
            }
        }
        g.shutdown().await.unwrap();
        drop(g);
        assert_eq!(reader.await.unwrap(), want);
    }
}
