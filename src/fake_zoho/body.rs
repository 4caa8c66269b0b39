//! Response bodies of the fake servers (streamed and complete) and
//! request-body helpers.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::time::Sleep;

use super::RespBody;

/// Size of each generated chunk.
pub(super) const CHUNK: usize = 64 * 1024;
/// Period of the download pattern: byte `i` is `(i % 251) as u8`.
const PERIOD: usize = 251;

/// `CHUNK + PERIOD` bytes of the pattern starting at 0, shared by all bodies.
fn pattern() -> Bytes {
    static PATTERN: OnceLock<Bytes> = OnceLock::new();
    PATTERN
        .get_or_init(|| {
            (0..CHUNK + PERIOD)
                .map(|i| (i % PERIOD) as u8)
                .collect::<Vec<u8>>()
                .into()
        })
        .clone()
}

/// Streams `len` bytes of the pattern `(i % 251) as u8` in 64 KiB chunks,
/// without ever holding more than one chunk.
pub(super) struct PatternBody {
    offset: u64,
    remaining: u64,
    pattern: Bytes,
}

impl PatternBody {
    /// A body of exactly `len` bytes.
    pub(super) fn new(len: u64) -> Self {
        PatternBody {
            offset: 0,
            remaining: len,
            pattern: pattern(),
        }
    }
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        // Both values are bounded by CHUNK / PERIOD, so the casts are lossless.
        let n = self.remaining.min(CHUNK as u64) as usize;
        let start = (self.offset % PERIOD as u64) as usize;
        let chunk = self.pattern.slice(start..start + n);
        self.offset += n as u64;
        self.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// Sends nothing for a while, then one chunk, then ends.
pub(super) struct SlowBody {
    sleep: Pin<Box<Sleep>>,
    chunk: Option<Bytes>,
}

impl SlowBody {
    /// A body that yields `chunk` after `delay`.
    pub(super) fn new(delay: Duration, chunk: Bytes) -> Self {
        SlowBody {
            sleep: Box::pin(tokio::time::sleep(delay)),
            chunk: Some(chunk),
        }
    }
}

impl Body for SlowBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if self.chunk.is_none() {
            return Poll::Ready(None);
        }
        ready!(self.sleep.as_mut().poll(cx));
        Poll::Ready(self.chunk.take().map(|c| Ok(Frame::data(c))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunk.is_none()
    }
}

/// A complete (non-streamed) response body.
pub(super) fn full(bytes: impl Into<Bytes>) -> RespBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Reads a request body frame by frame. Counts every byte; keeps the bytes only
/// while the total stays within `keep` (else returns `None` for the content).
pub(super) async fn read_body(mut body: Incoming, keep: usize) -> io::Result<(u64, Option<Bytes>)> {
    let mut total: u64 = 0;
    let mut buf = Some(BytesMut::new());
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(io::Error::other)?;
        if let Ok(data) = frame.into_data() {
            total += data.len() as u64;
            if total > keep as u64 {
                buf = None;
            } else if let Some(b) = buf.as_mut() {
                b.extend_from_slice(&data);
            }
        }
    }
    Ok((total, buf.map(BytesMut::freeze)))
}

/// Parses `application/x-www-form-urlencoded` (or a query string) into pairs.
pub(super) fn parse_form(input: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(input)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}
