//! The outbound side's connector (TCP, then rustls, HTTP/2 or HTTP/1.1 by ALPN) and
//! hyper-util's pooled client over it, for Zoho Accounts (Desk's connections are the
//! serving threads' own: `pool.rs`). Neither follows redirects, reads `HTTP_PROXY`, or
//! decompresses.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::CertificateDer;

/// The connector shared by the Desk and Accounts clients.
pub type Connector = HttpsConnector<BareConnector>;

/// Builds a pooled client for request bodies of type `B`.
///
/// `connect` bounds TCP connect (TLS is bounded by the caller's response timeout),
/// `idle` is how long a kept-alive connection waits in the pool, and at most `max_idle`
/// wait there per host (more are closed). Servers are verified against Mozilla's roots
/// plus `extra_roots` (`tls.ca_file`).
pub fn build<B>(
    connect: Duration,
    idle: Duration,
    max_idle: usize,
    extra_roots: &[CertificateDer<'static>],
) -> Client<Connector, B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(idle)
        .pool_max_idle_per_host(max_idle)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector(connect, extra_roots))
}

/// TCP (bounded by `connect`), then TLS for `https` URLs, offering HTTP/2 and HTTP/1.1
/// by ALPN. Servers are verified against Mozilla's roots plus `extra_roots`.
pub fn connector(connect: Duration, extra_roots: &[CertificateDer<'static>]) -> Connector {
    install_crypto_provider();

    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect));
    http.set_nodelay(true);
    http.set_keepalive(Some(Duration::from_secs(60)));

    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls_config(extra_roots))
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(BareConnector(http))
}

fn tls_config(extra_roots: &[CertificateDer<'static>]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    // Certificates were parsed when the config was validated; one rustls rejects here
    // would fail every handshake with it, which is what the operator will see.
    let (_added, _ignored) = roots.add_parsable_certificates(extra_roots.iter().cloned());
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map(|b| {
            b.with_root_certificates(roots.clone())
                .with_no_client_auth()
        })
        .unwrap_or_else(|_| {
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth()
        })
}

/// hyper-util's TCP connector, minus the connection info (`HttpInfo`) it attaches to
/// every response: an allocation per response that the proxy never reads.
#[derive(Clone)]
pub struct BareConnector(HttpConnector);

impl tower_service::Service<Uri> for BareConnector {
    type Response = TokioIo<BareTcp>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        // Once per connection, not per request: the box is fine here.
        let connecting = self.0.call(uri);
        Box::pin(async move {
            let io = connecting.await?;
            Ok(TokioIo::new(BareTcp(io.into_inner())))
        })
    }
}

/// A TCP stream that reports no connection info.
pub struct BareTcp(TcpStream);

impl Connection for BareTcp {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for BareTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for BareTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// Installs ring as the process' rustls provider, once: rustls panics when more than one
/// provider is compiled in and none is chosen. An error only means one is installed.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// How long a Redis command may take (the token store's and the fleet's alike).
pub const REDIS_COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// The Redis at `url` (`redis://`, `rediss://`, `redis+unix://`), not yet connected: one
/// for the process, which the token store and the fleet's count each connect through.
pub fn redis_client(url: &str) -> Result<redis::Client, RedisTrouble> {
    install_crypto_provider();
    redis::Client::open(url).map_err(|e| RedisTrouble::BadUrl(e.to_string()))
}

/// A connection to `client`'s Redis, made lazily through a manager that reconnects: one
/// command retried once, backing off up to 2 s.
pub fn redis_connection(
    client: &redis::Client,
) -> Result<redis::aio::ConnectionManager, redis::RedisError> {
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(REDIS_COMMAND_TIMEOUT))
        .set_response_timeout(Some(REDIS_COMMAND_TIMEOUT))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_secs(2));
    redis::aio::ConnectionManager::new_lazy_with_config(client.clone(), config)
}

/// What a `token_store` URL looks like, for the messages about one that cannot be used.
const REDIS_URL_FORM: &str =
    "expected redis://[:password@]host[:port][/db] (a db number from 0), or rediss:// for TLS";

/// How the Redis at a `token_store` URL answered one `PING` (within
/// [`REDIS_COMMAND_TIMEOUT`]), when it did not answer `PONG`.
#[derive(Debug)]
pub enum RedisTrouble {
    /// The URL is not one of Redis.
    BadUrl(String),
    /// It answered and refused this proxy: a wrong or missing password or user, an ACL,
    /// a database number it does not have. The operator must fix the URL.
    Refused(String),
    /// It could not be reached, or did not answer in time: an outage, which the fleet
    /// rides out.
    Unreachable(String),
}

impl std::fmt::Display for RedisTrouble {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::BadUrl(why) => write!(
                f,
                "not a Redis URL that can be used ({why}): {REDIS_URL_FORM}"
            ),
            Self::Refused(why) => write!(
                f,
                "the Redis there refuses this proxy ({why}); fix: give its password and database in the URL: redis://:PASSWORD@host:6379/0, or redis://USER:PASSWORD@host:6379/0 for an ACL user allowed the proxy's commands"
            ),
            Self::Unreachable(why) => write!(
                f,
                "the Redis there cannot be reached ({why}); a proxy serves meanwhile, refreshing on its own and keeping to its share of Desk's calls; fix: check the host and port of token_store and the network path to it"
            ),
        }
    }
}

/// Pings `client`'s Redis once, on a connection of its own that ends with the ping.
pub async fn redis_ping(client: &redis::Client) -> Result<(), RedisTrouble> {
    let ping = || async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    };
    // A Redis at its client limit answers anything, AUTH included, with an error that
    // reads as a failed authentication: one that still fails a moment later is taken
    // at its word.
    let mut tries = 3;
    loop {
        tries -= 1;
        return match tokio::time::timeout(REDIS_COMMAND_TIMEOUT, ping()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(err)) if err.kind() == redis::ErrorKind::AuthenticationFailed && tries > 0 => {
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
            Ok(Err(err)) if is_refusal(&err) => Err(RedisTrouble::Refused(err.to_string())),
            Ok(Err(err)) => Err(RedisTrouble::Unreachable(err.to_string())),
            Err(_) => Err(RedisTrouble::Unreachable(format!(
                "no answer within {} s",
                REDIS_COMMAND_TIMEOUT.as_secs()
            ))),
        };
    }
}

/// Whether Redis answered with a refusal of the connection's settings (its password,
/// user, database or ACL), rather than failing to answer or being busy for a moment.
fn is_refusal(err: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    match err.kind() {
        ErrorKind::AuthenticationFailed
        | ErrorKind::InvalidClientConfig
        | ErrorKind::Server(ServerErrorKind::NoPerm) => true,
        // `-ERR` says many things ("max number of clients reached" among them): only a
        // database it does not have is the URL's fault.
        ErrorKind::Server(ServerErrorKind::ResponseError) => {
            let text = err.to_string();
            text.contains("switch database") || text.contains("DB index")
        }
        // Protected mode (`DENIED`): a Redis not set up to take other machines.
        ErrorKind::Extension => matches!(err.code(), Some("NOAUTH" | "WRONGPASS" | "DENIED")),
        _ => false,
    }
}

/// An error in words, from its innermost cause (never a URL or header).
pub fn innermost(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text = cause.to_string();
        source = cause.source();
    }
    text
}
