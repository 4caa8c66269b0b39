//! What one client connection shares with the requests it carries: how many are open and
//! since when none is (an HTTP/2 connection with none open is idle, and closed like an
//! idle HTTP/1 one), a way to have the connection closed after its answers, and a gate
//! that keeps a client's half-close from cancelling the proxy's own answers.
//!
//! A request touches only atomics here: no lock, no timer, no wake-up of the connection's
//! task (its idle timer re-reads the state when it fires). An answer that streams in
//! parts and once waited for its client is also put on the connection's list of
//! [`Watched`] answers (one lock, once per such answer), so that the connection can make
//! one whose client takes none of it let go of Desk while the connection's other
//! answers go on (an HTTP/2 client can shut one stream's window and keep the others
//! moving).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The state of one client connection.
#[derive(Debug)]
pub struct ConnectionState {
    /// Requests whose answer is not done yet.
    open: AtomicUsize,
    /// Requests answered by the proxy itself, which a half-close must not cancel.
    local: AtomicUsize,
    /// The connection's reader, parked on an end of stream held back for them.
    reader: AtomicWaker,
    /// A close was asked for (by a request, or by the worker stopping).
    close: AtomicBool,
    /// The connection's task, woken when a close is asked for.
    task: AtomicWaker,
    born: Instant,
    /// When the last open request ended, in milliseconds since `born`.
    idle_since_ms: AtomicU64,
    /// The last write to the client could not complete: answer bytes wait in hyper's
    /// buffer for a client that does not read.
    output_blocked: AtomicBool,
    /// Answers that handed hyper a part of their body and wait to be asked for the next:
    /// their client has not taken that part yet.
    answers_waiting: AtomicUsize,
    /// How many times such an answer was asked for its next part, and how many answers
    /// ended: a count that moves while the connection's clients take their answers.
    answers_taken: AtomicU64,
    /// The answers that stream in parts and once waited for their client, with what the
    /// connection saw of them at its last look.
    watched: Mutex<Vec<Look>>,
}

/// An answer that streams in parts, as its connection watches it.
pub trait Watched: Send + Sync {
    /// How far its client has taken it.
    fn progress(&self) -> &Progress;

    /// Lets go of what the answer holds at Desk (its call, its connection); the answer
    /// then ends in an error when its client asks for more.
    fn cut(&self);
}

/// How far a client has taken an answer that streams in parts.
#[derive(Debug, Default)]
pub struct Progress {
    /// A part was handed to hyper and the next was not asked for yet.
    waiting: AtomicBool,
    /// How many parts were taken.
    taken: AtomicU64,
}

impl Progress {
    /// Whether a part waits for the client.
    pub fn waiting(&self) -> bool {
        self.waiting.load(Ordering::Acquire)
    }
}

/// A watched answer and the connection's last look at it: how many parts had been
/// taken, and since when it has waited with that count.
struct Look {
    answer: Weak<dyn Watched>,
    seen: u64,
    since: Option<Instant>,
}

impl std::fmt::Debug for Look {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Look")
            .field("seen", &self.seen)
            .field("since", &self.since)
            .finish_non_exhaustive()
    }
}

impl ConnectionState {
    /// A new connection's state.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            open: AtomicUsize::new(0),
            local: AtomicUsize::new(0),
            reader: AtomicWaker::new(),
            close: AtomicBool::new(false),
            task: AtomicWaker::new(),
            born: Instant::now(),
            idle_since_ms: AtomicU64::new(0),
            output_blocked: AtomicBool::new(false),
            answers_waiting: AtomicUsize::new(0),
            answers_taken: AtomicU64::new(0),
            watched: Mutex::new(Vec::new()),
        })
    }

    /// Counts a request as open until the guard drops. `local` requests (the proxy's own
    /// endpoints) also hold back the client's end of stream until they are answered.
    pub fn open(self: &Arc<Self>, local: bool) -> StreamGuard {
        self.open.fetch_add(1, Ordering::AcqRel);
        if local {
            self.local.fetch_add(1, Ordering::AcqRel);
        }
        StreamGuard {
            state: Arc::clone(self),
            local,
        }
    }

    /// Requests whose answer is not done.
    pub fn open_requests(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// When the connection, idle since its last request ended, has been idle for `idle`;
    /// `None` while a request is open.
    pub fn idle_deadline(&self, idle: Duration) -> Option<Instant> {
        if self.open_requests() > 0 {
            return None;
        }
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
        Some(self.born + since + idle)
    }

    /// Asks for the connection to be closed once the answers in progress are sent.
    pub fn close_after_answers(&self) {
        self.close.store(true, Ordering::Release);
        self.task.wake();
    }

    /// Whether answer bytes wait to be written (the client's side is full): dropping the
    /// connection now would cut an answer short.
    pub fn output_blocked(&self) -> bool {
        self.output_blocked.load(Ordering::Acquire)
    }

    /// Notes how a write to the client went.
    fn note_write<T>(&self, polled: Poll<T>) -> Poll<T> {
        self.output_blocked
            .store(polled.is_pending(), Ordering::Release);
        polled
    }

    /// Answers waiting for their client to take the part of the body they gave.
    pub fn answers_waiting(&self) -> usize {
        self.answers_waiting.load(Ordering::Acquire)
    }

    /// How many parts of answers their clients have taken so far, and how many answers
    /// ended (a count that moves while the connection's clients read).
    pub fn answers_taken(&self) -> u64 {
        self.answers_taken.load(Ordering::Acquire)
    }

    /// Makes every watched answer that has waited `stall` for its client, with none of it
    /// taken since, let go of Desk ([`Watched::cut`]); `now` is this look's time. Meant to
    /// be called at a regular interval: an answer is cut at the first look at least
    /// `stall` after the look that first saw it waiting. Returns how many were cut.
    pub fn cut_stalled_answers(&self, now: Instant, stall: Duration) -> usize {
        let mut watched = self.watched.lock().unwrap_or_else(PoisonError::into_inner);
        let mut stalled = Vec::new();
        watched.retain_mut(|look| {
            let Some(answer) = look.answer.upgrade() else {
                return false;
            };
            let progress = answer.progress();
            let taken = progress.taken.load(Ordering::Acquire);
            if !progress.waiting.load(Ordering::Acquire) {
                look.since = None;
                return true;
            }
            match look.since {
                Some(since) if look.seen == taken => {
                    if now.duration_since(since) < stall {
                        return true;
                    }
                    stalled.push(answer);
                    false
                }
                _ => {
                    look.seen = taken;
                    look.since = Some(now);
                    true
                }
            }
        });
        drop(watched);
        // Outside the list's lock: letting go of Desk closes a connection, and may give
        // a fleet's call back.
        for answer in &stalled {
            answer.cut();
        }
        stalled.len()
    }

    /// Whether a close was asked for.
    pub fn close_requested(&self) -> bool {
        self.close.load(Ordering::Acquire)
    }

    /// Resolves once a close is asked for.
    pub async fn closing(&self) {
        std::future::poll_fn(|cx| {
            self.register_task(cx);
            if self.close_requested() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
    }

    /// Registers the connection's task, to be woken by [`Self::close_after_answers`].
    pub fn register_task(&self, cx: &Context<'_>) {
        self.task.register(cx.waker());
    }
}

/// One open request; see [`ConnectionState::open`].
#[derive(Debug)]
pub struct StreamGuard {
    state: Arc<ConnectionState>,
    local: bool,
}

impl StreamGuard {
    /// The request's watched answer gave hyper a part of its body, and waits to be asked
    /// for the next.
    pub fn answer_waits(&self, progress: &Progress) {
        self.state.answers_waiting.fetch_add(1, Ordering::AcqRel);
        progress.waiting.store(true, Ordering::Release);
    }

    /// The answer that waited was asked for its next part, or ended.
    pub fn answer_taken(&self, progress: &Progress) {
        progress.taken.fetch_add(1, Ordering::AcqRel);
        progress.waiting.store(false, Ordering::Release);
        self.state.answers_waiting.fetch_sub(1, Ordering::AcqRel);
        self.state.answers_taken.fetch_add(1, Ordering::AcqRel);
    }

    /// Puts the request's answer on the connection's list of watched answers.
    pub fn watch(&self, answer: Weak<dyn Watched>) {
        let look = Look {
            answer,
            seen: 0,
            since: None,
        };
        let mut watched = self
            .state
            .watched
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Pruned whenever the list fills (the connection's looks prune it only while a
        // request is open): amortized, and bounded by twice the answers alive.
        if watched.len() == watched.capacity() {
            watched.retain(|look| look.answer.strong_count() > 0);
        }
        watched.push(look);
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let state = &self.state;
        if self.local && state.local.fetch_sub(1, Ordering::AcqRel) == 1 {
            state.reader.wake();
        }
        state.answers_taken.fetch_add(1, Ordering::Release);
        if state.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            let since = u64::try_from(state.born.elapsed().as_millis()).unwrap_or(u64::MAX);
            state.idle_since_ms.store(since, Ordering::Release);
        }
    }
}

/// The connection's IO, holding back the client's end of stream while a local answer is
/// in progress. hyper cancels an HTTP/1 request when its client half-closes (so that a
/// request queued for Desk is never sent once its client has gone); the proxy's own
/// endpoints answer at once, and `printf 'GET /_proxy/health …' | nc -N` must get that
/// answer.
#[derive(Debug)]
pub struct Gated<IO> {
    io: IO,
    state: Arc<ConnectionState>,
}

impl<IO> Gated<IO> {
    /// `io`, gated by `state`.
    pub fn new(io: IO, state: Arc<ConnectionState>) -> Self {
        Self { io, state }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Gated<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() == before && buf.remaining() > 0 => {
                // End of stream: hold it back while a local answer is in progress. The
                // waker is registered before the count is read, so a release in between
                // still wakes this reader.
                this.state.reader.register(cx.waker());
                if this.state.local.load(Ordering::Acquire) > 0 {
                    Poll::Pending
                } else {
                    Poll::Ready(Ok(()))
                }
            }
            other => other,
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Gated<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.state
            .note_write(Pin::new(&mut this.io).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.state
            .note_write(Pin::new(&mut this.io).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.state.note_write(Pin::new(&mut this.io).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn end_of_stream_waits_for_local_answers() {
        let (mut client, server) = tokio::io::duplex(64);
        let state = ConnectionState::new();
        let mut gated = Gated::new(server, Arc::clone(&state));
        client.write_all(b"x").await.unwrap();
        drop(client);
        let local = state.open(true);
        let mut buf = [0u8; 8];
        assert_eq!(gated.read(&mut buf).await.unwrap(), 1);
        let held = tokio::time::timeout(std::time::Duration::from_millis(50), gated.read(&mut buf));
        assert!(held.await.is_err(), "end of stream held back");
        let reader = tokio::spawn(async move { gated.read(&mut [0u8; 8]).await.unwrap() });
        tokio::task::yield_now().await;
        drop(local);
        assert_eq!(reader.await.unwrap(), 0, "released with the answer");
        assert_eq!(state.open_requests(), 0);
    }

    #[tokio::test]
    async fn a_write_the_client_does_not_take_is_noted_until_it_goes_through() {
        let (mut client, server) = tokio::io::duplex(8);
        let state = ConnectionState::new();
        let mut gated = Gated::new(server, Arc::clone(&state));
        gated.write_all(b"12345678").await.unwrap();
        assert!(!state.output_blocked(), "it all went");
        // The client reads nothing: the next bytes wait.
        let mut writing = tokio::spawn(async move {
            gated.write_all(b"abcd").await.unwrap();
            gated
        });
        while !state.output_blocked() {
            assert!(
                futures_util::poll!(&mut writing).is_pending(),
                "the write went through"
            );
            tokio::task::yield_now().await;
        }
        let mut buf = [0u8; 8];
        client.read_exact(&mut buf).await.unwrap();
        let _gated = writing.await.unwrap();
        assert!(!state.output_blocked(), "taken by the client");
    }

    /// An answer that counts its cuts.
    #[derive(Default)]
    struct Answer {
        progress: Progress,
        cuts: AtomicUsize,
    }

    impl Watched for Answer {
        fn progress(&self) -> &Progress {
            &self.progress
        }

        fn cut(&self) {
            self.cuts.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn only_an_answer_that_waits_with_nothing_taken_for_the_stall_is_cut() {
        let state = ConnectionState::new();
        let stall = Duration::from_secs(2);
        let (stalled, moving) = (Arc::new(Answer::default()), Arc::new(Answer::default()));
        let (stalled_guard, moving_guard) = (state.open(false), state.open(false));
        for (answer, guard) in [(&stalled, &stalled_guard), (&moving, &moving_guard)] {
            let watched: Arc<dyn Watched> = Arc::clone(answer) as Arc<dyn Watched>;
            guard.watch(Arc::downgrade(&watched));
            guard.answer_waits(&answer.progress);
        }
        let start = Instant::now();
        let look = |secs| state.cut_stalled_answers(start + Duration::from_secs(secs), stall);
        assert_eq!(look(0), 0, "first seen waiting");
        moving_guard.answer_taken(&moving.progress);
        moving_guard.answer_waits(&moving.progress);
        assert_eq!(look(1), 0, "not yet the stall");
        moving_guard.answer_taken(&moving.progress);
        moving_guard.answer_waits(&moving.progress);
        assert_eq!(look(2), 1, "the stall, with nothing taken");
        assert_eq!(stalled.cuts.load(Ordering::Relaxed), 1);
        assert_eq!(
            moving.cuts.load(Ordering::Relaxed),
            0,
            "it moved at each look"
        );
        moving_guard.answer_taken(&moving.progress);
        moving_guard.answer_waits(&moving.progress);
        assert_eq!(look(10), 0, "a cut answer is no longer watched");
        assert_eq!(stalled.cuts.load(Ordering::Relaxed), 1);
        // An answer no longer there is forgotten.
        drop(moving);
        assert_eq!(look(20), 0);
        assert!(state.watched.lock().unwrap().is_empty());
    }

    #[test]
    fn answers_gone_are_forgotten_while_the_connection_is_idle_between_requests() {
        // No look happens while no request is open: the list prunes itself as it grows.
        let state = ConnectionState::new();
        for _ in 0..1000 {
            let guard = state.open(false);
            let answer: Arc<dyn Watched> = Arc::new(Answer::default());
            guard.watch(Arc::downgrade(&answer));
        }
        let held = state.watched.lock().unwrap().len();
        assert!(held <= 64, "{held} entries kept for answers long gone");
    }

    #[tokio::test]
    async fn a_forwarded_request_does_not_hold_the_end_of_stream() {
        let (client, server) = tokio::io::duplex(64);
        let state = ConnectionState::new();
        let mut gated = Gated::new(server, Arc::clone(&state));
        let _forwarded = state.open(false);
        drop(client);
        assert_eq!(gated.read(&mut [0u8; 8]).await.unwrap(), 0);
    }
}
