//! The client's request body as the proxy reads it: bounded in silence, captured for a
//! recording, and held for a retry after Desk's 401 only within the process-wide budget;
//! and the body that goes to Desk (a stream, or the bounded replay buffer).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::budget::{ByteBudget, Reservation};

/// Why the client's body ended before its end.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The client sent nothing for longer than `timeouts.body_read_secs`.
    #[error("the request body stalled for more than {0:?} (timeouts.body_read_secs)")]
    Stalled(Duration),
    /// The client's framing broke: bad chunk encoding, early end, a reset stream.
    #[error("the request body could not be read: {0}")]
    Broken(#[source] hyper::Error),
    /// More bytes than the body's declared length.
    #[error("the request body is longer than its Content-Length")]
    Overlong,
    /// The request was answered (Desk did not answer in time) before its body was all
    /// sent: the rest is not forwarded, so that Desk never acts on a request whose
    /// client was told it failed.
    #[error("the request was answered before its body was sent whole")]
    Abandoned,
}

/// The start of a streamed body (up to a limit) and its whole length, captured as it
/// passes and handed over once, when the body ends or is dropped (no lock on the way).
#[derive(Debug)]
pub struct Captured {
    max: usize,
    done: std::sync::OnceLock<CapturedBody>,
}

/// What [`Captured`] saw of a body.
#[derive(Debug, Clone, Default)]
pub struct CapturedBody {
    /// Its first bytes, up to the limit.
    pub start: Vec<u8>,
    /// Its length, as far as it went.
    pub total: u64,
    /// Whether its end was seen.
    pub complete: bool,
}

impl Captured {
    /// Captures up to `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            done: std::sync::OnceLock::new(),
        }
    }

    /// The most bytes it keeps.
    pub fn max(&self) -> usize {
        self.max
    }

    /// What was seen of the body; nothing if it has neither ended nor been dropped yet.
    pub fn taken(&self) -> CapturedBody {
        self.done.get().cloned().unwrap_or_default()
    }
}

/// A body being captured: its bytes kept by the body itself, given to `into` at the end.
#[derive(Debug)]
struct Capture {
    into: Arc<Captured>,
    seen: CapturedBody,
}

impl Capture {
    fn add(&mut self, data: &[u8]) {
        self.seen.total += data.len() as u64;
        let room = self.into.max.saturating_sub(self.seen.start.len());
        self.seen
            .start
            .extend_from_slice(&data[..data.len().min(room)]);
    }

    fn end(&mut self, complete: bool) {
        self.seen.complete = complete;
        let _ = self.into.done.set(std::mem::take(&mut self.seen));
    }
}

/// How much of a streamed body must go to Desk for it to count as moving: an upload keeps
/// its call at Desk while it moves this much per `timeouts.response_secs` (about 550
/// bytes/s with the default 120 s, near Apache httpd's 500 bytes/s minimum for a body),
/// so that a trickle of a byte now and then cannot hold one of Desk's calls for ever.
pub const MOVED_BYTES: u64 = 64 * 1024;

/// What became of a client body that was handed to the upstream client, which reports
/// only that the request failed, and when a part of it last went to Desk: shared between
/// the body and the request path.
#[derive(Debug)]
pub struct BodyOutcome {
    state: AtomicU8,
    /// When the body started towards Desk.
    started: Instant,
    /// When a part of it last went to Desk (its end included), in milliseconds after
    /// `started`.
    moved_ms: AtomicU64,
}

impl BodyOutcome {
    const STALLED: u8 = 1;
    const BROKEN: u8 = 2;
    const ABANDONED: u8 = 3;

    fn new() -> Self {
        Self {
            state: AtomicU8::new(0),
            started: Instant::now(),
            moved_ms: AtomicU64::new(0),
        }
    }

    fn record(&self, err: &BodyError) {
        let value = match err {
            BodyError::Stalled(_) => Self::STALLED,
            BodyError::Broken(_) | BodyError::Overlong => Self::BROKEN,
            BodyError::Abandoned => Self::ABANDONED,
        };
        self.state.store(value, Ordering::Release);
    }

    /// [`MOVED_BYTES`] of the body went to Desk (hyper asks for more only once it can
    /// write it), or its end did.
    fn moved(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.moved_ms.store(ms, Ordering::Relaxed);
    }

    /// When the last [`MOVED_BYTES`] of the body, or its end, went to Desk (when it
    /// started, if none has): Desk's time to answer runs from there, however long the
    /// upload takes while it moves.
    pub fn last_moved(&self) -> Instant {
        self.started + Duration::from_millis(self.moved_ms.load(Ordering::Relaxed))
    }

    /// The request was answered without Desk's answer: the body ends in an error at its
    /// next read (at the latest when its client's silence passes `body_read_secs`).
    pub fn abandon(&self) {
        self.state.store(Self::ABANDONED, Ordering::Release);
    }

    fn abandoned(&self) -> bool {
        self.state.load(Ordering::Acquire) == Self::ABANDONED
    }

    /// `Some(true)` when the body stalled, `Some(false)` when it broke, `None` when it
    /// did neither.
    pub fn stalled(&self) -> Option<bool> {
        match self.state.load(Ordering::Acquire) {
            Self::STALLED => Some(true),
            Self::BROKEN => Some(false),
            _ => None,
        }
    }
}

/// The client's request body, ended with [`BodyError::Stalled`] when the client stays
/// silent for longer than `silence` while the proxy waits for it. Only the time spent
/// waiting on the client counts: a Desk slow to take the bytes stalls nothing.
#[derive(Debug)]
pub struct ClientBody {
    inner: Incoming,
    silence: Duration,
    /// Armed while a read waits on the client.
    timer: Option<Pin<Box<Sleep>>>,
    waiting: bool,
    outcome: Option<Arc<BodyOutcome>>,
    /// Bytes that went to Desk since `outcome` last heard that the body moved.
    unstamped: u64,
    /// The body's start, for a recording.
    capture: Option<Capture>,
}

impl ClientBody {
    /// The body `inner`, allowed `silence` between two reads.
    pub fn new(inner: Incoming, silence: Duration) -> Self {
        Self {
            inner,
            silence,
            timer: None,
            waiting: false,
            outcome: None,
            unstamped: 0,
            capture: None,
        }
    }

    /// Keeps the body's start as it streams, for `captured` when it ends (a recording).
    pub fn capture_into(&mut self, captured: Arc<Captured>) {
        self.capture = Some(Capture {
            into: captured,
            seen: CapturedBody::default(),
        });
    }

    /// Reports how the body ended to `outcome` (for a body given away to be streamed).
    pub fn report_to(mut self, outcome: Arc<BodyOutcome>) -> Self {
        self.outcome = Some(outcome);
        self
    }

    fn fail(&mut self, err: BodyError) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if let Some(outcome) = &self.outcome {
            outcome.record(&err);
        }
        Poll::Ready(Some(Err(err)))
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if this.outcome.as_deref().is_some_and(BodyOutcome::abandoned) {
            return Poll::Ready(Some(Err(BodyError::Abandoned)));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(err))) => this.fail(BodyError::Broken(err)),
            Poll::Ready(frame) => {
                this.waiting = false;
                if let Some(outcome) = &this.outcome {
                    let len = match &frame {
                        Some(Ok(frame)) => frame.data_ref().map_or(0, Bytes::len),
                        _ => 0,
                    };
                    this.unstamped += len as u64;
                    let ended = frame.is_none() || this.inner.is_end_stream();
                    if this.unstamped >= MOVED_BYTES || ended {
                        this.unstamped = 0;
                        outcome.moved();
                    }
                }
                if let Some(capture) = &mut this.capture {
                    if let Some(Ok(frame)) = &frame
                        && let Some(data) = frame.data_ref()
                    {
                        capture.add(data);
                    }
                    if frame.is_none() || this.inner.is_end_stream() {
                        capture.end(true);
                        this.capture = None;
                    }
                }
                Poll::Ready(frame.map(|f| f.map_err(BodyError::Broken)))
            }
            Poll::Pending => {
                let deadline = Instant::now() + this.silence;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if !this.waiting {
                    this.waiting = true;
                    timer.as_mut().reset(deadline);
                }
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => this.fail(BodyError::Stalled(this.silence)),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ClientBody {
    fn drop(&mut self) {
        // Dropped before its end (Desk answered first, or the request failed).
        if let Some(capture) = &mut self.capture {
            capture.end(false);
        }
    }
}

/// A request body as the request path holds it: read whole when it is small enough to
/// replay after a 401 and fits the process-wide budget, else left to stream.
#[derive(Debug)]
pub enum RequestBody {
    /// Held for a replay; the reservation is given back when this drops.
    Replayable(Bytes, Option<Reservation>),
    /// Streamed to Desk; cannot be replayed.
    Streaming(ClientBody),
}

/// Why a request body must stream rather than be held for a replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamReason {
    /// No length, or longer than `limits.replay_body_bytes`.
    Size,
    /// `limits.buffered_body_bytes` is spent.
    Budget,
}

impl RequestBody {
    /// Reads `body` whole when its length is known, at most `replay_limit`, and the
    /// budget has room for it; otherwise leaves it to stream, saying why.
    pub async fn read(
        body: Incoming,
        silence: Duration,
        replay_limit: u64,
        budget: &Arc<ByteBudget>,
    ) -> Result<(Self, Option<StreamReason>), BodyError> {
        if body.is_end_stream() {
            return Ok((Self::Replayable(Bytes::new(), None), None));
        }
        let body = ClientBody::new(body, silence);
        let Some(len) = body.size_hint().exact().filter(|len| *len <= replay_limit) else {
            return Ok((Self::Streaming(body), Some(StreamReason::Size)));
        };
        let Some(reservation) = budget.reserve(len) else {
            return Ok((Self::Streaming(body), Some(StreamReason::Budget)));
        };
        let bytes = read_exact(body, len).await?;
        Ok((Self::Replayable(bytes, Some(reservation)), None))
    }

    /// The body to send to Desk; what it will tell of a streamed body's end; and a held
    /// body's copy for a replay, which keeps its place in the budget until dropped.
    pub fn into_parts(self) -> (UpstreamBody, Option<Arc<BodyOutcome>>, Option<Replay>) {
        match self {
            Self::Replayable(bytes, reservation) => (
                UpstreamBody::buffered(bytes.clone()),
                None,
                Some(Replay {
                    bytes,
                    _held: reservation,
                }),
            ),
            Self::Streaming(body) => {
                let outcome = Arc::new(BodyOutcome::new());
                (
                    UpstreamBody::Stream(body.report_to(Arc::clone(&outcome))),
                    Some(outcome),
                    None,
                )
            }
        }
    }
}

/// A request body kept for a retry after a 401.
#[derive(Debug)]
pub struct Replay {
    /// The body's bytes.
    pub bytes: Bytes,
    _held: Option<Reservation>,
}

/// Reads a body of a known length into one buffer of that size.
async fn read_exact(mut body: ClientBody, len: u64) -> Result<Bytes, BodyError> {
    use http_body_util::BodyExt;
    // The length is at most limits.replay_body_bytes, and reserved in the budget.
    let mut buffer = BytesMut::with_capacity(usize::try_from(len).unwrap_or(0));
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            if (buffer.len() + data.len()) as u64 > len {
                return Err(BodyError::Overlong);
            }
            buffer.extend_from_slice(&data);
        }
    }
    Ok(buffer.freeze())
}

/// A request body on its way to Desk.
#[derive(Debug)]
pub enum UpstreamBody {
    /// A whole body held for a possible retry after a 401 (taken when sent).
    Buffered(Option<Bytes>),
    /// The client's body, streamed through; cannot be replayed.
    Stream(ClientBody),
}

impl UpstreamBody {
    /// A body of these bytes; empty bytes make an empty body.
    pub fn buffered(bytes: Bytes) -> Self {
        Self::Buffered(Some(bytes).filter(|b| !b.is_empty()))
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
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
