//! Telling HTTP/1.1 from h2c on a fresh connection.
//!
//! The bytes read to decide are handed back to hyper together with whatever the socket
//! already holds after them, so that hyper's first read sees the whole request head.
//! hyper-util's `auto` builder hands back only the sniffed bytes: hyper then reads again
//! into a buffer that already holds them, and its read buffer doubles to 16 KiB for the
//! life of every connection (README "Performance").

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// What a client sends first on an h2c connection with prior knowledge (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http1,
    Http2,
}

/// Reads until the first bytes tell the version: the h2c preface is HTTP/2, anything
/// else (including a connection closed at once) is HTTP/1.1, whose parser will judge it.
pub async fn detect<IO>(mut io: IO) -> io::Result<(Version, Prefixed<IO>)>
where
    IO: AsyncRead + Unpin,
{
    let mut prefix = [0u8; H2_PREFACE.len()];
    let mut filled = 0;
    let version = loop {
        let n = io.read(&mut prefix[filled..]).await?;
        let read = filled..filled + n;
        filled += n;
        if n == 0 || prefix[read.clone()] != H2_PREFACE[read] {
            break Version::Http1;
        }
        if filled == H2_PREFACE.len() {
            break Version::Http2;
        }
    };
    Ok((
        version,
        Prefixed {
            prefix,
            start: 0,
            end: filled,
            io,
        },
    ))
}

/// An IO that first yields the bytes read by [`detect`], followed in the same read by
/// whatever the socket has ready.
#[derive(Debug)]
pub struct Prefixed<IO> {
    prefix: [u8; H2_PREFACE.len()],
    start: usize,
    end: usize,
    io: IO,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.start == this.end {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let n = (this.end - this.start).min(buf.remaining());
        buf.put_slice(&this.prefix[this.start..this.start + n]);
        this.start += n;
        if this.start == this.end && buf.remaining() > 0 {
            // Whatever is ready now joins the prefix. Not ready: the prefix alone is this
            // read's answer. An error: the prefix is still good, and the socket reports
            // the error again (or end of stream) on the next read.
            let _ = Pin::new(&mut this.io).poll_read(cx, buf);
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn detected(chunks: &[&[u8]]) -> (Version, Vec<u8>) {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        for chunk in chunks {
            client.write_all(chunk).await.unwrap();
        }
        drop(client);
        let (version, mut io) = detect(server).await.unwrap();
        let mut all = Vec::new();
        io.read_to_end(&mut all).await.unwrap();
        (version, all)
    }

    #[tokio::test]
    async fn versions_are_told_apart_and_no_byte_is_lost() {
        let get = b"GET /api/v1/tickets HTTP/1.1\r\nHost: x\r\n\r\n".as_slice();
        let h2 = [H2_PREFACE.as_slice(), b"\0\0\0\x04\0\0\0\0\0"].concat();
        let cases: Vec<(Vec<&[u8]>, Version)> = vec![
            (vec![get], Version::Http1),
            (vec![b"G", b"ET / HTTP/1.1\r\n\r\n"], Version::Http1),
            // Starts like the preface, then is not.
            (vec![b"PRI * HTTP/1.1\r\n\r\n"], Version::Http1),
            (vec![&h2], Version::Http2),
            (
                vec![b"PRI * HT", b"TP/2.0\r\n\r\nSM\r\n\r\n"],
                Version::Http2,
            ),
            (vec![b""], Version::Http1),
        ];
        for (chunks, version) in cases {
            let sent: Vec<u8> = chunks.concat();
            assert_eq!(detected(&chunks).await, (version, sent), "{chunks:?}");
        }
    }

    #[tokio::test]
    async fn the_first_read_after_detection_returns_the_whole_head() {
        let head = b"GET /api/v1/tickets HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
        let (mut client, server) = tokio::io::duplex(1 << 16);
        client.write_all(head).await.unwrap();
        let (version, mut io) = detect(server).await.unwrap();
        assert_eq!(version, Version::Http1);
        let mut buf = vec![0u8; 8192];
        let n = io.read(&mut buf).await.unwrap();
        assert_eq!(
            &buf[..n],
            head.as_slice(),
            "one read, prefix and rest together"
        );
    }
}
