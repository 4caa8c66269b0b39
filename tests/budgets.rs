//! The bounds on what a client can make the proxy hold (README "Limits"), tried as an
//! attacker would, over HTTP/1.1 and HTTP/2: a body that stalls, a body that breaks, more
//! bodies than the replay budget, HTTP/2 connections left idle, too many header fields,
//! clients that leave or half-close.
//!
//! Each bound answers with its Desk-shaped error (or a closed connection), sends nothing
//! half-done to Desk, and leaves the proxy serving everyone else.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::binary::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use zoho_desk_proxy::Secret;
use zoho_desk_proxy::fake_zoho::{FakeOptions, FakeZoho};

/// Longest the proxy may take to answer or close before the test calls it a hang.
const LIMIT: Duration = Duration::from_secs(5);
/// `timeouts.body_read_secs` in these tests.
const BODY_READ: Duration = Duration::from_millis(400);
/// `timeouts.header_read_secs` (and so the idle time) in these tests.
const IDLE: Duration = Duration::from_millis(500);

type TestBody = BoxBody<Bytes, Infallible>;

/// An h2c (prior knowledge) connection to the proxy; the task ends when the proxy
/// closes the connection.
async fn h2(addr: SocketAddr) -> (SendRequest<TestBody>, JoinHandle<()>) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    (sender, task)
}

/// A request body fed by hand: each `Bytes` sent is a frame; holding the sender stalls
/// the body, dropping it ends the body.
fn fed_body() -> (TestBody, mpsc::Sender<Bytes>) {
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|data| (Ok::<_, Infallible>(Frame::data(data)), rx))
    });
    (StreamBody::new(stream).boxed(), tx)
}

fn empty() -> TestBody {
    Empty::new().boxed()
}

/// Sends `request` on an h2 connection; the status and the JSON body of the answer.
async fn h2_send(
    sender: &mut SendRequest<TestBody>,
    request: http::Request<TestBody>,
) -> (u16, serde_json::Value) {
    timeout(LIMIT, async {
        let response = sender.send_request(request).await.expect("h2 response");
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        (
            status,
            serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        )
    })
    .await
    .expect("no h2 answer in time")
}

fn h2_request(method: &str, addr: SocketAddr, path: &str) -> http::request::Builder {
    http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
}

/// An HTTP/1.1 chunked upload to Desk whose first chunk (`hello`) is sent.
async fn h1_upload(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            b"POST /api/v1/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        )
        .await
        .expect("write");
    stream
}

/// An HTTP/2 upload to Desk with no length whose first part (`hello`) is fed: the
/// request, and the feed for the rest.
async fn h2_upload(addr: SocketAddr) -> (http::Request<TestBody>, mpsc::Sender<Bytes>) {
    let (body, feed) = fed_body();
    feed.send(Bytes::from_static(b"hello")).await.expect("feed");
    let request = h2_request("POST", addr, "/api/v1/upload")
        .body(body)
        .expect("request");
    (request, feed)
}

/// The uploads Desk saw.
fn uploads_at_desk(s: &Scenario) -> Vec<zoho_desk_proxy::fake_zoho::RecordedRequest> {
    s.zoho
        .desk_requests()
        .into_iter()
        .filter(|r| r.path_and_query == "/api/v1/upload")
        .collect()
}

/// Reads from `stream` until the proxy closes it; panics if it stays open past [`LIMIT`].
async fn read_until_closed(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    timeout(LIMIT, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("the proxy kept the connection open");
    String::from_utf8_lossy(&answer).into_owned()
}

/// Waits for an h2 connection's task to end (the proxy closed the connection).
async fn closed_within(task: JoinHandle<()>, limit: Duration) -> bool {
    timeout(limit, task).await.is_ok()
}

async fn assert_still_serving(s: &Scenario) {
    let response = timeout(LIMIT, client().get(s.url("/api/v1/tickets")).send())
        .await
        .expect("a normal request timed out")
        .expect("a normal request failed");
    assert_eq!(response.status(), 200, "a normal request afterwards");
}

fn stalling() -> impl FnOnce(&mut zoho_desk_proxy::config::Config) {
    |c| {
        c.timeouts.body_read = BODY_READ;
        c.max_upstream_requests = 1;
        c.workers = 1;
    }
}

// ---------------------------------------------------------------------------------------
// timeouts.body_read_secs

#[tokio::test]
async fn a_body_that_stalls_while_held_for_replay_gets_408_and_never_reaches_desk() {
    let s = Scenario::with(FakeOptions::default(), stalling()).await;

    // HTTP/1.1: a declared length, a few bytes, then silence.
    let mut stream = TcpStream::connect(s.proxy.addr).await.unwrap();
    let started = Instant::now();
    stream
        .write_all(
            b"POST /api/v1/tickets HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"subj",
        )
        .await
        .unwrap();
    let answer = read_until_closed(&mut stream).await;
    let waited = started.elapsed();
    assert_eq!(raw_status(&answer), 408, "{answer}");
    assert_eq!(raw_json(&answer)["errorCode"], "PROXY_REQUEST_TIMEOUT");
    assert!(waited >= BODY_READ, "answered after {waited:?}");

    // HTTP/2: the same on a stream; the connection is then closed (GOAWAY).
    let (mut sender, connection) = h2(s.proxy.addr).await;
    let (body, feed) = fed_body();
    feed.send(Bytes::from_static(b"{\"subj")).await.unwrap();
    let request = h2_request("POST", s.proxy.addr, "/api/v1/tickets")
        .header("content-length", "100")
        .body(body)
        .unwrap();
    let (status, json) = h2_send(&mut sender, request).await;
    assert_eq!(status, 408, "{json}");
    assert_eq!(json["errorCode"], "PROXY_REQUEST_TIMEOUT");
    assert!(
        closed_within(connection, LIMIT).await,
        "the h2 connection is closed after a stalled body"
    );
    drop(feed);

    assert_eq!(s.zoho.desk_request_count(), 0, "nothing reached Desk");
    assert_still_serving(&s).await;
}

#[tokio::test]
async fn a_body_that_stalls_while_streaming_is_aborted_at_desk_and_frees_its_slot() {
    // One upstream slot: a stalled body that kept it would lock everyone out.
    let s = Scenario::with(FakeOptions::default(), stalling()).await;

    // HTTP/1.1 chunked (no length: it streams).
    let mut stream = h1_upload(s.proxy.addr).await;
    let answer = read_until_closed(&mut stream).await;
    assert_eq!(raw_status(&answer), 408, "{answer}");
    assert_eq!(raw_json(&answer)["errorCode"], "PROXY_REQUEST_TIMEOUT");
    assert_still_serving(&s).await;

    // HTTP/2, a body with no length.
    let (mut sender, connection) = h2(s.proxy.addr).await;
    let (request, feed) = h2_upload(s.proxy.addr).await;
    let (status, json) = h2_send(&mut sender, request).await;
    assert_eq!(status, 408, "{json}");
    assert_eq!(json["errorCode"], "PROXY_REQUEST_TIMEOUT");
    assert!(closed_within(connection, LIMIT).await);
    drop(feed);

    let uploads = uploads_at_desk(&s);
    assert_eq!(uploads.len(), 2, "both streamed to Desk");
    for upload in uploads {
        assert!(!upload.body_complete, "Desk never got a whole body");
    }
    assert_still_serving(&s).await;
}

#[tokio::test]
async fn a_streamed_body_is_not_sent_on_after_the_client_got_a_504() {
    // Desk answers an upload once its body is whole; the proxy waits 400 ms for that.
    let s = Scenario::with(FakeOptions::default(), |c| {
        c.timeouts.response = Duration::from_millis(400);
    })
    .await;

    // HTTP/1.1 chunked: a part, the 504, then the rest and the end of the body.
    let mut stream = h1_upload(s.proxy.addr).await;
    let mut answer = [0u8; 1024];
    let n = timeout(LIMIT, stream.read(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert_eq!(raw_status(&answer), 504, "{answer}");
    let _ = stream.write_all(b"5\r\nworld\r\n0\r\n\r\n").await;
    wait_for_metric(&s.proxy, "zoho_proxy_desk_in_flight 0").await;
    drop(stream);

    // HTTP/2, a body with no length.
    let (mut sender, _connection) = h2(s.proxy.addr).await;
    let (request, feed) = h2_upload(s.proxy.addr).await;
    let (status, json) = h2_send(&mut sender, request).await;
    assert_eq!(status, 504, "{json}");
    let _ = feed.send(Bytes::from_static(b"world")).await;
    drop(feed);
    wait_for_metric(&s.proxy, "zoho_proxy_desk_in_flight 0").await;

    let uploads = uploads_at_desk(&s);
    assert_eq!(uploads.len(), 2, "both streamed to Desk");
    for upload in uploads {
        assert!(
            !upload.body_complete && upload.body_len < 10,
            "Desk got the rest of a body whose client was told 504: {} bytes",
            upload.body_len
        );
    }
    assert_still_serving(&s).await;
}

#[tokio::test]
async fn a_streamed_upload_longer_than_the_response_time_is_not_cut_while_it_moves() {
    // Desk answers an upload once its body is whole; the upload takes several times the
    // 400 ms the proxy waits for Desk, 64 KiB (what counts as moving) every 100 ms.
    let s = Scenario::with(FakeOptions::default(), |c| {
        c.timeouts.response = Duration::from_millis(400);
    })
    .await;
    const PARTS: usize = 15;
    const PART: usize = 64 * 1024;
    let pace = Duration::from_millis(100);
    let part = vec![b'x'; PART];
    let total = 5 + PARTS * PART;

    // HTTP/1.1 chunked.
    let mut stream = h1_upload(s.proxy.addr).await;
    for _ in 0..PARTS {
        tokio::time::sleep(pace).await;
        stream
            .write_all(format!("{PART:x}\r\n").as_bytes())
            .await
            .unwrap();
        stream.write_all(&part).await.unwrap();
        stream.write_all(b"\r\n").await.unwrap();
    }
    stream.write_all(b"0\r\n\r\n").await.unwrap();
    let answer = read_answer(&mut stream).await;
    assert_eq!(raw_status(&answer), 200, "{answer}");
    assert!(answer.contains(&format!("\"bytes\":{total}")), "{answer}");

    // HTTP/2, a body with no length.
    let (mut sender, _connection) = h2(s.proxy.addr).await;
    let (request, feed) = h2_upload(s.proxy.addr).await;
    let answer = tokio::spawn(async move { h2_send(&mut sender, request).await });
    for _ in 0..PARTS {
        tokio::time::sleep(pace).await;
        feed.send(Bytes::from(part.clone())).await.unwrap();
    }
    drop(feed);
    let (status, json) = answer.await.unwrap();
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["bytes"], total);

    let uploads = uploads_at_desk(&s);
    assert_eq!(uploads.len(), 2);
    assert!(
        uploads.iter().all(|u| u.body_complete),
        "Desk got both whole"
    );
}

#[tokio::test]
async fn a_trickling_upload_does_not_hold_desk_s_call_past_the_response_time() {
    // A few bytes every 100 ms never make 64 KiB: Desk's time runs as if the body stood
    // still, and the client gets the 504 after 400 ms.
    let s = Scenario::with(FakeOptions::default(), |c| {
        c.timeouts.response = Duration::from_millis(400);
    })
    .await;
    let pace = Duration::from_millis(100);

    // HTTP/1.1 chunked.
    let stream = h1_upload(s.proxy.addr).await;
    let (mut reader, mut writer) = stream.into_split();
    let trickle = tokio::spawn(async move {
        while writer.write_all(b"5\r\nworld\r\n").await.is_ok() {
            tokio::time::sleep(pace).await;
        }
    });
    let mut answer = [0u8; 1024];
    let n = timeout(LIMIT, reader.read(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert_eq!(raw_status(&answer), 504, "{answer}");
    trickle.abort();

    // HTTP/2, a body with no length.
    let (mut sender, _connection) = h2(s.proxy.addr).await;
    let (request, feed) = h2_upload(s.proxy.addr).await;
    let trickle = tokio::spawn(async move {
        while feed.send(Bytes::from_static(b"world")).await.is_ok() {
            tokio::time::sleep(pace).await;
        }
    });
    let (status, json) = h2_send(&mut sender, request).await;
    assert_eq!(status, 504, "{json}");
    trickle.abort();
    wait_for_metric(&s.proxy, "zoho_proxy_desk_in_flight 0").await;
    assert_still_serving(&s).await;
}

#[tokio::test]
async fn a_desk_answer_that_goes_silent_lets_go_of_its_call() {
    // Desk's head comes at once, then nothing: Desk has the response time for each part
    // its client waits for, then the answer ends in an error and Desk's call is free.
    let s = Scenario::one_desk_call(Duration::from_millis(500)).await;
    for client in [client(), h2c_client()] {
        let answer = client
            .get(s.url("/api/v1/slow-body?ms=60000"))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
        let body = timeout(Duration::from_secs(10), answer.bytes())
            .await
            .expect("cut, not held for Desk's minute");
        assert!(body.is_err(), "the answer ends in an error: {body:?}");
        // Desk's one call is free again.
        let next = timeout(
            Duration::from_secs(10),
            client.get(s.url("/api/v1/tickets")).send(),
        )
        .await
        .expect("Desk's call was given back")
        .unwrap();
        assert_eq!(next.status(), 200);
    }
    wait_for_metric(
        &s.proxy,
        "zoho_proxy_upstream_errors_total{kind=\"body\"} 2",
    )
    .await;
    // An answer that takes longer than that as a whole, its parts coming, is not cut.
    let answer = client()
        .get(s.url("/api/v1/drip?ms=1500&every=100"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.text().await.unwrap().trim(), "{\"ok\":true}");
}

/// Reads an HTTP/1.1 answer whose JSON body ends it.
async fn read_answer(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    timeout(LIMIT, async {
        let mut buf = [0u8; 1024];
        while !answer.ends_with(b"}") && !answer.ends_with(b"}\n") {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&answer));
            answer.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_client_that_stops_taking_its_answer_is_cut_off_and_frees_its_slot() {
    // One upstream slot, and an answer far bigger than the sockets' buffers.
    let s = Scenario::with(FakeOptions::default(), |c| {
        stalling()(c);
        c.timeouts.header_read = IDLE;
    })
    .await;
    let download = "/api/v1/download?bytes=500000000";

    // HTTP/1.1: the head is read, then nothing more.
    let mut stream = TcpStream::connect(s.proxy.addr).await.unwrap();
    stream
        .write_all(format!("GET {download} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = [0u8; 1024];
    let n = stream.read(&mut head).await.unwrap();
    assert!(head[..n].starts_with(b"HTTP/1.1 200"));
    wait_for_metric(&s.proxy, "zoho_proxy_desk_in_flight 1").await;
    // Cut off after BODY_READ of silence (looked at every IDLE): the slot comes back.
    wait_for_metric(&s.proxy, "zoho_proxy_desk_in_flight 0").await;
    wait_for_metric(
        &s.proxy,
        "zoho_proxy_limits_reached_total{limit=\"timeouts.body_read_secs\"} 1",
    )
    .await;
    assert_still_serving(&s).await;
    drop(stream);

    // HTTP/2: the answer's head is taken, its body never, so the stream's flow-control
    // window stays shut; the connection itself stays alive (hyper answers PINGs).
    let (mut sender, connection) = h2(s.proxy.addr).await;
    let request = h2_request("GET", s.proxy.addr, download)
        .body(empty())
        .unwrap();
    let response = timeout(LIMIT, sender.send_request(request))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), 200);
    wait_for_metric(&s.proxy, "zoho_proxy_desk_in_flight 1").await;
    wait_for_metric(&s.proxy, "zoho_proxy_desk_in_flight 0").await;
    assert!(closed_within(connection, LIMIT).await);
    wait_for_metric(
        &s.proxy,
        "zoho_proxy_limits_reached_total{limit=\"timeouts.body_read_secs\"} 2",
    )
    .await;
    drop(response);
    assert_still_serving(&s).await;
}

#[tokio::test]
async fn an_h2_stream_whose_window_stays_shut_lets_go_of_desk_while_its_connection_goes_on() {
    // Two upstream slots: the stalled stream's, and one for the requests that keep the
    // connection busy.
    let s = Scenario::with(FakeOptions::default(), |c| {
        c.timeouts.body_read = BODY_READ;
        c.timeouts.header_read = IDLE;
        c.max_upstream_requests = 2;
        c.workers = 1;
    })
    .await;
    // The client opens one stream's window by 64 KiB only, the connection's by 16 MiB:
    // one stream can stall while the others move.
    let tcp = TcpStream::connect(s.proxy.addr).await.unwrap();
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .adaptive_window(false)
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(16 << 20)
        .handshake::<_, TestBody>(TokioIo::new(tcp))
        .await
        .unwrap();
    let connection = tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut stalled_sender = sender.clone();
    let request = h2_request("GET", s.proxy.addr, "/api/v1/download?bytes=500000000")
        .body(empty())
        .unwrap();
    let stalled = timeout(LIMIT, stalled_sender.send_request(request))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stalled.status(), 200);
    wait_for_metric(&s.proxy, "zoho_proxy_desk_in_flight 1").await;

    // Meanwhile the same connection keeps asking and taking small answers.
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let addr = s.proxy.addr;
    let mut busy_sender = sender;
    let busy = tokio::spawn(async move {
        let mut answered = 0;
        loop {
            let request = h2_request("GET", addr, "/api/v1/tickets")
                .body(empty())
                .unwrap();
            let (status, _) = h2_send(&mut busy_sender, request).await;
            assert_eq!(status, 200, "a request beside the stalled stream");
            answered += 1;
            tokio::select! {
                _ = &mut stopped => return answered,
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    });

    // The stalled stream lets go of Desk (its call, and so its slot)...
    wait_for_metric(&s.proxy, "zoho_proxy_desk_in_flight 0").await;
    wait_for_metric(
        &s.proxy,
        "zoho_proxy_limits_reached_total{limit=\"timeouts.body_read_secs\"} 1",
    )
    .await;
    // ...and the connection stays up, answering: at least one more request after it.
    let before = tokio::time::Instant::now();
    tokio::time::sleep(IDLE * 3).await;
    stop.send(()).unwrap();
    let answered = busy.await.unwrap();
    assert!(
        answered > 10,
        "only {answered} requests answered beside the stall"
    );
    assert!(
        !connection.is_finished(),
        "the connection was dropped {:?} ago",
        before.elapsed()
    );

    // When the client reads on at last, the stream ends in an error, never as if whole.
    let read = timeout(LIMIT, stalled.into_body().collect()).await.unwrap();
    assert!(read.is_err(), "a cut answer must not end as if whole");
    assert_still_serving(&s).await;
}

#[tokio::test]
async fn a_body_that_trickles_within_the_bound_is_forwarded() {
    let s = Scenario::with(FakeOptions::default(), stalling()).await;
    let (mut sender, _connection) = h2(s.proxy.addr).await;
    let (body, feed) = fed_body();
    let request = h2_request("POST", s.proxy.addr, "/api/v1/upload")
        .body(body)
        .unwrap();
    let answer = tokio::spawn(async move { h2_send(&mut sender, request).await });
    // Four pauses of 60 % of the bound: 2.4 × the bound in all, never silent for long.
    for _ in 0..4 {
        feed.send(Bytes::from_static(b"data")).await.unwrap();
        tokio::time::sleep(BODY_READ.mul_f64(0.6)).await;
    }
    drop(feed);
    let (status, json) = answer.await.unwrap();
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["bytes"], 16);
}

// ---------------------------------------------------------------------------------------
// Broken bodies

#[tokio::test]
async fn a_broken_body_is_400_and_not_an_upstream_error() {
    let s = Scenario::start().await;
    let cases: &[(&str, &[u8])] = &[
        (
            "bad chunk size",
            b"POST /api/v1/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZ\r\n",
        ),
        (
            "chunk longer than announced",
            b"POST /api/v1/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "bad chunk size, replayable length",
            b"POST /api/v1/tickets HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\nQ\r\n",
        ),
    ];
    for (case, bytes) in cases {
        let mut stream = TcpStream::connect(s.proxy.addr).await.unwrap();
        stream.write_all(bytes).await.unwrap();
        let answer = read_until_closed(&mut stream).await;
        assert_eq!(raw_status(&answer), 400, "{case}: {answer}");
        assert_eq!(
            raw_json(&answer)["errorCode"],
            "PROXY_BAD_REQUEST",
            "{case}"
        );
    }

    // An early end: a declared length, part of it, and the client's end of stream.
    for path in ["/api/v1/tickets", "/api/v1/upload"] {
        let mut stream = TcpStream::connect(s.proxy.addr).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n0123456789",
            if path.ends_with("upload") {
                5_000_000
            } else {
                100
            }
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.shutdown().await.unwrap();
        let answer = read_until_closed(&mut stream).await;
        assert_eq!(raw_status(&answer), 400, "early end on {path}: {answer}");
        assert_eq!(raw_json(&answer)["errorCode"], "PROXY_BAD_REQUEST");
    }

    let metrics = fetch(s.url("/_proxy/metrics")).await.text().await.unwrap();
    for kind in ["unreachable", "timeout"] {
        let line = format!("zoho_proxy_upstream_errors_total{{kind=\"{kind}\"}} 0");
        assert!(metrics.contains(&line), "{line} missing in\n{metrics}");
    }
    assert!(
        !metrics.contains("status_class=\"5xx\"} 1"),
        "no 5xx was answered:\n{metrics}"
    );
    assert_still_serving(&s).await;
}

// ---------------------------------------------------------------------------------------
// limits.buffered_body_bytes

#[tokio::test]
async fn a_body_over_the_replay_budget_streams_and_only_loses_its_retry() {
    // Room for one 800-byte body at a time.
    let s = Scenario::with(FakeOptions::default(), |c| {
        c.buffered_body_bytes = 1000;
        c.timeouts.body_read = Duration::from_secs(10);
    })
    .await;
    // The first token is in hand: a refresh still out when the tokens are revoked below
    // would bring a valid one, and B's 401 with it.
    wait_for_metric(
        &s.proxy,
        "zoho_proxy_token_refreshes_total{result=\"ok\"} 1",
    )
    .await;
    // A holds the budget: its 800 bytes are declared, 10 sent, the rest withheld.
    let mut a = TcpStream::connect(s.proxy.addr).await.unwrap();
    let body_a = format!("{{\"subject\":\"{}\"}}", "a".repeat(800 - 14));
    assert_eq!(body_a.len(), 800);
    a.write_all(
        format!(
            "POST /api/v1/tickets HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 800\r\nConnection: close\r\n\r\n{}",
            &body_a[..10]
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    wait_for_metric(&s.proxy, "zoho_proxy_buffered_body_bytes 800").await;
    // B does not fit beside A: it streams, so Desk's 401 comes back unretried.
    s.zoho.revoke_all_tokens();
    let body_b = format!("{{\"subject\":\"{}\"}}", "b".repeat(800 - 14));
    let response = client()
        .post(s.url("/api/v1/tickets"))
        .header("content-type", "application/json")
        .body(body_b)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401, "B streamed and lost its retry");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["errorCode"], "INVALID_OAUTH", "Desk's own 401");

    // A completes: it was held, so its own 401 is retried with a new token.
    s.zoho.revoke_all_tokens();
    a.write_all(&body_a.as_bytes()[10..]).await.unwrap();
    let answer = read_until_closed(&mut a).await;
    assert_eq!(raw_status(&answer), 200, "{answer}");
    let metrics = fetch(s.url("/_proxy/metrics")).await.text().await.unwrap();
    assert!(
        metrics.contains("zoho_proxy_limits_reached_total{limit=\"limits.buffered_body_bytes\"} 1"),
        "{metrics}"
    );
}

// ---------------------------------------------------------------------------------------
// Idle HTTP/2 connections, header fields

#[tokio::test]
async fn http2_request_heads_in_progress_are_bounded_for_the_whole_process() {
    // Desk takes one call at a time and answers slowly: the streams wait in line, each
    // holding a head of about 60 KiB (under the 64 KiB and 100-field limits).
    let s = Scenario::with(FakeOptions::default(), |c| {
        c.desk.max_concurrent = 1;
        c.timeouts.response = Duration::from_secs(60);
        c.workers = 1;
    })
    .await;
    s.zoho.set_desk_delay(Duration::from_secs(3));
    let big = "x".repeat(4000);
    let (answers, mut answered) = mpsc::unbounded_channel();
    let mut streams = Vec::new();
    // 600 × ~60 KiB: more than the 32 MiB allowed.
    for _ in 0..3 {
        let (sender, _connection) = h2(s.proxy.addr).await;
        for _ in 0..200 {
            let mut request = h2_request("GET", s.proxy.addr, "/api/v1/tickets");
            for field in 0..15 {
                request = request.header(format!("x-big-{field}"), &big);
            }
            let request = request.body(empty()).unwrap();
            let mut sender = sender.clone();
            let answers = answers.clone();
            streams.push(tokio::spawn(async move {
                let Ok(response) = sender.send_request(request).await else {
                    return;
                };
                let retry_after = response.headers().get("retry-after").is_some();
                let status = response.status().as_u16();
                let body = response.into_body().collect().await.unwrap().to_bytes();
                let json: serde_json::Value =
                    serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                let code = json["errorCode"].as_str().map(str::to_owned);
                let _ = answers.send((status, code, retry_after));
            }));
        }
    }
    // Refused at once, while the others wait in line (and Desk answers one at a time).
    let (status, code, retry_after) = timeout(Duration::from_secs(30), async {
        loop {
            match answered.recv().await {
                Some((200, ..)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("no stream was refused")
    .unwrap();
    assert_eq!((status, code.as_deref()), (503, Some("PROXY_OVERLOADED")));
    assert!(retry_after, "503 without Retry-After");
    let metrics = metrics_text(s.proxy.url("/_proxy/metrics")).await;
    let refused = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("zoho_proxy_limits_reached_total{limit=\"max_h2_head_bytes\"} ")
        })
        .and_then(|n| n.parse::<u64>().ok());
    assert!(refused.is_some_and(|n| n >= 1), "{metrics}");
    // The proxy still answers a small request meanwhile.
    let (mut sender, _connection) = h2(s.proxy.addr).await;
    let request = h2_request("GET", s.proxy.addr, "/_proxy/health")
        .body(empty())
        .unwrap();
    assert_eq!(h2_send(&mut sender, request).await.0, 200);
    // The clients give up: their heads are let go, and Desk's line moves again.
    for stream in &streams {
        stream.abort();
    }
    s.zoho.set_desk_delay(Duration::ZERO);
    wait_for_metric(&s.proxy, "zoho_proxy_desk_queue_depth 0").await;
    assert_still_serving(&s).await;
}

#[tokio::test]
async fn an_idle_h2_connection_is_closed_like_an_idle_http1_one() {
    let s = Scenario::with(FakeOptions::default(), |c| {
        c.timeouts.header_read = IDLE;
        c.access.api_keys = vec![Secret::new("k-123456".into())];
    })
    .await;
    // One served request, one refused for its missing key: both connections then idle.
    for key in [Some("k-123456"), None] {
        let (mut sender, connection) = h2(s.proxy.addr).await;
        let mut request = h2_request("GET", s.proxy.addr, "/api/v1/tickets");
        if let Some(key) = key {
            request = request.header("x-proxy-key", key);
        }
        let (status, _) = h2_send(&mut sender, request.body(empty()).unwrap()).await;
        assert_eq!(status, if key.is_some() { 200 } else { 401 });
        let started = Instant::now();
        assert!(
            closed_within(connection, LIMIT).await,
            "an idle h2 connection stays open"
        );
        let after = started.elapsed();
        assert!(
            after >= IDLE / 2,
            "closed after {after:?}, before it was idle"
        );
    }
}

#[tokio::test]
async fn idle_h2_connections_cannot_lock_out_a_client_with_a_key() {
    let s = Scenario::with(FakeOptions::default(), |c| {
        c.timeouts.header_read = IDLE;
        c.max_connections = 20;
        c.access.api_keys = vec![Secret::new("k-123456".into())];
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..20 {
        let (mut sender, connection) = h2(s.proxy.addr).await;
        let request = h2_request("GET", s.proxy.addr, "/api/v1/tickets")
            .body(empty())
            .unwrap();
        assert_eq!(h2_send(&mut sender, request).await.0, 401);
        held.push((sender, connection));
    }
    // Within a few idle periods the keyed client gets in.
    let deadline = Instant::now() + IDLE * 6;
    loop {
        let response = client()
            .get(s.url("/api/v1/tickets"))
            .header("x-proxy-key", "k-123456")
            .send()
            .await;
        if let Ok(response) = response
            && response.status() == 200
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "locked out by idle h2 connections"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn too_many_header_fields_are_refused_over_h2_as_over_http1() {
    let s = Scenario::start().await;
    let (mut sender, _connection) = h2(s.proxy.addr).await;
    // 101 fields are refused, 100 pass (as hyper's HTTP/1 parser counts them); the
    // health endpoint answers without Desk.
    let with_fields = |path: &str, n: usize| {
        let mut request = h2_request("GET", s.proxy.addr, path);
        for i in 0..n {
            request = request.header(format!("x-h{i}"), "v");
        }
        request.body(empty()).unwrap()
    };
    let (status, json) = h2_send(&mut sender, with_fields("/api/v1/tickets", 101)).await;
    assert_eq!(status, 431, "{json}");
    assert_eq!(s.zoho.desk_request_count(), 0);
    assert_eq!(
        json["errorCode"], "PROXY_BAD_REQUEST",
        "the proxy's own answer"
    );
    let (status, json) = h2_send(&mut sender, with_fields("/_proxy/health", 101)).await;
    assert_eq!(status, 431, "{json}");
    let (status, json) = h2_send(&mut sender, with_fields("/_proxy/health", 100)).await;
    assert_eq!(status, 200, "{json}");
    // 90 reach Desk (the fake Desk, like hyper's HTTP/1 server, takes at most 100).
    let (status, json) = h2_send(&mut sender, with_fields("/api/v1/tickets", 90)).await;
    assert_eq!(status, 200, "{json}");
}

// ---------------------------------------------------------------------------------------
// Clients that leave, clients that half-close

#[tokio::test]
async fn a_client_that_leaves_is_logged_and_counted_as_499() {
    let fake = FakeZoho::start().await.unwrap();
    let zoho = fake.control();
    zoho.set_desk_delay(Duration::from_secs(3));
    let mut proxy = serve_fake_logged(&fake, "", "127.0.0.1", &[]).await;
    let addr: SocketAddr = proxy.addr;

    // HTTP/1.1: the client closes while Desk takes its time.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /api/v1/tickets?left=h1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    wait_for_desk_requests(&zoho, 1).await;
    drop(stream);

    // HTTP/2: the client resets its stream.
    let (mut sender, _connection) = h2(addr).await;
    let request = h2_request("GET", addr, "/api/v1/tickets?left=h2")
        .body(empty())
        .unwrap();
    let pending = tokio::spawn(async move { sender.send_request(request).await });
    wait_for_desk_requests(&zoho, 2).await;
    pending.abort();

    let mut statuses = Vec::new();
    while statuses.len() < 2 {
        let line = timeout(LIMIT, proxy.lines.recv())
            .await
            .expect("a request line")
            .expect("log open");
        if line.contains("\"path\":\"/api/v1/tickets\"") {
            let json: serde_json::Value = serde_json::from_str(&line).unwrap();
            statuses.push(json["status"].as_u64().unwrap());
        }
    }
    assert_eq!(statuses, vec![499, 499]);
    zoho.set_desk_delay(Duration::ZERO);
    let metrics = fetch(format!("http://{addr}/_proxy/metrics"))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("zoho_proxy_requests_total{method=\"GET\",status_class=\"4xx\"} 2"),
        "{metrics}"
    );
    assert!(!metrics.contains("status_class=\"1xx\"} 1"), "{metrics}");
    sigterm(&proxy.child);
    let _ = proxy.child.wait().await;
}

#[tokio::test]
async fn a_client_that_half_closes_still_gets_the_proxys_own_answers() {
    let s = Scenario::start().await;
    // Ready once a token is held.
    assert_eq!(status(s.url("/api/v1/tickets")).await, 200);
    for path in ["/_proxy/health", "/_proxy/ready", "/_proxy/metrics"] {
        // `printf 'GET … HTTP/1.1\r\nHost: …\r\n\r\n' | nc -N 127.0.0.1 PORT`
        let mut stream = TcpStream::connect(s.proxy.addr).await.unwrap();
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .await
            .unwrap();
        stream.shutdown().await.unwrap();
        let answer = read_until_closed(&mut stream).await;
        assert_eq!(raw_status(&answer), 200, "{path}: {answer:?}");
    }
    let answer = {
        let mut stream = TcpStream::connect(s.proxy.addr).await.unwrap();
        stream
            .write_all(b"GET /_proxy/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .unwrap();
        stream.shutdown().await.unwrap();
        read_until_closed(&mut stream).await
    };
    assert_eq!(raw_json(&answer), serde_json::json!({"status": "ok"}));
}
