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
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
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
struct H1<B: SendBody> {
    sender: http1::SendRequest<B>,
    /// `None` once it has ended.
    conn: Option<http1::Connection<Io, B>>,
}

impl<B: SendBody> H1<B> {
    /// Drives the connection as far as it goes now; its end (clean or not) drops it.
    fn drive(&mut self, cx: &mut Context<'_>) {
        if let Some(conn) = &mut self.conn
            && Pin::new(conn).poll(cx).is_ready()
        {
            self.conn = None;
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

    /// Sends `req` (its URI absolute, as `BaseUrl::join` makes it) and returns Desk's
    /// head, its body to be read through [`PooledBody`]. The request comes boxed: an async
    /// fn holds what it is given for its whole life, and the request's future is
    /// allocated at its full size for every client connection.
    pub async fn send(
        &self,
        mut req: Box<Request<B>>,
    ) -> Result<Response<PooledBody<B>>, SendError> {
        req.headers_mut()
            .entry(http::header::HOST)
            .or_insert_with(|| self.host.clone());
        if let Some(h2) = self.shared_h2() {
            return Box::pin(send_h2(h2, *req)).await;
        }
        let mut fresh = false;
        loop {
            let (mut h1, reused) = match self.checkout(fresh).await {
                Some(h1) => (h1, true),
                // Boxed: the connect's future is large and rare, and the request's future
                // is allocated at its full size for every client connection.
                None => match Box::pin(self.connect()).await? {
                    Connection::H1(h1) => (h1, false),
                    Connection::H2(h2) => return Box::pin(send_h2(h2, *req)).await,
                },
            };
            // HTTP/1.1 takes the path and query only (HTTP/2 keeps the whole URI).
            *req.version_mut() = Version::HTTP_11;
            if req.uri().scheme().is_some()
                && let Some(pq) = req.uri().path_and_query().cloned()
            {
                *req.uri_mut() = Uri::from(pq);
            }
            let mut answer = Box::pin(h1.sender.try_send_request(*req));
            let answered = poll_fn(|cx| {
                h1.drive(cx);
                answer.as_mut().poll(cx)
            })
            .await;
            let mut err = match answered {
                Ok(response) => {
                    return Ok(
                        response.map(|body| PooledBody::driving(body, h1, self.this.clone()))
                    );
                }
                Err(err) => err,
            };
            match err.take_message() {
                // Not a byte of it was written: the connection had closed as it was taken.
                Some(unsent) if reused => {
                    *req = unsent;
                    fresh = true;
                }
                _ => return Err(SendError::Http(err.into_error())),
            }
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
            let ready = poll_fn(|cx| {
                h1.drive(cx);
                Poll::Ready(
                    h1.conn.is_some() && matches!(h1.sender.poll_ready(cx), Poll::Ready(Ok(()))),
                )
            })
            .await;
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
        Ok(Connection::H1(Box::new(H1 {
            sender,
            conn: Some(conn),
        })))
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
        self.body = None;
        if let Some((mut h1, pool)) = self.h1.take() {
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
        if let Some((h1, _)) = &mut this.h1 {
            h1.drive(cx);
        }
        let Some(body) = &mut this.body else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(body).poll_frame(cx);
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
