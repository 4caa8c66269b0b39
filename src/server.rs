//! The accept loop: HTTP/1.1 and h2c on one listener, header read timeout, graceful
//! shutdown that keeps answering while in-flight requests finish.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::proxy::Proxy;

/// Largest request head (request line + headers) accepted over HTTP/1.1.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most header fields accepted in one request.
const MAX_HEADERS: usize = 128;

/// Serves `listener` until `shutdown` resolves, then drains: `/_proxy/ready` answers 503
/// at once, requests in flight finish (new ones are still answered meanwhile) within the
/// grace period, and idle connections are closed.
pub async fn serve(proxy: Arc<Proxy>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    let builder = connection_builder(&proxy);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accept(&proxy, &builder, &graceful, accepted).await,
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
            accepted = listener.accept() => accept(&proxy, &builder, &graceful, accepted).await,
        }
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep_until(deadline) => {}
    }
}

fn connection_builder(proxy: &Proxy) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(proxy.config.timeouts.header_read)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEAD_BYTES as u32)
        .max_concurrent_streams(256)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    builder
}

async fn accept(
    proxy: &Arc<Proxy>,
    builder: &auto::Builder<TokioExecutor>,
    graceful: &GracefulShutdown,
    accepted: std::io::Result<(TcpStream, std::net::SocketAddr)>,
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
    let Some(slot) = ConnectionSlot::take(&proxy.connections, proxy.config.max_connections) else {
        tracing::warn!(%peer, limit = proxy.config.max_connections, "connection refused: limits.max_connections reached");
        return;
    };
    let _ = stream.set_nodelay(true);
    let first_request = Arc::new(AtomicBool::new(false));
    let service = {
        let proxy = Arc::clone(proxy);
        let first_request = Arc::clone(&first_request);
        service_fn(move |req| {
            first_request.store(true, Ordering::Relaxed);
            Arc::clone(&proxy).handle(req, peer)
        })
    };
    let connection = builder
        .serve_connection(TokioIo::new(stream), service)
        .into_owned();
    let connection = graceful.watch(connection);
    let header_read = proxy.config.timeouts.header_read;
    tokio::spawn(async move {
        let _slot = slot;
        tokio::pin!(connection);
        // hyper's header read timeout starts only once HTTP/1 is detected: a client that
        // sends nothing, or stalls in the HTTP/2 preface, is cut off here.
        let first_deadline = tokio::time::sleep(header_read);
        tokio::pin!(first_deadline);
        let mut checked = false;
        loop {
            tokio::select! {
                result = &mut connection => {
                    if let Err(err) = result {
                        tracing::debug!(error = %err, %peer, "connection ended with an error");
                    }
                    return;
                }
                () = &mut first_deadline, if !checked => {
                    checked = true;
                    if !first_request.load(Ordering::Relaxed) {
                        tracing::debug!(%peer, "closing a connection that sent no request in time");
                        return;
                    }
                }
            }
        }
    });
}

/// One accepted connection, counted against `limits.max_connections` until dropped.
struct ConnectionSlot(Arc<AtomicUsize>);

impl ConnectionSlot {
    fn take(count: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        let taken = count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        taken.then(|| Self(Arc::clone(count)))
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
