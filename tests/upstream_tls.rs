//! The upstream side over TLS (README "How requests are forwarded"): HTTP/2 or HTTP/1.1 as ALPN decides, pooled
//! kept-alive connections, and certificates verified (`tls.ca_file` adds a root).

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::net::TcpListener;
use zoho_desk_proxy::BaseUrl;
use zoho_desk_proxy::config::Config;
use zoho_desk_proxy::fake_zoho::{FakeOptions, FakeZoho};

/// What the upstream saw of one request: its version and `Authorization`.
type Seen = (http::Version, Option<String>);

/// A TLS Desk stand-in for `localhost` that records what it saw.
struct TlsUpstream {
    addr: SocketAddr,
    ca_file: PathBuf,
    connections: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// How many connections have ended.
    ended: tokio::sync::watch::Receiver<usize>,
    _dir: tempfile::TempDir,
}

impl TlsUpstream {
    async fn start(alpn: &[&[u8]]) -> Self {
        Self::start_with(alpn, Duration::ZERO).await
    }

    /// An upstream that waits `handshake_delay` before each TLS handshake.
    async fn start_with(alpn: &[&[u8]], handshake_delay: Duration) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, cert.pem()).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(signing_key.serialize_der().into());
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)
        .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (ended_tx, ended) = tokio::sync::watch::channel(0);
        let ended_tx = Arc::new(ended_tx);
        let (c, s) = (connections.clone(), seen.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                let seen = s.clone();
                let ended_tx = Arc::clone(&ended_tx);
                tokio::spawn(async move {
                    tokio::time::sleep(handshake_delay).await;
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        ended_tx.send_modify(|n| *n += 1);
                        return;
                    };
                    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let auth = req
                            .headers()
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned);
                        seen.lock().unwrap().push((req.version(), auth));
                        async {
                            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(
                                b"{\"data\":[]}",
                            ))))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                    ended_tx.send_modify(|n| *n += 1);
                });
            }
        });
        Self {
            addr,
            ca_file,
            connections,
            seen,
            ended,
            _dir: dir,
        }
    }
}

/// A proxy in front of `upstream` with `workers` serving threads (each pools its own
/// upstream connections).
async fn proxy_to(
    upstream: &TlsUpstream,
    fake: &FakeZoho,
    trust: bool,
    workers: usize,
) -> TestProxy {
    let mut toml = format!(
        "upstream = \"https://localhost:{}\"\naccounts_url = \"{}\"\ntoken_file = \"\"\n[limits]\nworkers = {workers}\n",
        upstream.addr.port(),
        fake.accounts_url()
    );
    let o = FakeOptions::default();
    toml += &format!(
        "[oauth]\nclient_id = \"{}\"\nclient_secret = \"{}\"\nrefresh_token = \"{}\"\n",
        o.client_id, o.client_secret, o.refresh_token
    );
    if trust {
        toml += &format!("[tls]\nca_file = \"{}\"\n", upstream.ca_file.display());
    }
    let config = Config::from_toml(&toml).unwrap();
    assert_eq!(
        config.upstream,
        BaseUrl::parse(&format!("https://localhost:{}", upstream.addr.port())).unwrap()
    );
    start_proxy(config).await
}

#[tokio::test]
async fn http2_by_alpn_over_one_pooled_connection() {
    let fake = FakeZoho::start().await.unwrap();
    let upstream = TlsUpstream::start(&[b"h2", b"http/1.1"]).await;
    let proxy = proxy_to(&upstream, &fake, true, 1).await;
    for _ in 0..5 {
        assert_eq!(status(proxy.url("/api/v1/tickets")).await, 200);
    }
    // An h2c client too: its request is sent over the same pool.
    assert_eq!(
        h2c_client()
            .get(proxy.url("/api/v1/tickets"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let seen = upstream.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 6);
    assert!(
        seen.iter().all(|(v, _)| *v == http::Version::HTTP_2),
        "{seen:?}"
    );
    assert!(seen.iter().all(|(_, auth)| {
        auth.as_deref()
            .is_some_and(|a| a.starts_with("Zoho-oauthtoken "))
    }));
    assert_eq!(
        upstream.connections.load(Ordering::SeqCst),
        1,
        "one pooled connection"
    );
}

#[tokio::test]
async fn http11_by_alpn_keeps_connections_alive() {
    let fake = FakeZoho::start().await.unwrap();
    let upstream = TlsUpstream::start(&[b"http/1.1"]).await;
    let proxy = proxy_to(&upstream, &fake, true, 1).await;
    for _ in 0..5 {
        assert_eq!(status(proxy.url("/api/v1/tickets")).await, 200);
    }
    let seen = upstream.seen.lock().unwrap().clone();
    assert!(
        seen.iter().all(|(v, _)| *v == http::Version::HTTP_11),
        "{seen:?}"
    );
    assert_eq!(
        upstream.connections.load(Ordering::SeqCst),
        1,
        "sequential requests reuse one connection"
    );
}

#[tokio::test]
async fn each_worker_pools_its_own_upstream_connection() {
    let fake = FakeZoho::start().await.unwrap();
    let upstream = TlsUpstream::start(&[b"h2", b"http/1.1"]).await;
    let proxy = proxy_to(&upstream, &fake, true, 2).await;
    // Every request comes on a new client connection; connections take turns between the
    // two workers, and each worker reuses its one upstream connection.
    for _ in 0..8 {
        assert_eq!(status(proxy.url("/api/v1/tickets")).await, 200);
    }
    assert_eq!(upstream.seen.lock().unwrap().len(), 8);
    assert_eq!(
        upstream.connections.load(Ordering::SeqCst),
        2,
        "one pooled connection per worker"
    );
}

#[tokio::test]
async fn an_untrusted_certificate_is_refused_and_no_token_is_sent() {
    let fake = FakeZoho::start().await.unwrap();
    let upstream = TlsUpstream::start(&[b"h2", b"http/1.1"]).await;
    let proxy = proxy_to(&upstream, &fake, false, 1).await;
    let response = fetch(proxy.url("/api/v1/tickets")).await;
    assert_proxy_error(response, 502, "PROXY_UPSTREAM_UNREACHABLE").await;
    assert!(upstream.seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_request_whose_client_left_while_desk_was_connected_to_is_never_sent() {
    let fake = FakeZoho::start().await.unwrap();
    // Desk's TLS handshake takes 600 ms; the client gives up after 150 ms.
    let mut upstream = TlsUpstream::start_with(&[b"http/1.1"], Duration::from_millis(600)).await;
    let proxy = proxy_to(&upstream, &fake, true, 1).await;
    let gone = client()
        .get(proxy.url("/api/v1/tickets"))
        .timeout(Duration::from_millis(150))
        .send()
        .await;
    assert!(gone.is_err());
    // The connection the proxy was making ends without a request on it.
    tokio::time::timeout(
        Duration::from_secs(10),
        upstream.ended.wait_for(|n| *n >= 1),
    )
    .await
    .expect("the upstream connection ended")
    .unwrap();
    assert!(
        upstream.seen.lock().unwrap().is_empty(),
        "sent after its client left"
    );
}
