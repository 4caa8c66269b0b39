//! The floor of the stack: the least a hyper proxy does to forward a request with a header
//! added, for `bench/run.sh` to measure the product against (README "Performance").
//!
//!     cargo build --release --example bare_proxy
//!     BASELINE_BIN=target/release/examples/bare_proxy bash bench/run.sh
//!
//! It reads only `listen` and `upstream` (plain `http://`) from the configuration it is
//! given (`bare_proxy serve --config FILE`, as bench/run.sh starts a build of the
//! product), runs one single-threaded runtime per core as the product does, gives each
//! client connection one upstream HTTP/1.1 connection of its own, and adds
//! `Authorization` to every request. No policy, no limits, no logs, no token (`/_proxy/…` answers an
//! empty 200 for bench/run.sh's readiness wait): not a proxy to use, a measure of what hyper itself costs.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::HeaderValue;
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) != Some("serve") {
        return Err("usage: bare_proxy serve --config FILE (nothing else)".into());
    }
    let config = match args.iter().position(|a| a == "--config") {
        Some(i) => args.get(i + 1).ok_or("--config needs a file")?,
        None => return Err("usage: bare_proxy serve --config FILE".into()),
    };
    let config: toml::Table = std::fs::read_to_string(config)?.parse()?;
    let listen = config
        .get("listen")
        .and_then(|v| v.as_str())
        .unwrap_or("127.0.0.1:8080");
    let upstream = config
        .get("upstream")
        .and_then(|v| v.as_str())
        .ok_or("upstream is required")?;
    let upstream: Arc<str> = upstream
        .strip_prefix("http://")
        .ok_or("upstream must be http://")?
        .trim_end_matches('/')
        .into();
    let listener = std::net::TcpListener::bind(listen)?;
    listener.set_nonblocking(true)?;
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut threads = Vec::new();
    for _ in 0..workers {
        let listener = listener.try_clone()?;
        let upstream = Arc::clone(&upstream);
        threads.push(std::thread::spawn(move || -> Result<(), Error> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(accept(listener, upstream))
        }));
    }
    for thread in threads {
        thread.join().map_err(|_| "a worker panicked")??;
    }
    Ok(())
}

async fn accept(listener: std::net::TcpListener, upstream: Arc<str>) -> Result<(), Error> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let token = HeaderValue::from_static("Zoho-oauthtoken 1000.bare.floor");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let upstream = Arc::clone(&upstream);
        let token = token.clone();
        tokio::spawn(async move {
            let sender: Arc<Mutex<Option<SendRequest<Incoming>>>> = Arc::default();
            let service = service_fn(move |mut req: hyper::Request<Incoming>| {
                let sender = Arc::clone(&sender);
                let upstream = Arc::clone(&upstream);
                let token = token.clone();
                async move {
                    // bench/run.sh waits for this before it measures.
                    if req.uri().path().starts_with("/_proxy/") {
                        return Ok(hyper::Response::new(Either::Right(Empty::new())));
                    }
                    if let Some(path) = req.uri().path_and_query().cloned() {
                        *req.uri_mut() = path.into();
                    }
                    req.headers_mut().insert(http::header::AUTHORIZATION, token);
                    match forward(&sender, &upstream, req).await {
                        Ok(response) => Ok::<_, Infallible>(response.map(Either::Left)),
                        Err(_) => {
                            let mut bad_gateway =
                                hyper::Response::new(Either::Right(Empty::<Bytes>::new()));
                            *bad_gateway.status_mut() = http::StatusCode::BAD_GATEWAY;
                            Ok(bad_gateway)
                        }
                    }
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn forward(
    sender: &Mutex<Option<SendRequest<Incoming>>>,
    upstream: &str,
    req: hyper::Request<Incoming>,
) -> Result<hyper::Response<Incoming>, Error> {
    let taken = sender.lock().map_err(|_| "poisoned")?.take();
    let mut send = match taken {
        Some(send) if !send.is_closed() => send,
        _ => {
            let stream = tokio::net::TcpStream::connect(upstream).await?;
            stream.set_nodelay(true)?;
            let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            send
        }
    };
    send.ready().await?;
    let response = send.send_request(req);
    *sender.lock().map_err(|_| "poisoned")? = Some(send);
    Ok(response.await?)
}
