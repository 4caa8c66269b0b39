//! Body types: the client's body as the proxy reads it (bounded in silence, and held for a
//! 401 retry only within the process-wide budget), what goes to Desk (a stream, or the
//! bounded replay buffer) and what comes back to the client (a stream that counts its
//! bytes and writes the request's log line when it ends).

use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::budget::{ByteBudget, Reservation};
use crate::concurrency::UpstreamSlot;
use crate::connection::{Progress, StreamGuard, Watched};
use crate::observe::RequestLog;

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
}

/// Something that sees an answer's bytes on their way to the client, and its end (a
/// recording of the exchange).
pub trait Tap: Send + std::fmt::Debug {
    /// A chunk of the body went to the client.
    fn data(&mut self, data: &Bytes);
    /// The body ended: whole, or cut (an error, or the client went away).
    fn end(self: Box<Self>, complete: bool);
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

/// What became of a client body that was handed to the upstream client, which reports
/// only that the request failed: shared between the body and the request path.
#[derive(Debug, Default)]
pub struct BodyOutcome(AtomicU8);

impl BodyOutcome {
    const STALLED: u8 = 1;
    const BROKEN: u8 = 2;

    fn record(&self, err: &BodyError) {
        let value = match err {
            BodyError::Stalled(_) => Self::STALLED,
            BodyError::Broken(_) | BodyError::Overlong => Self::BROKEN,
        };
        self.0.store(value, Ordering::Release);
    }

    /// `Some(true)` when the body stalled, `Some(false)` when it broke, `None` when it
    /// did neither.
    pub fn stalled(&self) -> Option<bool> {
        match self.0.load(Ordering::Acquire) {
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
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(err))) => this.fail(BodyError::Broken(err)),
            Poll::Ready(frame) => {
                this.waiting = false;
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
                let outcome = Arc::new(BodyOutcome::default());
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

/// Desk's answer body, read through the serving thread's connection pool.
pub type DeskBody = crate::pool::PooledBody<UpstreamBody>;

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

/// Why an answer's body ended before its end.
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    /// Desk's body broke off.
    #[error("Desk's answer broke off: {0}")]
    Desk(#[source] hyper::Error),
    /// Its client took none of it for longer than `timeouts.body_read_secs`, and the
    /// proxy let go of Desk's call.
    #[error("the client took none of the answer for longer than timeouts.body_read_secs")]
    Stalled,
}

/// A response body on its way to the client.
#[derive(Debug)]
pub struct ResponseBody {
    inner: Inner,
    log: Option<RequestLog>,
    /// The request's place at Desk, taken while Desk's body streams.
    slot: Option<UpstreamSlot>,
    /// A recording of the exchange, told of the body as it goes.
    tap: Option<Box<dyn Tap>>,
    /// The request counts as open on its connection until its answer is done.
    stream: Option<StreamGuard>,
    /// A part of the body went to hyper, and the next was not asked for yet: its client
    /// has not taken it (told to the connection, which bounds how long that may last).
    waiting: bool,
}

#[derive(Debug)]
enum Inner {
    Full(Option<Bytes>),
    Stream(DeskBody),
    /// Desk's body once it waited for its client, watched by the connection.
    Watched(Arc<WatchedDesk>),
}

/// Desk's body and the request's place at Desk, shared with the client's connection once
/// the answer has waited for its client: the connection takes them away (closing Desk's
/// connection and freeing the place) when the client takes none of the answer for
/// `timeouts.body_read_secs`. `None` once taken. The lock is taken once per part of such
/// an answer, by its own poll, and by the connection's look every `header_read_secs`.
#[derive(Debug)]
struct WatchedDesk {
    progress: Progress,
    desk: Mutex<Option<(DeskBody, Option<UpstreamSlot>)>>,
}

impl WatchedDesk {
    fn desk(&self) -> MutexGuard<'_, Option<(DeskBody, Option<UpstreamSlot>)>> {
        self.desk.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Watched for WatchedDesk {
    fn progress(&self) -> &Progress {
        &self.progress
    }

    fn cut(&self) {
        let held = self.desk().take();
        drop(held);
    }
}

impl ResponseBody {
    /// A body of these bytes (the proxy's own answers, or a 401 that was read).
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes: Bytes = bytes.into();
        Self {
            inner: Inner::Full(Some(bytes).filter(|b| !b.is_empty())),
            log: None,
            slot: None,
            tap: None,
            stream: None,
            waiting: false,
        }
    }

    /// Desk's body, streamed, holding its upstream slot until dropped.
    pub fn stream(incoming: DeskBody, slot: UpstreamSlot) -> Self {
        Self {
            inner: Inner::Stream(incoming),
            log: None,
            slot: Some(slot),
            tap: None,
            stream: None,
            waiting: false,
        }
    }

    /// Attaches the request's log record, written when the body ends or is dropped.
    pub fn log_to(&mut self, log: RequestLog) {
        self.log = Some(log);
    }

    /// Tells `tap` of the body as it goes to the client, and of its end.
    pub fn tap(&mut self, tap: Box<dyn Tap>) {
        self.tap = Some(tap);
    }

    /// Keeps the request open on its connection until the body ends or is dropped.
    pub fn hold_stream(&mut self, stream: StreamGuard) {
        self.stream = Some(stream);
    }

    /// The watched answer's progress, once it is watched.
    fn progress(&self) -> Option<&Progress> {
        match &self.inner {
            Inner::Watched(watched) => Some(&watched.progress),
            _ => None,
        }
    }

    /// The part that waited for the client was taken (asked for the next, or the body
    /// is done with): the connection is told.
    fn stop_waiting(&mut self) {
        if self.waiting
            && let Some(stream) = &self.stream
        {
            self.waiting = false;
            stream.answer_taken(self.progress());
        }
    }

    /// A part was handed over and more is to come: it waits for its client to take it.
    /// Desk's body is put under the connection's watch the first time.
    fn start_waiting(&mut self) {
        let Some(stream) = &self.stream else {
            return;
        };
        self.inner = match std::mem::replace(&mut self.inner, Inner::Full(None)) {
            Inner::Stream(desk) => {
                let watched = Arc::new(WatchedDesk {
                    progress: Progress::default(),
                    desk: Mutex::new(Some((desk, self.slot.take()))),
                });
                let answer: Arc<dyn Watched> = Arc::clone(&watched) as Arc<dyn Watched>;
                stream.watch(Arc::downgrade(&answer));
                Inner::Watched(watched)
            }
            inner => inner,
        };
        self.waiting = true;
        stream.answer_waits(self.progress());
    }
}

impl From<Bytes> for ResponseBody {
    fn from(bytes: Bytes) -> Self {
        Self::full(bytes)
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = AnswerError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, AnswerError>>> {
        let this = self.get_mut();
        this.stop_waiting();
        let polled = match &mut this.inner {
            Inner::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Inner::Stream(incoming) => desk_frame(Pin::new(incoming).poll_frame(cx)),
            Inner::Watched(watched) => match &mut *watched.desk() {
                Some((incoming, _)) => desk_frame(Pin::new(incoming).poll_frame(cx)),
                None => Poll::Ready(Some(Err(AnswerError::Stalled))),
            },
        };
        // Trailers end a body, whatever its size hint still says.
        let ended = match &polled {
            Poll::Ready(Some(Ok(frame))) => frame.is_trailers() || this.is_end_stream(),
            _ => false,
        };
        // A part handed over, more to come: it waits for its client to take it. (A whole
        // small answer in one part never waits.)
        if matches!(polled, Poll::Ready(Some(Ok(_)))) && !ended {
            this.start_waiting();
        }
        if let Some(tap) = &mut this.tap {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        tap.data(data);
                    }
                    if ended && let Some(tap) = this.tap.take() {
                        tap.end(true);
                    }
                }
                Poll::Ready(Some(Err(_))) => {
                    if let Some(tap) = this.tap.take() {
                        tap.end(false);
                    }
                }
                Poll::Ready(None) => {
                    if let Some(tap) = this.tap.take() {
                        tap.end(true);
                    }
                }
                Poll::Pending => {}
            }
        }
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
            // Cut: it ends in an error, never as if whole.
            Inner::Watched(watched) => watched
                .desk()
                .as_ref()
                .is_some_and(|(incoming, _)| incoming.is_end_stream()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            Inner::Stream(incoming) => incoming.size_hint(),
            Inner::Watched(watched) => watched
                .desk()
                .as_ref()
                .map_or_else(SizeHint::default, |(incoming, _)| incoming.size_hint()),
        }
    }
}

/// A frame of Desk's body, its error as the answer's.
fn desk_frame(
    polled: Poll<Option<Result<Frame<Bytes>, hyper::Error>>>,
) -> Poll<Option<Result<Frame<Bytes>, AnswerError>>> {
    polled.map(|frame| frame.map(|result| result.map_err(AnswerError::Desk)))
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        self.stop_waiting();
        if let Some(tap) = self.tap.take() {
            tap.end(self.is_end_stream());
        }
        // Bodies hyper never had to poll (empty, HEAD, 204, 304) were complete all along.
        if self.is_end_stream()
            && let Some(log) = &mut self.log
        {
            log.mark_complete();
        }
    }
}
