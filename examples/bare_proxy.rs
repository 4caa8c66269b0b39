//! The floors of the stack: the least a proxy does to forward a request with a header
//! added, for `bench/run.sh` to measure the product against (README "Performance").
//!
//!     cargo build --release --example bare_proxy
//!     BASELINE_BIN=target/release/examples/bare_proxy bash bench/run.sh
//!     BASELINE_BIN=target/release/examples/bare_proxy BASELINE_ARGS=--raw bash bench/run.sh
//!
//! It reads only `listen` and `upstream` (plain `http://`) from the configuration it is
//! given (`bare_proxy serve --config FILE [--raw-client | --raw]`, as bench/run.sh starts a
//! build of the product), runs one single-threaded runtime per core as the product does,
//! gives each client connection one upstream HTTP/1.1 connection of its own, and adds
//! `Authorization` to every request. No policy, no limits, no logs, no token (`/_proxy/…`
//! answers an empty 200 for bench/run.sh's readiness wait): not a proxy to use, a measure
//! of what the layers under the product cost. Three floors:
//!
//! - by default, hyper alone: hyper's HTTP/1 server and its connection-level client;
//! - `--raw-client`: hyper's server, and Desk's side written by hand on the connection's
//!   own socket (the request head in one write, the answer's head parsed with `httparse`
//!   and its `Content-Length` body read whole: bodiless requests and small answers only,
//!   anything else is a 502), to split hyper's cost between its server and its client;
//! - `--raw`: tokio alone, no HTTP library: the client's head parsed with `httparse` in
//!   a buffer, one upstream head written with `Authorization` in place of the client's,
//!   the answer's head parsed and the answer copied back (`Content-Length` bodies only,
//!   no pipelining; anything else closes the connection). The same four socket transfers
//!   as nginx, with as little between them as tokio allows: the floor of any proxy on
//!   tokio (README "Below hyper: tokio alone").

use std::convert::Infallible;
use std::io;
use std::sync::{Arc, Mutex};

use bytes::{Buf, Bytes, BytesMut};
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

const TOKEN: &str = "Zoho-oauthtoken 1000.bare.floor";
const MAX_HEADERS: usize = 64;

/// Which floor runs.
#[derive(Clone, Copy, PartialEq)]
enum Floor {
    Hyper,
    RawClient,
    Raw,
}

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) != Some("serve") {
        return Err("usage: bare_proxy serve --config FILE [--raw-client | --raw]".into());
    }
    let config = match args.iter().position(|a| a == "--config") {
        Some(i) => args.get(i + 1).ok_or("--config needs a file")?,
        None => return Err("usage: bare_proxy serve --config FILE [--raw-client | --raw]".into()),
    };
    let floor = if args.iter().any(|a| a == "--raw") {
        Floor::Raw
    } else if args.iter().any(|a| a == "--raw-client") {
        Floor::RawClient
    } else {
        Floor::Hyper
    };
    let config: toml::Table = std::fs::read_to_string(config)?.parse()?;
    let listen = config
        .get("listen")
        .and_then(|v| v.as_str())
        .unwrap_or("127.0.0.1:8080");
    let upstream: Arc<str> = config
        .get("upstream")
        .and_then(|v| v.as_str())
        .ok_or("upstream is required")?
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
            runtime.block_on(accept(listener, upstream, floor))
        }));
    }
    for thread in threads {
        thread.join().map_err(|_| "a worker panicked")??;
    }
    Ok(())
}

async fn accept(
    listener: std::net::TcpListener,
    upstream: Arc<str>,
    floor: Floor,
) -> Result<(), Error> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let upstream = Arc::clone(&upstream);
        tokio::spawn(async move {
            if floor == Floor::Raw {
                let _ = raw::serve(stream, &upstream).await;
            } else {
                serve_hyper(stream, upstream, floor).await;
            }
        });
    }
}

/// A client connection's own upstream connection, between its requests.
enum Desk {
    Hyper(Option<SendRequest<Incoming>>),
    Raw(Option<TcpStream>),
}

type Answer = hyper::Response<Either<Either<Incoming, Full<Bytes>>, Empty<Bytes>>>;

/// Serves one connection with hyper's server, Desk's side as `floor` says.
async fn serve_hyper(stream: TcpStream, upstream: Arc<str>, floor: Floor) {
    let token = HeaderValue::from_static(TOKEN);
    let desk = Arc::new(Mutex::new(match floor {
        Floor::RawClient => Desk::Raw(None),
        _ => Desk::Hyper(None),
    }));
    let service = service_fn(move |mut req: hyper::Request<Incoming>| {
        let desk = Arc::clone(&desk);
        let upstream = Arc::clone(&upstream);
        let token = token.clone();
        async move {
            // bench/run.sh waits for this before it measures.
            if req.uri().path().starts_with("/_proxy/") {
                return Ok::<Answer, Infallible>(hyper::Response::new(Either::Right(Empty::new())));
            }
            if let Some(path) = req.uri().path_and_query().cloned() {
                *req.uri_mut() = path.into();
            }
            req.headers_mut().insert(http::header::AUTHORIZATION, token);
            match forward(&desk, &upstream, req).await {
                Ok(response) => Ok(response.map(Either::Left)),
                Err(_) => {
                    let mut bad_gateway = hyper::Response::new(Either::Right(Empty::new()));
                    *bad_gateway.status_mut() = http::StatusCode::BAD_GATEWAY;
                    Ok(bad_gateway)
                }
            }
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

async fn forward(
    desk: &Mutex<Desk>,
    upstream: &str,
    req: hyper::Request<Incoming>,
) -> Result<hyper::Response<Either<Incoming, Full<Bytes>>>, Error> {
    let taken = match &mut *desk.lock().map_err(|_| "poisoned")? {
        Desk::Hyper(sender) => Desk::Hyper(sender.take()),
        Desk::Raw(stream) => Desk::Raw(stream.take()),
    };
    match taken {
        Desk::Hyper(sender) => {
            let mut send = match sender {
                Some(send) if !send.is_closed() => send,
                _ => {
                    let stream = connect(upstream).await?;
                    let (send, conn) =
                        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                    tokio::spawn(conn);
                    send
                }
            };
            send.ready().await?;
            let response = send.send_request(req);
            *desk.lock().map_err(|_| "poisoned")? = Desk::Hyper(Some(send));
            Ok(response.await?.map(Either::Left))
        }
        Desk::Raw(stream) => {
            let stream = match stream {
                Some(stream) => stream,
                None => connect(upstream).await?,
            };
            let (response, stream) = raw_exchange(stream, &req).await?;
            *desk.lock().map_err(|_| "poisoned")? = Desk::Raw(Some(stream));
            Ok(response.map(Either::Right))
        }
    }
}

async fn connect(upstream: &str) -> io::Result<TcpStream> {
    let stream = TcpStream::connect(upstream).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One request and its answer on `stream`, by hand: the head written in one write, the
/// answer's head parsed with `httparse` and its `Content-Length` body read whole. Gives
/// the connection back with the answer.
async fn raw_exchange(
    mut stream: TcpStream,
    req: &hyper::Request<Incoming>,
) -> Result<(hyper::Response<Full<Bytes>>, TcpStream), Error> {
    use hyper::body::Body as _;
    if req.body().size_hint().upper() != Some(0) {
        return Err("--raw-client forwards bodiless requests only".into());
    }
    let mut head = Vec::with_capacity(512);
    head.extend_from_slice(req.method().as_str().as_bytes());
    head.push(b' ');
    let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in req.headers() {
        raw::header_line(&mut head, name.as_str(), value.as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    stream.write_all(&head).await?;

    let mut buf = BytesMut::with_capacity(4096);
    loop {
        if stream.read_buf(&mut buf).await? == 0 {
            return Err("Desk closed the connection".into());
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut headers);
        let httparse::Status::Complete(len) = parsed.parse(&buf)? else {
            continue;
        };
        let length = raw::content_length(parsed.headers)?;
        let mut response = hyper::Response::builder().status(parsed.code.unwrap_or(502));
        for header in parsed.headers.iter() {
            if !header.name.eq_ignore_ascii_case("content-length") {
                response = response.header(header.name, header.value);
            }
        }
        let length = usize::try_from(length)?;
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

/// `--raw`: a proxy on tokio alone.
mod raw {
    use super::*;

    const READY: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";

    /// What a parsed head tells the copy loop.
    struct Head {
        /// Bytes of the head in the buffer.
        len: usize,
        /// `Content-Length`, 0 when absent.
        body: u64,
    }

    /// What the client asked.
    enum Asked {
        /// bench/run.sh's readiness check (`/_proxy/…`), answered here.
        Ready(usize),
        /// A request for the upstream, whose head is in `out`.
        Forward(Head),
    }

    fn closed() -> io::Error {
        io::Error::new(io::ErrorKind::UnexpectedEof, "closed")
    }

    fn bad(what: &'static str) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, what)
    }

    pub(super) fn header_line(out: &mut Vec<u8>, name: &str, value: &[u8]) {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }

    /// `Content-Length`, 0 when absent; chunked bodies are refused.
    pub(super) fn content_length(headers: &[httparse::Header<'_>]) -> io::Result<u64> {
        let mut length = 0;
        for header in headers {
            if header.name.eq_ignore_ascii_case("transfer-encoding") {
                return Err(bad("chunked bodies are not supported"));
            }
            if header.name.eq_ignore_ascii_case("content-length") {
                length = std::str::from_utf8(header.value)
                    .ok()
                    .and_then(|v| v.trim().parse().ok())
                    .ok_or(bad("bad content-length"))?;
            }
        }
        Ok(length)
    }

    /// Reads until `buf` holds a whole request head, and writes Desk's version of it
    /// into `out`.
    async fn read_request(
        client: &mut TcpStream,
        buf: &mut BytesMut,
        out: &mut Vec<u8>,
    ) -> io::Result<Option<Asked>> {
        loop {
            if !buf.is_empty() {
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut request = httparse::Request::new(&mut headers);
                if let httparse::Status::Complete(len) =
                    request.parse(buf).map_err(|_| bad("bad request head"))?
                {
                    let path = request.path.unwrap_or("/");
                    if path.starts_with("/_proxy/") {
                        return Ok(Some(Asked::Ready(len)));
                    }
                    out.clear();
                    out.extend_from_slice(request.method.unwrap_or("GET").as_bytes());
                    out.push(b' ');
                    out.extend_from_slice(path.as_bytes());
                    out.extend_from_slice(b" HTTP/1.1\r\n");
                    for header in request.headers.iter() {
                        if !header.name.eq_ignore_ascii_case("authorization") {
                            header_line(out, header.name, header.value);
                        }
                    }
                    header_line(out, "Authorization", TOKEN.as_bytes());
                    out.extend_from_slice(b"\r\n");
                    let body = content_length(request.headers)?;
                    return Ok(Some(Asked::Forward(Head { len, body })));
                }
            }
            if client.read_buf(buf).await? == 0 {
                return Ok(None);
            }
        }
    }

    /// Copies `length` bytes from `from` to `to`, starting with what `buf` already holds.
    async fn copy_body(
        from: &mut TcpStream,
        to: &mut TcpStream,
        buf: &mut BytesMut,
        mut length: u64,
    ) -> io::Result<()> {
        while length > 0 {
            if buf.is_empty() && from.read_buf(buf).await? == 0 {
                return Err(closed());
            }
            let take = buf.len().min(usize::try_from(length).unwrap_or(usize::MAX));
            to.write_all(&buf[..take]).await?;
            buf.advance(take);
            length -= take as u64;
        }
        Ok(())
    }

    /// Serves one client connection to its end.
    pub(super) async fn serve(mut client: TcpStream, upstream: &str) -> io::Result<()> {
        let mut desk: Option<TcpStream> = None;
        let mut from_client = BytesMut::with_capacity(8192);
        let mut from_desk = BytesMut::with_capacity(8192);
        let mut head = Vec::with_capacity(1024);
        while let Some(asked) = read_request(&mut client, &mut from_client, &mut head).await? {
            let request = match asked {
                Asked::Ready(len) => {
                    from_client.advance(len);
                    client.write_all(READY).await?;
                    continue;
                }
                Asked::Forward(request) => request,
            };
            from_client.advance(request.len);
            let stream = match desk.as_mut() {
                Some(stream) => stream,
                None => desk.insert(connect(upstream).await?),
            };
            stream.write_all(&head).await?;
            copy_body(&mut client, stream, &mut from_client, request.body).await?;
            let answer = loop {
                if !from_desk.is_empty() {
                    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    let mut response = httparse::Response::new(&mut headers);
                    if let httparse::Status::Complete(len) = response
                        .parse(&from_desk)
                        .map_err(|_| bad("bad answer head"))?
                    {
                        break Head {
                            len,
                            body: content_length(response.headers)?,
                        };
                    }
                }
                if stream.read_buf(&mut from_desk).await? == 0 {
                    return Err(closed());
                }
            };
            // The head and what came with it of the body, in one write.
            let first = from_desk
                .len()
                .min(answer.len + usize::try_from(answer.body).unwrap_or(usize::MAX));
            client.write_all(&from_desk[..first]).await?;
            from_desk.advance(first);
            let rest = answer.body - (first - answer.len) as u64;
            copy_body(stream, &mut client, &mut from_desk, rest).await?;
        }
        Ok(())
    }
}
