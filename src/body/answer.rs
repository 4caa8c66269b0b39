//! An answer on its way to the client: Desk's body streamed (or the proxy's own bytes),
//! its bytes counted for the request's log line, told to a recording's [`Tap`], and,
//! once a part of it waits for the client, watched by the client's connection, which
//! takes Desk's call away from an answer whose client takes none of it (README "Limits").

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::request::UpstreamBody;
use crate::concurrency::UpstreamSlot;
use crate::connection::{Progress, StreamGuard, Watched};
use crate::observe::RequestLog;

/// Something that sees an answer's bytes on their way to the client, and its end (a
/// recording of the exchange).
pub trait Tap: Send + std::fmt::Debug {
    /// A chunk of the body went to the client.
    fn data(&mut self, data: &Bytes);
    /// The body ended: whole, or cut (an error, or the client went away).
    fn end(self: Box<Self>, complete: bool);
}

/// Desk's answer body, read through the serving thread's connection pool.
pub type DeskBody = crate::pool::PooledBody<UpstreamBody>;

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
    /// Desk sent nothing of its answer for longer than `timeouts.response_secs` while its
    /// client waited for more, and the proxy let go of Desk's call.
    #[error("Zoho Desk sent nothing of its answer for longer than timeouts.response_secs")]
    DeskSilent,
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
    /// How long Desk may send nothing while the client waits for more (Desk's body only).
    silence: Option<Silence>,
}

#[derive(Debug)]
enum Inner {
    Full(Option<Bytes>),
    Stream(DeskBody),
    /// Desk's body once it waited for its client, watched by the connection.
    Watched(Arc<WatchedDesk>),
    /// Desk's body let go of after Desk's silence: never whole.
    Dropped,
}

/// The bound on Desk's silence inside its answer: armed the first time Desk has nothing
/// more when the client asks, and looked at only when it fires (the parts since it was
/// armed are counted, never timed, so a part costs no clock read). A part just after it
/// was armed earns a whole new `limit`: Desk is cut after between once and twice `limit`
/// of silence.
#[derive(Debug)]
struct Silence {
    limit: std::time::Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    parts: u64,
    parts_when_armed: u64,
}

impl Silence {
    /// Whether Desk has sent nothing for `limit` (checked while it has nothing more).
    fn over(&mut self, cx: &mut Context<'_>) -> bool {
        let parts = self.parts;
        let limit = self.limit;
        let mut armed = false;
        let timer = self.timer.get_or_insert_with(|| {
            armed = true;
            Box::pin(tokio::time::sleep(limit))
        });
        if armed {
            self.parts_when_armed = parts;
        }
        if timer.as_mut().poll(cx).is_pending() {
            return false;
        }
        if parts == self.parts_when_armed {
            return true;
        }
        // Parts came since it was armed: the silence starts now.
        self.parts_when_armed = parts;
        timer.as_mut().reset(tokio::time::Instant::now() + limit);
        let _ = timer.as_mut().poll(cx);
        false
    }
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
            silence: None,
        }
    }

    /// Desk's body, streamed, holding its upstream slot until dropped, or until Desk
    /// sends nothing of it for `silence` while the client waits for more.
    pub fn stream(incoming: DeskBody, slot: UpstreamSlot, silence: std::time::Duration) -> Self {
        Self {
            inner: Inner::Stream(incoming),
            log: None,
            slot: Some(slot),
            tap: None,
            stream: None,
            silence: Some(Silence {
                limit: silence,
                timer: None,
                parts: 0,
                parts_when_armed: 0,
            }),
        }
    }

    /// Lets go of Desk's body and its call (Desk stayed silent): the answer ends in an
    /// error.
    fn drop_desk(&mut self) {
        match std::mem::replace(&mut self.inner, Inner::Dropped) {
            Inner::Watched(watched) => watched.cut(),
            other => drop(other),
        }
        self.slot = None;
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

    /// The part that waited for the client (a part of a watched answer handed to hyper,
    /// the next not asked for yet) was taken (asked for the next, or the body is done
    /// with): the connection is told.
    fn stop_waiting(&mut self) {
        if let (Some(stream), Inner::Watched(watched)) = (&self.stream, &self.inner)
            && watched.progress.waiting()
        {
            stream.answer_taken(&watched.progress);
        }
    }

    /// A part was handed over and more is to come: it waits for its client to take it.
    /// Desk's body is put under the connection's watch the first time.
    fn start_waiting(&mut self) {
        let Some(stream) = &self.stream else {
            return;
        };
        if matches!(self.inner, Inner::Stream(_))
            && let Inner::Stream(desk) = std::mem::replace(&mut self.inner, Inner::Full(None))
        {
            let watched = Arc::new(WatchedDesk {
                progress: Progress::default(),
                desk: Mutex::new(Some((desk, self.slot.take()))),
            });
            let answer: Arc<dyn Watched> = Arc::clone(&watched) as Arc<dyn Watched>;
            stream.watch(Arc::downgrade(&answer));
            self.inner = Inner::Watched(watched);
        }
        if let Inner::Watched(watched) = &self.inner {
            stream.answer_waits(&watched.progress);
        }
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
        let mut polled = match &mut this.inner {
            Inner::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Inner::Stream(incoming) => desk_frame(Pin::new(incoming).poll_frame(cx)),
            Inner::Watched(watched) => match &mut *watched.desk() {
                Some((incoming, _)) => desk_frame(Pin::new(incoming).poll_frame(cx)),
                None => Poll::Ready(Some(Err(AnswerError::Stalled))),
            },
            Inner::Dropped => Poll::Ready(Some(Err(AnswerError::DeskSilent))),
        };
        if let Some(silence) = &mut this.silence {
            match &polled {
                Poll::Ready(Some(Ok(_))) => silence.parts += 1,
                Poll::Pending if silence.over(cx) => {
                    this.drop_desk();
                    polled = Poll::Ready(Some(Err(AnswerError::DeskSilent)));
                }
                _ => {}
            }
        }
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
                // Desk's body broke or went silent; a stalled client's answer is only
                // incomplete.
                Poll::Ready(Some(Err(AnswerError::Desk(_) | AnswerError::DeskSilent))) => {
                    log.mark_body_error()
                }
                Poll::Ready(Some(Err(AnswerError::Stalled))) => {}
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
            Inner::Dropped => false,
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
            Inner::Dropped => SizeHint::default(),
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
