//! Body types: what goes to Desk (a stream, or the bounded replay buffer) and what comes
//! back to the client (a stream that counts its bytes and writes the request's log line
//! when it ends).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::OwnedSemaphorePermit;

use crate::observe::RequestLog;

/// A request body on its way to Desk.
#[derive(Debug)]
pub enum UpstreamBody {
    /// A whole body held for a possible retry after a 401 (taken when sent).
    Buffered(Option<Bytes>),
    /// The client's body, streamed through; cannot be replayed.
    Stream(Incoming),
}

impl UpstreamBody {
    /// A body of these bytes; empty bytes make an empty body.
    pub fn buffered(bytes: Bytes) -> Self {
        Self::Buffered(Some(bytes).filter(|b| !b.is_empty()))
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Self::Buffered(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Self::Stream(incoming) => Pin::new(incoming).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Buffered(bytes) => bytes.is_none(),
            Self::Stream(incoming) => incoming.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Buffered(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            Self::Stream(incoming) => incoming.size_hint(),
        }
    }
}

/// A response body on its way to the client.
#[derive(Debug)]
pub struct ResponseBody {
    inner: Inner,
    log: Option<RequestLog>,
    /// The upstream slot (`limits.max_upstream_requests`) taken while Desk's body streams.
    _slot: Option<OwnedSemaphorePermit>,
}

#[derive(Debug)]
enum Inner {
    Full(Option<Bytes>),
    Stream(Incoming),
}

impl ResponseBody {
    /// A body of these bytes (the proxy's own answers, or a 401 that was read).
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes: Bytes = bytes.into();
        Self {
            inner: Inner::Full(Some(bytes).filter(|b| !b.is_empty())),
            log: None,
            _slot: None,
        }
    }

    /// Desk's body, streamed, holding its upstream slot until dropped.
    pub fn stream(incoming: Incoming, slot: OwnedSemaphorePermit) -> Self {
        Self {
            inner: Inner::Stream(incoming),
            log: None,
            _slot: Some(slot),
        }
    }

    /// Attaches the request's log record, written when the body ends or is dropped.
    pub fn with_log(mut self, log: RequestLog) -> Self {
        self.log = Some(log);
        self
    }
}

impl From<Bytes> for ResponseBody {
    fn from(bytes: Bytes) -> Self {
        Self::full(bytes)
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = match &mut this.inner {
            Inner::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Inner::Stream(incoming) => Pin::new(incoming).poll_frame(cx),
        };
        let ended = matches!(polled, Poll::Ready(Some(Ok(_)))) && this.is_end_stream();
        if let Some(log) = &mut this.log {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        log.add_bytes(data.len() as u64);
                    }
                    // hyper stops polling once the size hint says the body is done.
                    if ended {
                        log.mark_complete();
                    }
                }
                Poll::Ready(Some(Err(_))) => log.mark_body_error(),
                Poll::Ready(None) => log.mark_complete(),
                Poll::Pending => {}
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Full(bytes) => bytes.is_none(),
            Inner::Stream(incoming) => incoming.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            Inner::Stream(incoming) => incoming.size_hint(),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // Bodies hyper never had to poll (empty, HEAD, 204, 304) were complete all along.
        if self.is_end_stream()
            && let Some(log) = &mut self.log
        {
            log.mark_complete();
        }
    }
}
