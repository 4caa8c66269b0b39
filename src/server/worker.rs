//! A worker: the proxy, its way to Desk, the connection settings, and the connections it
//! serves, which it closes when it stops; the service of those connections; and what a
//! worker is handed (a counted connection, or the order to stop).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::{Service, service_fn};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::body::ResponseBody;
use crate::budget::{
    H2_CONNECTION_WINDOW, H2_STREAM_WINDOW, MAX_HEAD_BYTES, MAX_STREAMS_PER_CONNECTION,
};
use crate::connection::ConnectionState;
use crate::proxy::{CloseConnection, Proxy, Tunnel, TunnelRequest, Upstream, Via};

/// What a worker's connections share: the proxy, the worker's way to Desk, the
/// connection settings, and what the worker needs to close them all when it stops.
pub(super) struct Worker {
    pub(super) proxy: Arc<Proxy>,
    pub(super) upstream: Upstream,
    pub(super) http1: http1::Builder,
    pub(super) http2: http2::Builder<TokioExecutor>,
    /// The connections' states, to ask them all to close (pruned as they end).
    connections: Mutex<Vec<Weak<ConnectionState>>>,
    /// Every connection holds a receiver until it ends, so the worker knows when all have.
    pub(super) alive: watch::Sender<()>,
}

impl Worker {
    /// Worker `index` of `workers`.
    pub(super) fn new(proxy: Arc<Proxy>, index: usize, workers: usize) -> Self {
        let (http1, http2) = connection_builders();
        Self {
            upstream: proxy.upstream(index, workers),
            proxy,
            http1,
            http2,
            connections: Mutex::default(),
            alive: watch::Sender::new(()),
        }
    }

    pub(super) fn register(&self, state: &Arc<ConnectionState>) {
        let mut connections = self
            .connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Pruned whenever the list doubles: amortized, and bounded by twice the open ones.
        if connections.len() == connections.capacity() {
            connections.retain(|c| c.strong_count() > 0);
        }
        connections.push(Arc::downgrade(state));
    }

    /// Asks every connection to close after its answers in progress.
    pub(super) fn close_all(&self) {
        let connections = self
            .connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for state in connections.iter().filter_map(Weak::upgrade) {
            state.close_after_answers();
        }
    }
}

fn connection_builders() -> (http1::Builder, http2::Builder<TokioExecutor>) {
    let mut http1 = http1::Builder::new();
    // No timer: the time a request head may take (`timeouts.header_read_secs`) is
    // bounded with the connection's idle time, by `drive`, at no cost per request.
    http1
        .header_read_timeout(None)
        // The head limit itself (431); the buffer limit alone is enforced only when a
        // read happens to end at it.
        .max_header_size(MAX_HEAD_BYTES)
        .max_buf_size(MAX_HEAD_BYTES)
        // No `max_headers`: hyper's own limit is `MAX_HEADERS` (100 fields, 431 past
        // it), parsed on the stack; any other figure makes hyper allocate two arrays
        // of that many entries on the heap for every request.
        // hyper's default: a client's EOF while its request is in flight cancels the
        // request, so that one queued for a slot is never sent once its client has gone
        // (`half_close(true)` would save memory; README "Performance" says why not).
        .keep_alive(true);
    let mut http2 = http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEAD_BYTES as u32)
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    (http1, http2)
}

/// Where a `CONNECT`'s tunnel waits for its connection to end (the tunnel then takes the
/// connection's place).
pub(super) type TunnelSlot = Arc<Mutex<Option<Tunnel>>>;

/// The service of one connection: every request goes to the request path, counted as
/// open on its connection from the moment it arrives until its answer is done.
pub(super) fn handler(
    worker: &Arc<Worker>,
    state: &Arc<ConnectionState>,
    peer: SocketAddr,
    via: Via,
    tunnel: Option<TunnelSlot>,
) -> impl Service<
    hyper::Request<Incoming>,
    Response = hyper::Response<ResponseBody>,
    Error = Infallible,
    Future: Send + 'static,
> + Clone
+ Send
+ 'static {
    let worker = Arc::clone(worker);
    let state = Arc::clone(state);
    service_fn(move |mut req: hyper::Request<Incoming>| {
        // Now, before hyper reads the connection again (see `head`).
        super::head::detach(&mut req);
        // Before the first poll: hyper may drop a request's future unpolled when its
        // client goes away, and the request is still logged.
        let open = state.open(crate::admin::is_local(req.uri().path()));
        let mut log = worker.proxy.start_log(&req);
        // Boxed, and the log lent: what the request's future holds is kept small (see
        // Proxy::handle), for every request in flight holds it.
        let req = Box::new(req);
        let worker = Arc::clone(&worker);
        let state = Arc::clone(&state);
        let via = via.clone();
        let tunnel = tunnel.clone();
        async move {
            let response = worker
                .proxy
                .handle(&worker.upstream, req, peer, &mut log, &via)
                .await;
            let mut response = Proxy::logged(response, log);
            if response.extensions().get::<CloseConnection>().is_some() {
                state.close_after_answers();
            }
            if let Some(request) = response
                .extensions_mut()
                .remove::<TunnelRequest>()
                .and_then(|r| r.take())
            {
                match &tunnel {
                    Some(slot) => {
                        *slot
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(request);
                    }
                    None => state.close_after_answers(),
                }
            }
            response.body_mut().hold_stream(open);
            Ok::<_, Infallible>(*response)
        }
    })
}

/// A connection on its way to a worker.
pub(super) struct Accepted {
    pub(super) stream: std::net::TcpStream,
    pub(super) peer: SocketAddr,
    pub(super) slot: Counted,
}

/// What a worker is told to do.
pub(super) enum Job {
    Serve(Accepted, Counted),
    /// Stop taking connections; close the idle ones, and the rest at the deadline.
    Stop(Instant),
}

/// A counted connection: one of `limits.max_connections` (the process), or one of a
/// worker's load. The count drops with it.
pub(super) struct Counted(Arc<AtomicUsize>);

impl Counted {
    /// Counts one more unless `max` are already counted.
    pub(super) fn take(count: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        let taken = count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        taken.then(|| Self(Arc::clone(count)))
    }

    /// Counts one more.
    pub(super) fn enter(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(count))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
