//! The accept loop and the serving threads.
//!
//! One task accepts connections and hands each to the least-loaded worker. A worker is a
//! thread running a single-threaded runtime with its own upstream connection pool, so a
//! request, its upstream connection and every wake-up between them stay on one core, as in
//! nginx's worker processes.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::connection;
use super::worker::{Accepted, Counted, Job, Worker};
use crate::budget::Limit;
use crate::proxy::Proxy;

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
                lifecycle.end_grace();
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

/// A worker's life: serve the connections it is given until told to stop, then close them
/// gracefully until the deadline.
async fn work(
    proxy: Arc<Proxy>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    index: usize,
    workers: usize,
) {
    let worker = Arc::new(Worker::new(proxy, index, workers));
    let deadline = loop {
        match jobs.recv().await {
            Some(Job::Serve(accepted, load)) => connection::serve(&worker, accepted, load),
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
