//! The floor under the floor: a proxy on tokio alone, without hyper, for `bench/run.sh` to
//! measure against nginx (README "Performance" → "Below hyper: tokio alone").
//!
//!     cargo build --release --example raw_floor
//!     SCENARIOS="c64 c1" BASELINE_BIN=target/release/examples/raw_floor bash bench/run.sh
//!
//! Started as `raw_floor serve --config FILE` (it reads only `listen` and a plain `http://`
//! `upstream`), it runs one single-threaded runtime per core like the product, and gives
//! each client connection one upstream connection of its own. Per request it reads the
//! client's head into a buffer, parses it with `httparse`, writes one upstream head with
//! `Authorization` in place of the client's, reads the answer's head, and copies the
//! answer (`Content-Length` bodies only) back: the same four socket transfers as nginx,
//! with as little user-space work between them as tokio allows. No chunked bodies, no
//! pipelining, no limits, no timeouts, no errors but a close: not a proxy to use, a
//! measure of what any tokio proxy must pay on this machine.

use std::io;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Error = Box<dyn std::error::Error + Send + Sync>;

const TOKEN: &[u8] = b"Authorization: Zoho-oauthtoken 1000.raw.floor\r\n";
const READY: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
const MAX_HEADERS: usize = 64;

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) != Some("serve") {
        return Err("usage: raw_floor serve --config FILE (nothing else)".into());
    }
    let config = match args.iter().position(|a| a == "--config") {
        Some(i) => args.get(i + 1).ok_or("--config needs a file")?,
        None => return Err("usage: raw_floor serve --config FILE".into()),
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
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let upstream = Arc::clone(&upstream);
                    tokio::spawn(async move {
                        let _ = serve(stream, &upstream).await;
                    });
                }
            })
        }));
    }
    for thread in threads {
        thread.join().map_err(|_| "a worker panicked")??;
    }
    Ok(())
}

/// What a parsed head tells the copy loop.
struct Head {
    /// Bytes of the head in the buffer.
    len: usize,
    /// `Content-Length`, 0 when absent.
    body: u64,
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "closed")
}

fn bad(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

fn content_length(headers: &[httparse::Header<'_>]) -> io::Result<u64> {
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

/// What the client asked.
enum Asked {
    /// bench/run.sh's readiness check (`/_proxy/…`), answered here.
    Ready(usize),
    /// A request for the upstream, whose head is in `out`.
    Forward(Head),
}

/// Reads until `buf` holds a whole request head, and writes Desk's version of it into `out`.
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
                    if header.name.eq_ignore_ascii_case("authorization") {
                        continue;
                    }
                    out.extend_from_slice(header.name.as_bytes());
                    out.extend_from_slice(b": ");
                    out.extend_from_slice(header.value);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(TOKEN);
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

async fn serve(mut client: TcpStream, upstream: &str) -> io::Result<()> {
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
            None => {
                let stream = TcpStream::connect(upstream).await?;
                stream.set_nodelay(true)?;
                desk.insert(stream)
            }
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
