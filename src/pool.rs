//! A serving thread's connections to Desk.
//!
//! An HTTP/1.1 connection is driven by the task of the request that uses it: the request
//! future polls the connection while it waits for Desk's head, and the answer's body
//! polls it while Desk's body streams ([`PooledBody`]). No task of its own and no channel
//! hop between the client's connection and Desk's, as in nginx's event loop. Between
//! requests it waits, unpolled, on a stack (the last returned is the next taken, so the
//! ones beyond what the load needs age out), and before it is used again it is polled
//! once: a connection Desk closed while it waited is seen then and replaced. A request
//! that the connection could not even begin to send is sent again on a new one; one that
//! was sent is never sent twice. Idle connections are closed after `timeouts.idle_secs`.
//!
//! When Desk's TLS offers HTTP/2 (ALPN), the thread's requests share one HTTP/2
//! connection instead, driven by a task of its own (HTTP/2 multiplexes, so it cannot
//! belong to one request).
//!
//! The stack is used by one serving thread only; its lock is held for a push or a pop and
//! is never contended. How many connections are busy at once is bounded by the caller
//! (the thread's share of `limits.max_upstream_requests`), how many wait by `max_idle`.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::client::legacy::connect::Connection as _;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;
use tower_service::Service;

use arc_swap::ArcSwapOption;
use futures_util::task::AtomicWaker;

use crate::client::{Connector, innermost};

/// A connection's byte stream: TCP, or TLS over it.
type Io = <Connector as Service<Uri>>::Response;

/// What a request body must be to go through the pool.
pub trait SendBody:
    Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>> + Send + Unpin + 'static
{
}

impl<T> SendBody for T where
    T: Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
        + Send
        + Unpin
        + 'static
{
}

/// Why a request got no answer from Desk.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made (TCP or TLS).
    #[error("{0}")]
    Connect(String),
    /// The connection failed while the request was sent or its answer read.
    #[error("{}", innermost(.0))]
    Http(#[from] hyper::Error),
}

impl SendError {
    /// Whether TCP connect took longer than its timeout.
    pub fn is_connect_timeout(&self) -> bool {
        matches!(self, Self::Connect(why) if why.contains("timed out") || why.contains("timeout"))
    }
}

/// One serving thread's connections to one upstream.
pub struct Pool<B: SendBody> {
    connector: Connector,
    /// Where connections go (scheme and authority only).
    origin: Uri,
    /// The `Host` of every request: the authority, its port left out when it is the
    /// scheme's default.
    host: HeaderValue,
    idle: Mutex<Vec<Idle<B>>>,
    /// The shared HTTP/2 connection, once ALPN chose HTTP/2 (read without a lock by
    /// every request).
    h2: ArcSwapOption<http2::SendRequest<B>>,
    max_idle: usize,
    idle_timeout: Duration,
    /// Itself, for the bodies that bring their connection back.
    this: Weak<Self>,
}

/// An HTTP/1.1 connection: the handle requests are given to, and the connection itself,
/// which whoever waits on it polls.
///
/// Everything of the connection (the connection, the answer's future, the answer's body)
/// is polled with a waker of its own ([`Wakeup`]), so that the request's task knows
/// whether anything of Desk's side happened since it last looked: a task woken by its
/// client's socket or a timer does not poll Desk's connection, and what the connection
/// wakes while it is being polled (a request handed to it, the answer it completes, the
/// body it fills) is polled again at once instead of scheduling the task once more.
struct H1<B: SendBody> {
    sender: http1::SendRequest<B>,
    /// `None` once it has ended.
    conn: Option<http1::Connection<Io, B>>,
    wakeup: Arc<Wakeup>,
    /// `wakeup` as a waker, made once.
    waker: Waker,
}

impl<B: SendBody> H1<B> {
    fn new(sender: http1::SendRequest<B>, conn: http1::Connection<Io, B>) -> Self {
        let wakeup = Arc::new(Wakeup::default());
        Self {
            sender,
            conn: Some(conn),
            waker: Waker::from(Arc::clone(&wakeup)),
            wakeup,
        }
    }

    /// Polls `f` (given the sender and the connection's context), after driving the
    /// connection as far as it goes if anything woke it; again while what was polled
    /// woke it, a few times at most. The connection's end (clean or not) drops it.
    fn poll_with<T>(
        &mut self,
        cx: &mut Context<'_>,
        mut f: impl FnMut(&mut http1::SendRequest<B>, &mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        self.wakeup.parent.register(cx.waker());
        let mut inner = Context::from_waker(&self.waker);
        for _ in 0..POLLS_PER_WAKE {
            let woken = self.wakeup.enter();
            if woken
                && let Some(conn) = &mut self.conn
                && Pin::new(conn).poll(&mut inner).is_ready()
            {
                self.conn = None;
            }
            let polled = f(&mut self.sender, &mut inner);
            // A wake during the poll stays noted: for the next turn of this loop, or
            // whoever polls next (the answer's body, or the pool).
            let woken = self.wakeup.leave();
            if polled.is_ready() || !woken {
                return polled;
            }
        }
        // Still being woken: let the runtime's other tasks run first.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Runs `f` as if it were polled: what it wakes of the connection is noted for the
    /// next poll, without waking the task.
    fn quietly<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> T {
        self.wakeup.enter_keeping();
        let out = f(self);
        self.wakeup.leave();
        out
    }

    /// Whether the connection is open and ready for a request. It is polled only if
    /// something woke it while it waited (Desk closing it, say); otherwise it is as it
    /// was when it was put back: ready, its last answer taken in to its end (a
    /// bodiless 204 too: `tests/upstream_pool.rs`).
    fn is_ready(&mut self, cx: &mut Context<'_>) -> bool {
        let ready = self.poll_with(cx, |sender, cx| {
            Poll::Ready(matches!(sender.poll_ready(cx), Poll::Ready(Ok(()))))
        });
        self.conn.is_some() && matches!(ready, Poll::Ready(true))
    }

    /// Drives the connection as far as it goes now (if anything woke it).
    fn drive(&mut self, cx: &mut Context<'_>) {
        let _ = self.poll_with(cx, |_, _| Poll::Ready(()));
    }
}

/// How many times one poll of the request's task polls Desk's connection at most while
/// it keeps waking itself (hyper yields after a number of reads of a long body).
const POLLS_PER_WAKE: usize = 4;

/// The waker of one HTTP/1.1 connection's side: it notes that something of the
/// connection is ready to be polled, and wakes the task that polls it unless that task is
/// polling it right now (and will poll again before it returns).
struct Wakeup {
    /// [`WOKEN`] and [`POLLING`].
    state: AtomicU8,
    /// The task that polled the connection last.
    parent: AtomicWaker,
}

impl Default for Wakeup {
    /// A new connection has never been polled: it counts as woken.
    fn default() -> Self {
        Self {
            state: AtomicU8::new(WOKEN),
            parent: AtomicWaker::new(),
        }
    }
}

/// Something was woken since the connection was last polled.
const WOKEN: u8 = 1;
/// The connection is being polled.
const POLLING: u8 = 2;

impl Wakeup {
    /// Starts a poll; whether anything was woken since the last one (a new connection
    /// counts as woken).
    fn enter(&self) -> bool {
        self.state.swap(POLLING, Ordering::AcqRel) & WOKEN != 0
    }

    /// Starts a poll that keeps what was woken before it.
    fn enter_keeping(&self) {
        self.state.fetch_or(POLLING, Ordering::AcqRel);
    }

    /// Ends a poll; whether anything was woken while it ran (which stays noted for
    /// the next poll).
    fn leave(&self) -> bool {
        self.state.fetch_and(!POLLING, Ordering::AcqRel) & WOKEN != 0
    }
}

impl Wake for Wakeup {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.state.fetch_or(WOKEN, Ordering::AcqRel) & POLLING == 0 {
            self.parent.wake();
        }
    }
}

struct Idle<B: SendBody> {
    h1: Box<H1<B>>,
    since: Instant,
}

impl<B: SendBody> Pool<B> {
    /// A pool for requests to `origin` (`scheme://authority`), keeping at most `max_idle`
    /// connections waiting, each for at most `idle_timeout`. Called on the serving
    /// thread's runtime: the task that closes expired idle connections starts with it.
    pub fn new(
        connector: Connector,
        origin: &crate::url::BaseUrl,
        max_idle: usize,
        idle_timeout: Duration,
    ) -> Arc<Self> {
        let pool = Arc::new_cyclic(|this| Self {
            connector,
            origin: origin.origin().clone(),
            host: origin.host_header().clone(),
            idle: Mutex::new(Vec::with_capacity(max_idle)),
            h2: ArcSwapOption::empty(),
            max_idle,
            idle_timeout,
            this: this.clone(),
        });
        tokio::spawn(sweep(Arc::downgrade(&pool), idle_timeout));
        pool
    }

    /// A connection for one request: the thread's HTTP/2 connection, a waiting HTTP/1.1
    /// one (unless `fresh` is asked for), or a new one. Nothing is sent yet: a caller that
    /// gives up meanwhile sends nothing.
    pub async fn connection(&self, fresh: bool) -> Result<Ready<B>, SendError> {
        if let Some(h2) = self.shared_h2() {
            return Ok(Ready(Conn::H2(h2)));
        }
        if let Some(h1) = self.checkout(fresh).await {
            return Ok(Ready(Conn::H1 { h1, reused: true }));
        }
        // Boxed: the connect's future is large and rare, and the request's future is
        // allocated at its full size for every client connection.
        Ok(Ready(match Box::pin(self.connect()).await? {
            Connection::H1(h1) => Conn::H1 { h1, reused: false },
            Connection::H2(h2) => Conn::H2(h2),
        }))
    }

    /// Sends `req` (its URI absolute, as `BaseUrl::join` makes it) on `ready` and returns
    /// Desk's head, its body to be read through [`PooledBody`]; or the request itself, not
    /// a byte of it written, when the waiting connection it was given had closed as it was
    /// taken (ask for a fresh one). The request comes boxed: an async fn holds what it is
    /// given for its whole life, and the request's future is allocated at its full size for
    /// every client connection.
    pub async fn send(&self, ready: Ready<B>, mut req: Box<Request<B>>) -> Sent<B> {
        req.headers_mut()
            .entry(http::header::HOST)
            .or_insert_with(|| self.host.clone());
        let (mut h1, reused) = match ready.0 {
            Conn::H2(h2) => return Sent::Answered(Box::pin(send_h2(h2, *req)).await),
            Conn::H1 { h1, reused } => (h1, reused),
        };
        // HTTP/1.1 takes the path and query only (HTTP/2 keeps the whole URI).
        *req.version_mut() = Version::HTTP_11;
        if req.uri().scheme().is_some()
            && let Some(pq) = req.uri().path_and_query().cloned()
        {
            *req.uri_mut() = Uri::from(pq);
        }
        // Handing the request over wakes the connection: noted, so the first poll drives
        // it, without scheduling the task once more.
        let request = *req;
        let answer = h1.quietly(move |h1| h1.sender.try_send_request(request));
        let mut answer = std::pin::pin!(answer);
        let answered = poll_fn(|cx| h1.poll_with(cx, |_, cx| answer.as_mut().poll(cx))).await;
        let mut err = match answered {
            Ok(response) => {
                return Sent::Answered(Ok(
                    response.map(|body| PooledBody::driving(body, h1, self.this.clone()))
                ));
            }
            Err(err) => err,
        };
        match err.take_message() {
            // Not a byte of it was written: the connection had closed as it was taken.
            Some(unsent) if reused => {
                *req = unsent;
                Sent::Unsent(req)
            }
            _ => Sent::Answered(Err(SendError::Http(err.into_error()))),
        }
    }

    /// The thread's HTTP/2 connection, while it is open.
    fn shared_h2(&self) -> Option<http2::SendRequest<B>> {
        let h2 = self.h2.load();
        let open = h2.as_deref().filter(|h2| !h2.is_closed()).cloned();
        if open.is_none() && h2.is_some() {
            self.h2.store(None);
        }
        open
    }

    /// A waiting connection that is still open and ready, unless `fresh` is asked for.
    /// Each is polled once as it is taken: that reads the end of one Desk closed.
    async fn checkout(&self, fresh: bool) -> Option<Box<H1<B>>> {
        if fresh {
            return None;
        }
        loop {
            let mut h1 = self.pop()?;
            let ready = poll_fn(|cx| Poll::Ready(h1.is_ready(cx))).await;
            if ready {
                return Some(h1);
            }
        }
    }

    /// A new connection, HTTP/1.1 or HTTP/2 as ALPN chose.
    async fn connect(&self) -> Result<Connection<B>, SendError> {
        let io = self
            .connector
            .clone()
            .call(self.origin.clone())
            .await
            .map_err(|err| SendError::Connect(innermost(&*err)))?;
        if io.connected().is_negotiated_h2() {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await?;
            tokio::spawn(async move {
                if let Err(err) = conn.await {
                    tracing::debug!(error = %innermost(&err), "Desk's HTTP/2 connection ended");
                }
            });
            self.h2.store(Some(Arc::new(sender.clone())));
            return Ok(Connection::H2(sender));
        }
        let (sender, conn) = http1::handshake(io).await?;
        Ok(Connection::H1(Box::new(H1::new(sender, conn))))
    }
}

impl<B: SendBody> Pool<B> {
    /// The connection returned last, if it has not waited too long (and those below it,
    /// which waited longer, are then closed too).
    fn pop(&self) -> Option<Box<H1<B>>> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let top = idle.pop()?;
        if top.since.elapsed() < self.idle_timeout {
            return Some(top.h1);
        }
        idle.clear();
        None
    }

    /// Takes back a connection whose answer was read to its end.
    fn checkin(&self, h1: Box<H1<B>>) {
        if h1.conn.is_none() || h1.sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() >= self.max_idle {
            return;
        }
        idle.push(Idle {
            h1,
            since: Instant::now(),
        });
    }

    /// Closes the waiting connections that waited `idle_timeout`.
    fn expire(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let timeout = self.idle_timeout;
        idle.retain(|c| c.since.elapsed() < timeout);
    }
}

/// A connection ready to take one request ([`Pool::connection`]).
pub struct Ready<B: SendBody>(Conn<B>);

enum Conn<B: SendBody> {
    H1 { h1: Box<H1<B>>, reused: bool },
    H2(http2::SendRequest<B>),
}

/// What came of [`Pool::send`].
pub enum Sent<B: SendBody> {
    /// Desk's answer, or why there is none.
    Answered(Result<Response<PooledBody<B>>, SendError>),
    /// The request, not a byte of it written: the waiting connection it was given had
    /// closed as it was taken.
    Unsent(Box<Request<B>>),
}

/// What a new connection speaks.
enum Connection<B: SendBody> {
    /// Boxed once for its life: it moves from request to body to stack and back.
    H1(Box<H1<B>>),
    H2(http2::SendRequest<B>),
}

/// Sends `req` over the shared HTTP/2 connection `h2`.
async fn send_h2<B: SendBody>(
    mut h2: http2::SendRequest<B>,
    mut req: Request<B>,
) -> Result<Response<PooledBody<B>>, SendError> {
    *req.version_mut() = Version::HTTP_2;
    let response = h2.send_request(req).await?;
    Ok(response.map(PooledBody::shared))
}

/// Closes expired idle connections of `pool` every half `idle_timeout`, for as long as
/// the pool lives.
async fn sweep<B: SendBody>(pool: Weak<Pool<B>>, idle_timeout: Duration) {
    let every = (idle_timeout / 2).max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(every).await;
        match pool.upgrade() {
            Some(pool) => pool.expire(),
            None => return,
        }
    }
}

/// Desk's answer body. Over HTTP/1.1 it drives its connection as it is read, and gives
/// the connection back to the pool when it was read to its end; dropped before that, the
/// connection is closed (an answer half-read cannot be skipped).
pub struct PooledBody<B: SendBody> {
    /// `None` once it was read to its end.
    body: Option<Incoming>,
    h1: Option<Lent<B>>,
}

/// A connection lent to one answer's body, and the pool it goes back to.
type Lent<B> = (Box<H1<B>>, Weak<Pool<B>>);

impl<B: SendBody> std::fmt::Debug for PooledBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBody")
            .field("http1", &self.h1.is_some())
            .field("ended", &self.body.is_none())
            .finish()
    }
}

impl<B: SendBody> PooledBody<B> {
    fn shared(body: Incoming) -> Self {
        Self {
            body: Some(body),
            h1: None,
        }
    }

    fn driving(body: Incoming, h1: Box<H1<B>>, pool: Weak<Pool<B>>) -> Self {
        Self {
            body: Some(body),
            h1: Some((h1, pool)),
        }
    }

    /// Once the body was read to its end (`ended`: it said so; a chunked body's end is
    /// known only then): drops it, which tells the connection that its
    /// reader is done (until then it holds its end of the body open, waiting to be asked
    /// for more), drives the connection to its idle state when `cx` allows, and gives it
    /// back to the pool.
    fn finish(&mut self, ended: bool, cx: Option<&mut Context<'_>>) {
        if !ended && self.body.as_ref().is_some_and(|b| !b.is_end_stream()) {
            return;
        }
        let body = self.body.take();
        if let Some((mut h1, pool)) = self.h1.take() {
            // Dropping the body wakes the connection: noted, for the drive below or the
            // next checkout.
            h1.quietly(|_| drop(body));
            if let Some(cx) = cx {
                h1.drive(cx);
            }
            if let Some(pool) = pool.upgrade() {
                pool.checkin(h1);
            }
        }
    }
}

impl<B: SendBody> Body for PooledBody<B> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let Some(body) = &mut this.body else {
            return Poll::Ready(None);
        };
        let polled = match &mut this.h1 {
            Some((h1, _)) => h1.poll_with(cx, |_, cx| Pin::new(&mut *body).poll_frame(cx)),
            None => Pin::new(body).poll_frame(cx),
        };
        // Back to the stack as soon as the answer is read, not when the body is dropped
        // (after its last bytes went to the client, which may already have sent its
        // next request).
        match &polled {
            Poll::Ready(None) => this.finish(true, Some(cx)),
            Poll::Ready(Some(Ok(_))) => this.finish(false, Some(cx)),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl<B: SendBody> Drop for PooledBody<B> {
    fn drop(&mut self) {
        // Bodies that were never polled (HEAD, 204, 304, empty) ended all along; any
        // other is closed with its connection.
        self.finish(false, None);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// A task's waker that counts its wakes.
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn what_the_connection_wakes_while_it_is_polled_is_noted_without_waking_the_task() {
        let task = Arc::new(Count(AtomicUsize::new(0)));
        let woken = || task.0.load(Ordering::SeqCst);
        let wakeup = Arc::new(Wakeup::default());
        let waker = Waker::from(Arc::clone(&wakeup));
        wakeup.parent.register(&Waker::from(Arc::clone(&task)));

        assert!(wakeup.enter(), "a new connection is polled");
        waker.wake_by_ref();
        assert!(
            wakeup.leave(),
            "a wake during the poll is seen when it ends"
        );
        assert_eq!(woken(), 0, "and does not wake the task");
        assert!(wakeup.enter(), "it stays noted for the next poll");
        assert!(!wakeup.leave(), "nothing woke it during that one");
        assert!(!wakeup.enter(), "nor since: the next poll may skip it");
        assert!(!wakeup.leave());

        waker.wake_by_ref();
        assert_eq!(woken(), 1, "a wake between polls wakes the task");
        assert!(wakeup.enter(), "and is seen by its next poll");
        assert!(!wakeup.leave());

        wakeup.enter_keeping();
        waker.wake_by_ref();
        assert!(wakeup.leave());
        assert_eq!(woken(), 1, "a quiet step wakes no one");
        assert!(wakeup.enter(), "but its wake is kept for the next poll");
        assert!(!wakeup.leave());
    }
}
