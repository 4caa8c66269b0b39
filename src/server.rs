//! The accept loop and the serving threads.
//!
//! One task accepts connections and hands each to the least-loaded worker. A worker is a
//! thread running a single-threaded runtime with its own upstream connection pool, so a
//! request, its upstream connection and every wake-up between them stay on one core, as in
//! nginx's worker processes. Each worker serves HTTP/1.1 and h2c, enforces the time
//! bounds of a connection (head, idle; see [`crate::budget`]), and on shutdown lets
//! requests in flight finish.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::Poll;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::budget::{Limit, MAX_HEAD_BYTES, MAX_HEADERS, MAX_STREAMS_PER_CONNECTION};
use crate::connection::{ConnectionState, Gated};
use crate::detect::{self, Version};
use crate::proxy::{CloseConnection, Proxy, Upstream};

/// Serves `listener` until `shutdown` resolves, then drains: `/_proxy/ready` answers 503
/// at once, requests in flight finish (new ones are still answered meanwhile) within the
/// grace period, and idle connections are closed. Fails only when the serving threads
/// cannot be started.
pub async fn serve(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let workers = Workers::start(&proxy)?;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accept(&proxy, &workers, accepted).await,
        }
    }

    let lifecycle = Arc::clone(proxy.lifecycle());
    lifecycle.start_draining();
    let deadline = Instant::now() + proxy.config.timeouts.shutdown_grace;
    tracing::info!(
        in_flight = lifecycle.in_flight(),
        "shutting down: draining requests in flight"
    );
    loop {
        tokio::select! {
            () = lifecycle.wait_idle() => break,
            () = tokio::time::sleep_until(deadline) => {
                tracing::warn!(in_flight = lifecycle.in_flight(), "grace period over; closing requests still in flight");
                break;
            }
            accepted = listener.accept() => accept(&proxy, &workers, accepted).await,
        }
    }
    drop(listener);
    workers.stop(deadline).await;
    Ok(())
}

async fn accept(
    proxy: &Proxy,
    workers: &Workers,
    accepted: std::io::Result<(TcpStream, SocketAddr)>,
) {
    let (stream, peer) = match accepted {
        Ok(accepted) => accepted,
        Err(err) => {
            // Out of file descriptors and the like: back off instead of spinning.
            tracing::warn!(error = %err, "accept failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
            return;
        }
    };
    let Some(slot) = Counted::take(&proxy.connections, proxy.config.max_connections) else {
        proxy.metrics.record_limit(Limit::Connections);
        tracing::warn!(%peer, limit = proxy.config.max_connections, budget = Limit::Connections.key(), "connection refused: limits.max_connections reached");
        return;
    };
    // The worker registers the socket with its own runtime.
    match stream.into_std() {
        Ok(stream) => workers.dispatch(Accepted { stream, peer, slot }),
        Err(err) => tracing::debug!(error = %err, %peer, "accepted connection lost"),
    }
}

/// A connection on its way to a worker.
struct Accepted {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    slot: Counted,
}

enum Job {
    Serve(Accepted, Counted),
    /// Stop taking connections; close the idle ones, and the rest at the deadline.
    Stop(Instant),
}

/// The serving threads.
struct Workers {
    workers: Vec<WorkerHandle>,
    /// Where the search for the least-loaded worker starts, so that ties take turns.
    next: AtomicUsize,
}

struct WorkerHandle {
    jobs: mpsc::UnboundedSender<Job>,
    /// Connections this worker serves.
    load: Arc<AtomicUsize>,
    done: oneshot::Receiver<()>,
}

impl Workers {
    /// Starts the serving threads (`limits.workers`).
    fn start(proxy: &Arc<Proxy>) -> std::io::Result<Self> {
        let count = proxy.config.worker_threads();
        let mut workers = Vec::with_capacity(count);
        for index in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (jobs, receiver) = mpsc::unbounded_channel();
            let (finished, done) = oneshot::channel();
            let proxy = Arc::clone(proxy);
            std::thread::Builder::new()
                .name(format!("zdp-worker-{index}"))
                .spawn(move || {
                    runtime.block_on(work(proxy, receiver, index, count));
                    // Dropping the runtime drops the connections still open.
                    drop(runtime);
                    let _ = finished.send(());
                })?;
            workers.push(WorkerHandle {
                jobs,
                load: Arc::default(),
                done,
            });
        }
        Ok(Self {
            workers,
            next: AtomicUsize::new(0),
        })
    }

    /// Hands a connection to the worker serving the fewest (ties take turns).
    fn dispatch(&self, mut accepted: Accepted) {
        let count = self.workers.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let in_turn = (0..count).map(|i| &self.workers[(start + i) % count]);
        let least_loaded = in_turn
            .clone()
            .min_by_key(|worker| worker.load.load(Ordering::Relaxed));
        // A worker that is gone (it can only have panicked) is skipped.
        for worker in least_loaded.into_iter().chain(in_turn) {
            let load = Counted::enter(&worker.load);
            match worker.jobs.send(Job::Serve(accepted, load)) {
                Ok(()) => return,
                Err(mpsc::error::SendError(Job::Serve(returned, _))) => accepted = returned,
                Err(mpsc::error::SendError(Job::Stop(_))) => return,
            }
        }
        tracing::error!(peer = %accepted.peer, "no serving thread is running; connection closed");
    }

    /// Tells every worker to stop and waits for them.
    async fn stop(self, deadline: Instant) {
        for worker in &self.workers {
            let _ = worker.jobs.send(Job::Stop(deadline));
        }
        for worker in self.workers {
            let _ = worker.done.await;
        }
    }
}

/// What a worker's connections share: the proxy, the worker's way to Desk, the
/// connection settings, and what the worker needs to close them all when it stops.
struct Worker {
    proxy: Arc<Proxy>,
    upstream: Upstream,
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    /// The connections' states, to ask them all to close (pruned as they end).
    connections: Mutex<Vec<Weak<ConnectionState>>>,
    /// Every connection holds a receiver until it ends, so the worker knows when all have.
    alive: watch::Sender<()>,
}

impl Worker {
    fn register(&self, state: &Arc<ConnectionState>) {
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
    fn close_all(&self) {
        let connections = self
            .connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for state in connections.iter().filter_map(Weak::upgrade) {
            state.close_after_answers();
        }
    }
}

/// A worker's life: serve the connections it is given until told to stop, then close them
/// gracefully until the deadline.
async fn work(
    proxy: Arc<Proxy>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    index: usize,
    workers: usize,
) {
    let (http1, http2) = connection_builders(&proxy);
    let worker = Arc::new(Worker {
        upstream: proxy.upstream(index, workers),
        proxy,
        http1,
        http2,
        connections: Mutex::default(),
        alive: watch::Sender::new(()),
    });
    let deadline = loop {
        match jobs.recv().await {
            Some(Job::Serve(accepted, load)) => serve_connection(&worker, accepted, load),
            Some(Job::Stop(deadline)) => break deadline,
            None => return,
        }
    };
    worker.close_all();
    tokio::select! {
        () = worker.alive.closed() => {}
        () = tokio::time::sleep_until(deadline) => {}
    }
}

fn connection_builders(proxy: &Proxy) -> (http1::Builder, http2::Builder<TokioExecutor>) {
    let mut http1 = http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(proxy.config.timeouts.header_read)
        // The head limit itself (431); the buffer limit alone is enforced only when a
        // read happens to end at it.
        .max_header_size(MAX_HEAD_BYTES)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS)
        // hyper's default: a client's EOF while its request is in flight cancels the
        // request, so that one queued for a slot is never sent once its client has gone
        // (`half_close(true)` would save memory; README "Performance" says why not).
        .keep_alive(true);
    let mut http2 = http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEAD_BYTES as u32)
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    (http1, http2)
}

/// Serves one connection on the current worker: HTTP/1.1, or h2c with prior knowledge.
fn serve_connection(worker: &Arc<Worker>, accepted: Accepted, load: Counted) {
    let Accepted { stream, peer, slot } = accepted;
    let stream = match TcpStream::from_std(stream) {
        Ok(stream) => stream,
        Err(err) => {
            tracing::warn!(error = %err, %peer, "cannot register an accepted connection");
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let state = ConnectionState::new();
    let service = {
        let worker = Arc::clone(worker);
        let state = Arc::clone(&state);
        service_fn(move |req: hyper::Request<Incoming>| {
            // Before the first poll: hyper may drop a request's future unpolled when its
            // client goes away, and the request is still logged.
            let open = state.open(crate::admin::is_local(req.uri().path()));
            let log = worker.proxy.start_log(&req);
            let worker = Arc::clone(&worker);
            let state = Arc::clone(&state);
            async move {
                let mut response = worker.proxy.handle(&worker.upstream, req, peer, log).await;
                if response.extensions().get::<CloseConnection>().is_some() {
                    state.close_after_answers();
                }
                response.body_mut().hold_stream(open);
                Ok::<_, Infallible>(response)
            }
        })
    };
    worker.register(&state);
    let alive = worker.alive.subscribe();
    let worker = Arc::clone(worker);
    tokio::spawn(async move {
        let _counted = (slot, load, alive);
        let idle = worker.proxy.config.timeouts.header_read;
        // hyper's header read timeout starts only once an HTTP/1 head begins: a client
        // that sends nothing, or stalls in the HTTP/2 preface, is cut off here.
        let detected = tokio::select! {
            detected = tokio::time::timeout(idle, detect::detect(stream)) => detected,
            // Shutting down: a connection that has sent nothing yet has nothing to drain.
            () = state.closing() => return,
        };
        let (version, io) = match detected {
            Ok(Ok(detected)) => detected,
            Ok(Err(err)) => {
                tracing::debug!(error = %err, %peer, "connection ended before its first request");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, budget = "timeouts.header_read_secs", "closing a connection that sent no request in time");
                return;
            }
        };
        let io = TokioIo::new(Gated::new(io, Arc::clone(&state)));
        let result = match version {
            // Pinned here and lent to `drive`: an async fn keeps its arguments for its
            // whole life, so a connection passed by value would be held twice.
            Version::Http1 => {
                let connection = worker.http1.serve_connection(io, service);
                tokio::pin!(connection);
                drive(connection, &state, idle, peer).await
            }
            Version::Http2 => {
                let connection = worker.http2.serve_connection(io, service);
                tokio::pin!(connection);
                drive(connection, &state, idle, peer).await
            }
        };
        if let Err(err) = result {
            tracing::debug!(error = %err, %peer, "connection ended with an error");
        }
    });
}

/// Runs a connection to its end, closing it gracefully (after the answers in progress;
/// GOAWAY on HTTP/2) when a close is asked for (a request's, or the worker stopping), or
/// when it has had no open request for `idle`. A connection still there `idle` after that
/// with no open request (an HTTP/2 client that never acknowledges the GOAWAY) is dropped.
///
/// A request costs this loop nothing: only the idle timer, when it fires, and a close
/// request wake it besides the connection itself.
async fn drive<C>(
    mut connection: Pin<&mut C>,
    state: &ConnectionState,
    idle: Duration,
    peer: SocketAddr,
) -> Result<(), C::Error>
where
    C: GracefulConnection,
{
    let idle_timer = tokio::time::sleep(idle);
    tokio::pin!(idle_timer);
    let mut closing = false;
    std::future::poll_fn(|cx| {
        loop {
            if let Poll::Ready(result) = connection.as_mut().poll(cx) {
                return Poll::Ready(result);
            }
            state.register_task(cx);
            let close = if !closing && state.close_requested() {
                true
            } else if idle_timer.as_mut().poll(cx).is_ready() {
                let now = Instant::now();
                match state.idle_deadline(idle).map(Instant::from_std) {
                    // Requests are open: look again one idle period later.
                    None => {
                        idle_timer.as_mut().reset(now + idle);
                        continue;
                    }
                    Some(deadline) if deadline > now => {
                        idle_timer.as_mut().reset(deadline);
                        continue;
                    }
                    Some(_) if closing => {
                        tracing::debug!(%peer, "dropping a connection that did not close after being asked to");
                        return Poll::Ready(Ok(()));
                    }
                    Some(_) => {
                        tracing::debug!(%peer, budget = "timeouts.header_read_secs", "closing an idle connection");
                        true
                    }
                }
            } else {
                false
            };
            if !close {
                return Poll::Pending;
            }
            closing = true;
            connection.as_mut().graceful_shutdown();
            idle_timer.as_mut().reset(Instant::now() + idle);
        }
    })
    .await
}

/// A counted connection: one of `limits.max_connections` (the process), or one of a
/// worker's load. The count drops with it.
struct Counted(Arc<AtomicUsize>);

impl Counted {
    /// Counts one more unless `max` are already counted.
    fn take(count: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        let taken = count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        taken.then(|| Self(Arc::clone(count)))
    }

    /// Counts one more.
    fn enter(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(count))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
