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
//!
//! With `--raw-client` (`BASELINE_ARGS=--raw-client`), hyper's server stays but Desk's side
//! is a hand-written HTTP/1.1 exchange on the connection's own socket: the request head
//! written in one write, the answer's head parsed with `httparse` and its `Content-Length`
//! body read whole into one buffer (bodiless requests and small answers only; anything
//! else is a 502). It splits hyper's cost between its server and its client (README
//! "Below hyper: tokio alone").

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use bytes::BytesMut;
use http::HeaderValue;
use http_body_util::{Either, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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
    let raw_client = args.iter().any(|a| a == "--raw-client");
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
            if raw_client {
                runtime.block_on(accept_raw(listener, upstream))
            } else {
                runtime.block_on(accept(listener, upstream))
            }
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

/// Serves connections with hyper's server, forwarding through [`raw_exchange`].
async fn accept_raw(listener: std::net::TcpListener, upstream: Arc<str>) -> Result<(), Error> {
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
            let desk: Arc<Mutex<Option<TcpStream>>> = Arc::default();
            let service = service_fn(move |mut req: hyper::Request<Incoming>| {
                let desk = Arc::clone(&desk);
                let upstream = Arc::clone(&upstream);
                let token = token.clone();
                async move {
                    if req.uri().path().starts_with("/_proxy/") {
                        return Ok(hyper::Response::new(Either::Right(Empty::new())));
                    }
                    req.headers_mut().insert(http::header::AUTHORIZATION, token);
                    let taken = desk.lock().ok().and_then(|mut slot| slot.take());
                    match raw_exchange(taken, &upstream, &req).await {
                        Ok((response, stream)) => {
                            if let Ok(mut slot) = desk.lock() {
                                *slot = Some(stream);
                            }
                            Ok::<_, Infallible>(response.map(Either::Left))
                        }
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

/// One request and its answer on `stream` (a new connection if `None`), by hand: the
/// head written in one write, the answer's head parsed with `httparse` and its
/// `Content-Length` body read whole. Gives the connection back with the answer.
async fn raw_exchange(
    stream: Option<TcpStream>,
    upstream: &str,
    req: &hyper::Request<Incoming>,
) -> Result<(hyper::Response<Full<Bytes>>, TcpStream), Error> {
    use hyper::body::Body as _;
    if req.body().size_hint().upper() != Some(0) {
        return Err("--raw-client forwards bodiless requests only".into());
    }
    let mut stream = match stream {
        Some(stream) => stream,
        None => {
            let stream = TcpStream::connect(upstream).await?;
            stream.set_nodelay(true)?;
            stream
        }
    };
    let mut head = Vec::with_capacity(512);
    head.extend_from_slice(req.method().as_str().as_bytes());
    head.push(b' ');
    let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in req.headers() {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    stream.write_all(&head).await?;

    let mut buf = BytesMut::with_capacity(4096);
    loop {
        if stream.read_buf(&mut buf).await? == 0 {
            return Err("Desk closed the connection".into());
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Response::new(&mut headers);
        let httparse::Status::Complete(len) = parsed.parse(&buf)? else {
            continue;
        };
        let mut response = hyper::Response::builder().status(parsed.code.unwrap_or(502));
        let mut length = 0usize;
        for header in parsed.headers.iter() {
            if header.name.eq_ignore_ascii_case("content-length") {
                length = std::str::from_utf8(header.value)?.trim().parse()?;
            } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
                return Err("--raw-client reads Content-Length bodies only".into());
            }
            response = response.header(header.name, header.value);
        }
        while buf.len() < len + length {
            if stream.read_buf(&mut buf).await? == 0 {
                return Err("Desk closed the connection mid-answer".into());
            }
        }
        let mut body = buf.split_off(len);
        body.truncate(length);
        return Ok((response.body(Full::new(body.freeze()))?, stream));
    }
}
