//! Memory stays bounded whatever clients send, read from the built binary's `/proc`:
//! - bodies stream both ways (README "How requests are forwarded"): 1 GiB down and 1 GiB
//!   up keep the peak flat;
//! - bodies held for a 401 replay stay within `limits.buffered_body_bytes`, however many
//!   HTTP/2 streams declare one and stall.
//!
//! `cargo test --test memory -- --nocapture` prints the throughput each way and the
//! peaks; `bench/stream.sh` runs the streaming case against the release binary.
#![cfg(target_os = "linux")]

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use support::binary::*;
use support::client;
use zoho_desk_proxy::fake_zoho::FakeZoho;

const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;
/// Sent with a `Content-Length`, well over `limits.replay_body_bytes` (1 MiB by default),
/// so it takes the sized, non-replayable streaming path.
const SIZED_UPLOAD: u64 = 256 * MIB;
/// The bound held here (README "How requests are forwarded": flat memory).
const MAX_PEAK_RSS: u64 = 64 * MIB;
/// Size of each generated upload chunk.
const CHUNK: usize = 64 * 1024;
/// Period of the fake's pattern: byte `i` is `(i % 251) as u8`.
const PERIOD: u64 = 251;
/// A stall fails the test instead of hanging it.
const STALL_LIMIT: Duration = Duration::from_secs(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_1_gib_each_way_keeps_the_proxy_under_64_mib() {
    let fake = FakeZoho::start().await.unwrap();
    let zoho = fake.control();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &fake, true, "", "");
    let Serving { child, addr } = serve(dir.path(), &config).await;
    let pid = child.id().expect("running");
    let base = format!("http://{addr}");
    let client = client();

    let (started_hwm, _) = peak_and_current_rss(pid);
    let (down, up, sized) = tokio::time::timeout(STALL_LIMIT, async {
        let down = download(&client, &base, GIB).await;
        let up = upload(&client, &base, GIB, false).await;
        let sized = upload(&client, &base, SIZED_UPLOAD, true).await;
        (down, up, sized)
    })
    .await
    .expect("the transfers finish");

    // What reached Desk: the unsized upload without a length, the sized one with it.
    let uploads: Vec<_> = zoho
        .desk_requests()
        .into_iter()
        .filter(|r| r.path_and_query == "/api/v1/upload")
        .collect();
    assert_eq!(uploads.len(), 2, "one attempt per upload");
    assert_eq!(uploads[0].body_len, GIB);
    assert!(!uploads[0].headers.contains_key("content-length"));
    assert_eq!(uploads[1].body_len, SIZED_UPLOAD);
    assert_eq!(
        uploads[1].headers["content-length"],
        SIZED_UPLOAD.to_string().as_str()
    );

    // Read before stopping: /proc/<pid> goes away with the process.
    let (hwm, rss) = peak_and_current_rss(pid);
    println!(
        "download 1 GiB: {:.1} s, {:.0} MiB/s",
        down.as_secs_f64(),
        mib_per_s(GIB, down)
    );
    println!(
        "upload 1 GiB (chunked): {:.1} s, {:.0} MiB/s",
        up.as_secs_f64(),
        mib_per_s(GIB, up)
    );
    println!(
        "upload 256 MiB (Content-Length): {:.1} s, {:.0} MiB/s",
        sized.as_secs_f64(),
        mib_per_s(SIZED_UPLOAD, sized)
    );
    println!(
        "proxy VmHWM {:.1} MiB (at start {:.1} MiB, VmRSS now {:.1} MiB), limit {} MiB",
        hwm as f64 / MIB as f64,
        started_hwm as f64 / MIB as f64,
        rss as f64 / MIB as f64,
        MAX_PEAK_RSS / MIB
    );
    assert!(
        hwm < MAX_PEAK_RSS,
        "the proxy's peak resident memory is {hwm} bytes (VmHWM), over {MAX_PEAK_RSS}"
    );

    sigterm(&child);
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("the proxy exits after SIGTERM")
        .unwrap()
        .status;
    assert_eq!(status.code(), Some(0), "{status:?}");
}

/// HTTP/2 streams per connection in the replay-budget test (the proxy's most).
const STREAMS: usize = 256;
/// HTTP/2 connections in the replay-budget test.
const H2_CONNECTIONS: usize = 4;
/// `limits.buffered_body_bytes` in the replay-budget test.
const BUDGET: u64 = 16 * MIB;
/// What the proxy may hold beyond the budget with 1024 streams open: its idle footprint
/// (~8 MiB), per-stream state, and HTTP/2 flow-control windows (256 KiB a connection).
const FOOTPRINT: u64 = 40 * MIB;

/// 4 HTTP/2 connections × 256 streams, each declaring a 1 MiB body (replayable by size)
/// and sending all of it but its last byte: without a process-wide budget the proxy
/// would hold 1 GiB; with one, the budget plus its footprint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_h2_bodies_stay_within_the_replay_budget() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use http_body_util::{BodyExt, StreamBody};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let fake = FakeZoho::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let limits = format!(
        "[limits]\nbuffered_body_bytes = {BUDGET}\nmax_upstream_requests = 4\nworkers = 1\n[timeouts]\nbody_read_secs = 120\nheader_read_secs = 120"
    );
    let config = write_config(dir.path(), &fake, true, "", &limits);
    let Serving { child, addr } = serve(dir.path(), &config).await;
    let pid = child.id().expect("running");

    let (started_hwm, _) = peak_and_current_rss(pid);

    let declared = MIB;
    let sent = Arc::new(AtomicU64::new(0));
    let mut connections = Vec::new();
    let mut requests = Vec::new();
    for _ in 0..H2_CONNECTIONS {
        let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .expect("h2 handshake");
        connections.push(tokio::spawn(connection));
        for _ in 0..STREAMS {
            let mut sender = sender.clone();
            let sent = Arc::clone(&sent);
            // All but the last byte, in 16 KiB frames, then silence.
            let chunk = Bytes::from(vec![b'x'; 16 * 1024]);
            let frames = (declared - 1).div_ceil(chunk.len() as u64);
            let body = futures_util::stream::unfold(0u64, move |i| {
                let chunk = chunk.clone();
                let sent = Arc::clone(&sent);
                async move {
                    if i == frames {
                        futures_util::future::pending::<()>().await;
                    }
                    let len = if i + 1 == frames {
                        (declared - 1) as usize - (frames as usize - 1) * chunk.len()
                    } else {
                        chunk.len()
                    };
                    sent.fetch_add(len as u64, Ordering::Relaxed);
                    Some((
                        Ok::<_, std::convert::Infallible>(http_body::Frame::data(
                            chunk.slice(..len),
                        )),
                        i + 1,
                    ))
                }
            });
            let request = http::Request::post(format!("http://{addr}/api/v1/upload"))
                .header("content-length", declared)
                .body(StreamBody::new(body).boxed())
                .unwrap();
            requests.push(tokio::spawn(async move {
                let _ = sender.send_request(request).await;
            }));
        }
    }
    // Held bodies (the budget), the 4 streaming to Desk, and what HTTP/2 windows admit:
    // wait until at least the first two have arrived in full.
    let expected = BUDGET + 4 * (declared - 1);
    tokio::time::timeout(STALL_LIMIT, async {
        while sent.load(Ordering::Relaxed) < expected - MIB {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the streams sent their bodies");
    // Let whatever else the windows admit arrive too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (hwm, rss) = peak_and_current_rss(pid);
    println!(
        "{H2_CONNECTIONS} h2 connections × {STREAMS} streams × 1 MiB declared: {:.1} MiB sent; proxy VmHWM {:.1} MiB (at start {:.1} MiB, VmRSS now {:.1} MiB), budget {} MiB",
        sent.load(Ordering::Relaxed) as f64 / MIB as f64,
        hwm as f64 / MIB as f64,
        started_hwm as f64 / MIB as f64,
        rss as f64 / MIB as f64,
        BUDGET / MIB
    );
    assert!(
        hwm < BUDGET + FOOTPRINT,
        "the proxy's peak resident memory is {hwm} bytes, over the budget {BUDGET} + {FOOTPRINT}"
    );

    // The attackers leave; the proxy serves the next client.
    for task in requests.into_iter().chain(connections.into_iter().map(|c| {
        tokio::spawn(async move {
            c.abort();
        })
    })) {
        task.abort();
    }
    assert_eq!(
        support::status(format!("http://{addr}/api/v1/tickets")).await,
        200
    );
    sigterm(&child);
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("the proxy exits after SIGTERM")
        .unwrap()
        .status;
    assert_eq!(status.code(), Some(0), "{status:?}");
}

/// Downloads `size` bytes as a stream, counting them and checking a sample of the
/// pattern in every chunk; returns how long it took.
async fn download(client: &reqwest::Client, base: &str, size: u64) -> Duration {
    let started = Instant::now();
    let mut response = client
        .get(format!("{base}/api/v1/download?bytes={size}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut offset: u64 = 0;
    while let Some(chunk) = response.chunk().await.unwrap() {
        for i in [0, chunk.len() / 2, chunk.len().saturating_sub(1)] {
            if let Some(&byte) = chunk.get(i) {
                let at = offset + i as u64;
                assert_eq!(byte, (at % PERIOD) as u8, "byte {at} of the download");
            }
        }
        offset += chunk.len() as u64;
    }
    let elapsed = started.elapsed();
    assert_eq!(offset, size, "bytes downloaded");
    elapsed
}

/// Uploads `size` bytes generated on the fly in 64 KiB chunks, with a `Content-Length`
/// when `sized` (else chunked); returns how long it took.
async fn upload(client: &reqwest::Client, base: &str, size: u64, sized: bool) -> Duration {
    assert_eq!(size % CHUNK as u64, 0);
    // One chunk of the pattern, shared by every frame: nothing grows with `size`.
    let chunk = Bytes::from(
        (0..CHUNK as u64)
            .map(|i| (i % PERIOD) as u8)
            .collect::<Vec<u8>>(),
    );
    let frames = futures_util::stream::iter(
        (0..size / CHUNK as u64).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
    );
    let mut request = client
        .post(format!("{base}/api/v1/upload"))
        .body(reqwest::Body::wrap_stream(frames));
    if sized {
        request = request.header("content-length", size);
    }
    let started = Instant::now();
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    let answer: serde_json::Value = response.json().await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(answer, serde_json::json!({ "bytes": size }));
    elapsed
}

/// `VmHWM` and `VmRSS` of `pid`, in bytes.
fn peak_and_current_rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"));
        let kb = line.trim().trim_end_matches("kB").trim();
        kb.parse::<u64>().unwrap() * 1024
    };
    (field("VmHWM:"), field("VmRSS:"))
}

fn mib_per_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / MIB as f64 / took.as_secs_f64()
}

// The helpers below are small copies of those in tests/cli.rs.

/// Connections of the in-flight test: each holds one request while it is measured.
const IN_FLIGHT: usize = 300;
/// What one more request in flight may add to the proxy's memory: its future, log and
/// budgets, a little over 2 KiB, and slack for the allocator. A second 8 KiB read buffer
/// per request (hyper's, when the head still refers to the first one: README
/// "Performance", "A request head of its own") would go over it.
const PER_REQUEST_IN_FLIGHT: u64 = 6 * 1024;

/// 300 kept-alive connections, each of which has already been answered once, send a
/// request that waits (at Desk, or for one of Desk's calls): the memory that adds, per
/// request, stays under 6 KiB. Each request's head (URI and header values, ~300 bytes)
/// is copied out of its connection's read buffer, so that hyper, which keeps reading the
/// connection for a client leaving, does not allocate a second buffer for every request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_does_not_hold_a_second_read_buffer() {
    use hyper_util::rt::TokioIo;

    let fake = FakeZoho::start().await.unwrap();
    let zoho = fake.control();
    let dir = tempfile::tempdir().unwrap();
    let limits = "[limits]\nworkers = 1\n[timeouts]\nheader_read_secs = 300\nresponse_secs = 300";
    let config = write_config(dir.path(), &fake, true, "", limits);
    let serving = serve(dir.path(), &config).await;
    let pid = serving.child.id().expect("running");
    let addr = serving.addr;
    let request = move || {
        http::Request::get("/api/v1/tickets?from=0&limit=50&sortBy=createdTime")
            .header("host", addr.to_string())
            .header("orgid", "60001234567")
            .header(
                "user-agent",
                "memory-test/1.0 (in-flight requests and read buffers)",
            )
            .header("accept", "application/json")
            .header(
                "x-trace",
                "0123456789abcdef0123456789abcdef0123456789abcdef",
            )
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap()
    };

    // Every connection answered once: each has its read buffer, and the proxy its
    // connection to Desk.
    let mut senders = Vec::new();
    for _ in 0..IN_FLIGHT {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(connection);
        let answer = sender.send_request(request()).await.unwrap();
        assert_eq!(answer.status(), 200);
        http_body_util::BodyExt::collect(answer.into_body())
            .await
            .unwrap();
        senders.push(sender);
    }
    let (_, before) = peak_and_current_rss(pid);

    // Now each sends one that waits.
    zoho.set_desk_delay(Duration::from_secs(600));
    let waiting: Vec<_> = senders
        .into_iter()
        .map(|mut sender| tokio::spawn(async move { sender.send_request(request()).await }))
        .collect();
    let in_flight = |text: &str| -> Option<usize> {
        text.lines()
            .find_map(|l| l.strip_prefix("zoho_proxy_in_flight_requests "))
            .and_then(|n| n.parse().ok())
    };
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let text = support::fetch(serving.url("/_proxy/metrics"))
                .await
                .text()
                .await
                .unwrap_or_default();
            if in_flight(&text).is_some_and(|n| n >= IN_FLIGHT) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("every request reached the proxy");
    let (_, during) = peak_and_current_rss(pid);
    let per_request = during.saturating_sub(before) / IN_FLIGHT as u64;
    println!(
        "{IN_FLIGHT} requests in flight: VmRSS {:.1} → {:.1} MiB, {per_request} bytes per request",
        before as f64 / MIB as f64,
        during as f64 / MIB as f64,
    );
    assert!(
        per_request < PER_REQUEST_IN_FLIGHT,
        "a request in flight costs {per_request} bytes, over {PER_REQUEST_IN_FLIGHT}"
    );
    for task in waiting {
        task.abort();
    }
}

/// A connection that counts the bytes written to it.
struct Counted {
    inner: tokio::net::TcpStream,
    written: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &polled {
            self.written
                .fetch_add(*n as u64, std::sync::atomic::Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// HTTP/2 uploads waiting in Desk's line are not read: a client may send of them only what
/// the proxy's flow-control windows admit (README "Limits": 64 KiB a stream, 256 KiB a
/// connection), as an HTTP/1 connection holds no more than its read buffer. With hyper's
/// default windows (1 MiB) 400 such connections grew the proxy by 400 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_uploads_waiting_in_line_hold_no_more_than_their_windows() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use http_body_util::{BodyExt, StreamBody};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    const CONNECTIONS: u64 = 8;
    const STREAMS: u64 = 8;
    const FRAME: usize = 16 * 1024;
    const CONNECTION_WINDOW: u64 = 256 * 1024;

    let fake = FakeZoho::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let limits = "[limits]\nmax_upstream_requests = 1\nworkers = 1\n[timeouts]\nbody_read_secs = 120\nheader_read_secs = 120";
    let config = write_config(dir.path(), &fake, true, "", limits);
    let serving = serve(dir.path(), &config).await;
    let addr = serving.addr;
    // Desk's one call is taken (its answer's body takes a minute): every upload waits.
    let held = client()
        .get(serving.url("/api/v1/slow-body?ms=60000"))
        .send()
        .await
        .unwrap();
    assert_eq!(held.status(), 200);

    // Bytes on the wire: HTTP/2 lets no DATA past the windows the proxy gave.
    let written = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        let stream = Counted {
            inner: tokio::net::TcpStream::connect(addr).await.unwrap(),
            written: Arc::clone(&written),
        };
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .expect("h2 handshake");
        tasks.push(tokio::spawn(async move {
            let _ = connection.await;
        }));
        for _ in 0..STREAMS {
            let mut sender = sender.clone();
            let frame = Bytes::from(vec![b'x'; FRAME]);
            // 10 MiB declared, sent as fast as flow control lets it go.
            let body = futures_util::stream::repeat_with(move || {
                Ok::<_, std::convert::Infallible>(http_body::Frame::data(frame.clone()))
            });
            let request = http::Request::post(format!("http://{addr}/api/v1/upload"))
                .header("content-length", 10 * MIB)
                .body(StreamBody::new(body).boxed())
                .unwrap();
            tasks.push(tokio::spawn(async move {
                let _ = sender.send_request(request).await;
            }));
        }
    }
    // Every connection's window fills; then let whatever else they admit arrive.
    tokio::time::timeout(STALL_LIMIT, async {
        while written.load(Ordering::Relaxed) < CONNECTIONS * CONNECTION_WINDOW {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the uploads sent what their windows admit");
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The windows, and for the frames' and heads' own bytes 4 KiB a stream.
    let most = CONNECTIONS * (CONNECTION_WINDOW + STREAMS * 4096);
    let total = written.load(Ordering::Relaxed);
    println!(
        "{CONNECTIONS} h2 connections × {STREAMS} uploads waiting in line: {:.2} MiB written (at most {:.2} MiB)",
        total as f64 / MIB as f64,
        most as f64 / MIB as f64
    );
    assert!(total <= most, "{total} bytes written, more than {most}");
    for task in tasks {
        task.abort();
    }
    drop(held);
    sigterm(&serving.child);
}
