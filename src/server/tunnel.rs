//! A tunnel of transparent mode (README "Clients that cannot change their URL"): once the
//! 200 to a client's `CONNECT` is sent, TLS is ended here with the local CA's leaf for the
//! host the client names (SNI), and the requests inside are served — HTTP/2 or HTTP/1.1 by
//! ALPN — by the same request path as any other, knowing which host they went to.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use tokio_rustls::TlsAcceptor;

use super::drive::drive;
use super::worker::{Worker, handler};
use crate::connection::ConnectionState;
use crate::proxy::{Tunnel, Via};

/// Serves the tunnel a `CONNECT` asked for, until either side ends it.
pub(super) async fn run(worker: &Arc<Worker>, request: Tunnel, peer: SocketAddr) {
    let Tunnel {
        upgrade,
        host,
        service,
        tls,
    } = request;
    let idle = worker.proxy.config.timeouts.header_read;
    let stall = worker.proxy.config.timeouts.body_read;
    let upgraded = match tokio::time::timeout(idle, upgrade).await {
        Ok(Ok(upgraded)) => upgraded,
        Ok(Err(err)) => {
            tracing::debug!(error = %err, %peer, "intercept: the tunnel ended before it began");
            return;
        }
        Err(_) => return,
    };
    // The client's TLS hello must come within the head's time, name an intercepted host
    // (the CA's leaves are for those only), and name the host of its CONNECT.
    let accepted =
        tokio::time::timeout(idle, TlsAcceptor::from(tls).accept(TokioIo::new(upgraded))).await;
    let stream = match accepted {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => {
            tracing::warn!(%peer, %host, error = %err, "intercept: TLS handshake failed (does the client trust the local CA?)");
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, %host, budget = "timeouts.header_read_secs", "intercept: no TLS handshake in time");
            return;
        }
    };
    let (_, session) = stream.get_ref();
    let named = session.server_name().map(str::to_ascii_lowercase);
    if named.as_deref() != Some(&*host) {
        // The name as sent (the client's own choice), or none.
        let sni = named.as_deref().unwrap_or("(none)");
        tracing::warn!(%peer, connect = %host, sni, "intercept: the TLS name differs from the CONNECT's host; tunnel closed");
        return;
    }
    let h2 = session.alpn_protocol() == Some(b"h2");
    let state = ConnectionState::new();
    worker.register(&state);
    let service = handler(worker, &state, peer, Via::Tunnel { host, service }, None);
    let io = TokioIo::new(stream);
    let result = if h2 {
        let connection = worker.http2.serve_connection(io, service);
        tokio::pin!(connection);
        drive(connection, &state, idle, stall, peer, &worker.proxy.metrics).await
    } else {
        let connection = worker.http1.serve_connection(io, service);
        tokio::pin!(connection);
        drive(connection, &state, idle, stall, peer, &worker.proxy.metrics).await
    };
    if let Err(err) = result {
        tracing::debug!(error = %err, %peer, "intercept: tunnel ended with an error");
    }
}
