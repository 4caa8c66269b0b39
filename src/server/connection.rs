//! One client connection's life on a worker: HTTP/1.1 or h2c told apart, served by hyper
//! within the connection's time bounds (first request, idle, close after an answer), and,
//! after a `CONNECT` of transparent mode, handed to its tunnel.

use std::sync::{Arc, Mutex};

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::drive::drive;
use super::tunnel;
use super::worker::{Accepted, Counted, TunnelSlot, Worker, handler};
use crate::connection::{ConnectionState, Gated};
use crate::detect::{self, Version};
use crate::proxy::Via;

/// Serves one connection on the current worker: HTTP/1.1, or h2c with prior knowledge.
pub(super) fn serve(worker: &Arc<Worker>, accepted: Accepted, load: Counted) {
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
    // Only transparent mode has tunnels to hand over.
    let tunnel: Option<TunnelSlot> = worker
        .proxy
        .intercept
        .is_some()
        .then(|| Arc::new(Mutex::new(None)));
    let service = handler(worker, &state, peer, Via::Direct, tunnel.clone());
    worker.register(&state);
    let alive = worker.alive.subscribe();
    let worker = Arc::clone(worker);
    tokio::spawn(async move {
        let _counted = (slot, load, alive);
        let idle = worker.proxy.config.timeouts.header_read;
        let stall = worker.proxy.config.timeouts.body_read;
        // A client that sends nothing, or stalls in the HTTP/2 preface, is cut off here;
        // `drive` bounds the rest of the first head, from the same start.
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
                let connection = worker.http1.serve_connection(io, service).with_upgrades();
                tokio::pin!(connection);
                drive(connection, &state, idle, stall, peer, &worker.proxy.metrics).await
            }
            Version::Http2 => {
                let connection = worker.http2.serve_connection(io, service);
                tokio::pin!(connection);
                drive(connection, &state, idle, stall, peer, &worker.proxy.metrics).await
            }
        };
        if let Err(err) = result {
            tracing::debug!(error = %err, %peer, "connection ended with an error");
        }
        // A CONNECT was answered: the connection is the tunnel's now, and keeps its place
        // among the open ones until the tunnel ends.
        let request = tunnel.and_then(|slot| {
            slot.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take()
        });
        if let Some(request) = request {
            // Boxed: a tunnel's state (TLS, a connection inside) is large, and only
            // tunnels should pay for it, not every connection's task.
            Box::pin(tunnel::run(&worker, request, peer)).await;
        }
    });
}
