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
//!   and its body read whole), to split hyper's cost between its server and its client.
//!   Bodiless requests and answers of at most 1 MiB with a `Content-Length` (none for a
//!   HEAD, 204 or 304) only; anything else is a 502;
//! - `--raw`: tokio alone, no HTTP library: the client's head parsed with `httparse` in
//!   a buffer, one upstream head written with `Authorization` in place of the client's,
//!   the answer's head parsed and the answer copied back, requests one after the other
//!   (pipelined ones in order). The same four socket transfers as nginx, with as little
//!   between them as tokio allows: a floor for any proxy on tokio (README "Below hyper:
//!   tokio alone"). Bodies with a `Content-Length` only; a chunked body, an answer with
//!   no length, an interim (1xx) answer or a head of more than 64 fields closes the
//!   connection.
//!
//! Both hand-written sides honour `Connection: close`.

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
/// Header fields parsed per head (more: the connection is closed, or a 502).
const PARSE_HEADERS: usize = 64;
/// The largest answer `--raw-client` reads whole (more: a 502).
const MAX_RAW_ANSWER: usize = 1 << 20;

/// Which floor runs.
#[derive(Clone, Copy, PartialEq)]
enum Floor {
    Hyper,
    RawClient,
    Raw,
}

fn main() -> Result<(), Error> {
    const USAGE: &str = "usage: bare_proxy serve --config FILE [--raw-client | --raw]";
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() != Some("serve") {
        return Err(USAGE.into());
    }
    let (mut config, mut floor) = (None, None);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" => config = Some(args.next().ok_or("--config needs a file")?),
            "--raw-client" | "--raw" if floor.is_some() => return Err(USAGE.into()),
            "--raw-client" => floor = Some(Floor::RawClient),
            "--raw" => floor = Some(Floor::Raw),
            _ => return Err(format!("{arg}? {USAGE}").into()),
        }
    }
    let config = config.ok_or(USAGE)?;
    let floor = floor.unwrap_or(Floor::Hyper);
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
            // Out of file descriptors, say: let connections end before trying again.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
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
            *desk.lock().map_err(|_| "poisoned")? = Desk::Raw(stream);
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
/// the connection back with the answer, unless Desk said it closes it.
async fn raw_exchange(
    mut stream: TcpStream,
    req: &hyper::Request<Incoming>,
) -> Result<(hyper::Response<Full<Bytes>>, Option<TcpStream>), Error> {
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
    let to_head = req.method() == http::Method::HEAD;
    let mut response = hyper::Response::builder();
    let answer = loop {
        if stream.read_buf(&mut buf).await? == 0 {
            return Err("Desk closed the connection".into());
        }
        let parsed = raw::parse_answer(&buf, to_head, |parsed| {
            let mut builder = hyper::Response::builder().status(parsed.code.unwrap_or(502));
            for header in parsed.headers.iter() {
                if !header.name.eq_ignore_ascii_case("content-length") {
                    builder = builder.header(header.name, header.value);
                }
            }
            response = builder;
        })?;
        if let Some(answer) = parsed {
            break answer;
        }
    };
    let length = usize::try_from(answer.body)
        .ok()
        .filter(|length| *length <= MAX_RAW_ANSWER)
        .ok_or("--raw-client reads small answers only")?;
    while buf.len() < answer.len + length {
        if stream.read_buf(&mut buf).await? == 0 {
            return Err("Desk closed the connection mid-answer".into());
        }
    }
    let mut body = buf.split_off(answer.len);
    body.truncate(length);
    let stream = (!answer.close).then_some(stream);
    Ok((response.body(Full::new(body.freeze()))?, stream))
}

/// `--raw`: a proxy on tokio alone.
mod raw {
    use super::*;

    const READY: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";

    /// What a parsed head tells the copy loop.
    pub(super) struct Head {
        /// Bytes of the head in the buffer.
        pub(super) len: usize,
        /// Bytes of the body after it.
        pub(super) body: u64,
        /// Whether it said `Connection: close`.
        pub(super) close: bool,
    }

    /// What the client asked.
    enum Asked {
        /// bench/run.sh's readiness check (`/_proxy/…`), answered here.
        Ready(Head),
        /// A request for the upstream, whose head is in `out`; whether it is a HEAD.
        Forward(Head, bool),
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

    /// `Content-Length`, if given; chunked bodies are refused.
    fn content_length(headers: &[httparse::Header<'_>]) -> io::Result<Option<u64>> {
        let mut length = None;
        for header in headers {
            if header.name.eq_ignore_ascii_case("transfer-encoding") {
                return Err(bad("chunked bodies are not supported"));
            }
            if header.name.eq_ignore_ascii_case("content-length") {
                length = Some(
                    std::str::from_utf8(header.value)
                        .ok()
                        .and_then(|v| v.trim().parse().ok())
                        .ok_or(bad("bad content-length"))?,
                );
            }
        }
        Ok(length)
    }

    fn says_close(headers: &[httparse::Header<'_>]) -> bool {
        headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case("connection")
                && h.value
                    .split(|b| *b == b',')
                    .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"))
        })
    }

    /// Parses an answer's head at the start of `buf` (`None`: not all of it is there
    /// yet), showing it to `look`. An answer to a HEAD, a 204 or a 304 has no body;
    /// any other needs a `Content-Length` here (no reading to the close), and interim
    /// (1xx) answers are not supported.
    pub(super) fn parse_answer(
        buf: &[u8],
        to_head: bool,
        look: impl FnOnce(&httparse::Response<'_, '_>),
    ) -> io::Result<Option<Head>> {
        let mut headers = [httparse::EMPTY_HEADER; PARSE_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        let httparse::Status::Complete(len) =
            response.parse(buf).map_err(|_| bad("bad answer head"))?
        else {
            return Ok(None);
        };
        let code = response.code.unwrap_or(0);
        if code < 200 {
            return Err(bad("interim answers are not supported"));
        }
        let body = match content_length(response.headers)? {
            _ if to_head || code == 204 || code == 304 => 0,
            Some(length) => length,
            None => return Err(bad("an answer without Content-Length")),
        };
        look(&response);
        Ok(Some(Head {
            len,
            body,
            close: says_close(response.headers),
        }))
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
                let mut headers = [httparse::EMPTY_HEADER; PARSE_HEADERS];
                let mut request = httparse::Request::new(&mut headers);
                if let httparse::Status::Complete(len) =
                    request.parse(buf).map_err(|_| bad("bad request head"))?
                {
                    let method = request.method.unwrap_or("GET");
                    let head = Head {
                        len,
                        body: content_length(request.headers)?.unwrap_or(0),
                        close: says_close(request.headers),
                    };
                    let path = request.path.unwrap_or("/");
                    if path.starts_with("/_proxy/") {
                        return Ok(Some(Asked::Ready(head)));
                    }
                    out.clear();
                    out.extend_from_slice(method.as_bytes());
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
                    return Ok(Some(Asked::Forward(head, method == "HEAD")));
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

    /// Serves one client connection to its end, its requests one after the other (a
    /// pipelined one waits in the buffer for the answer before it).
    pub(super) async fn serve(mut client: TcpStream, upstream: &str) -> io::Result<()> {
        let mut desk: Option<TcpStream> = None;
        let mut from_client = BytesMut::with_capacity(8192);
        let mut from_desk = BytesMut::with_capacity(8192);
        let mut head = Vec::with_capacity(1024);
        while let Some(asked) = read_request(&mut client, &mut from_client, &mut head).await? {
            let (request, to_head) = match asked {
                Asked::Ready(request) => {
                    from_client.advance(request.len);
                    // The readiness check's body, if any, is not expected.
                    client.write_all(READY).await?;
                    continue;
                }
                Asked::Forward(request, to_head) => (request, to_head),
            };
            from_client.advance(request.len);
            let stream = match desk.as_mut() {
                Some(stream) => stream,
                None => desk.insert(connect(upstream).await?),
            };
            stream.write_all(&head).await?;
            copy_body(&mut client, stream, &mut from_client, request.body).await?;
            let answer = loop {
                if !from_desk.is_empty()
                    && let Some(answer) = parse_answer(&from_desk, to_head, |_| ())?
                {
                    break answer;
                }
                if stream.read_buf(&mut from_desk).await? == 0 {
                    return Err(closed());
                }
            };
            // The head and what came with it of the body, in one write.
            let whole = u64::try_from(answer.len)
                .unwrap_or(u64::MAX)
                .saturating_add(answer.body);
            let first = from_desk
                .len()
                .min(usize::try_from(whole).unwrap_or(usize::MAX));
            client.write_all(&from_desk[..first]).await?;
            from_desk.advance(first);
            let rest = whole - first as u64;
            copy_body(stream, &mut client, &mut from_desk, rest).await?;
            if answer.close {
                desk = None;
                from_desk.clear();
            }
            if request.close {
                return Ok(());
            }
        }
        Ok(())
    }
}
