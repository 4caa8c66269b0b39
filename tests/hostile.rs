//! The proxy facing hostile clients: malformed requests, oversized heads, slow and idle
//! connections, request smuggling, absolute-form tricks over h2c, bare-LF line endings.
//!
//! Every attack must get a clean refusal (or a closed connection), never reach Desk in a
//! form the client should not be able to produce, and leave the proxy serving everyone
//! else: each test ends with a normal `GET /api/v1/tickets` → 200.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use zoho_desk_proxy::fake_zoho::FakeOptions;

/// How long the proxy may take to answer or close a connection before the test calls it
/// a hang.
const LIMIT: Duration = Duration::from_secs(5);
/// The header read timeout configured for the slow-client tests.
const HEADER_READ: Duration = Duration::from_millis(500);

/// A normal client is still served: `GET /api/v1/tickets` → 200, on a new connection.
async fn assert_still_serving(s: &Scenario) {
    let response = timeout(LIMIT, client().get(s.url("/api/v1/tickets")).send())
        .await
        .expect("a normal request timed out after the attack")
        .expect("a normal request failed after the attack");
    assert_eq!(response.status(), 200, "a normal request after the attack");
}

/// Reads until the proxy closes (EOF or reset); panics when it keeps the connection open
/// longer than [`LIMIT`].
async fn read_until_closed(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    let mut buf = [0u8; 8192];
    let closed = timeout(LIMIT, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    assert!(
        closed,
        "the proxy kept the connection open for {LIMIT:?}; answer so far: {answer:?}"
    );
    answer
}

/// Sends `bytes` on a new connection and reads until the proxy closes it. A write that
/// fails because the proxy already refused and closed is not an error.
async fn send_raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let _ = stream.write_all(bytes).await;
    read_until_closed(&mut stream).await
}

/// The answer is a refusal with one of `statuses`, or nothing at all (connection closed);
/// never more than one response.
fn assert_refused(case: &str, answer: &str, statuses: &[u16]) {
    if answer.is_empty() {
        return;
    }
    let status = raw_status(answer);
    assert!(
        statuses.contains(&status),
        "{case}: expected one of {statuses:?} or a closed connection, got {answer:?}"
    );
    assert_eq!(
        answer.matches("HTTP/1.").count(),
        1,
        "{case}: more than one response: {answer:?}"
    );
}

/// Reads one HTTP/1.1 response with a Content-Length body, leaving the connection open.
async fn read_one_response(stream: &mut TcpStream) -> (u16, String) {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    timeout(LIMIT, async {
        loop {
            if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().expect("content-length"));
                if data.len() >= end + 4 + len {
                    let text = String::from_utf8_lossy(&data).into_owned();
                    let body = String::from_utf8_lossy(&data[end + 4..end + 4 + len]).into_owned();
                    return (raw_status(&text), body);
                }
            }
            let n = stream.read(&mut buf).await.expect("read");
            assert!(
                n > 0,
                "closed mid-response: {:?}",
                String::from_utf8_lossy(&data)
            );
            data.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("no complete response in time")
}

/// A connection closed for its head came neither before the header read timeout nor
/// long after it.
fn assert_cut_off_at_the_header_read_timeout(closed_after: Duration) {
    assert!(
        closed_after >= HEADER_READ - Duration::from_millis(50),
        "closed before the header read timeout: {closed_after:?}"
    );
    assert!(
        closed_after <= Duration::from_secs(2),
        "closed late: {closed_after:?}"
    );
}

/// Trickles a request head on `writer`, a byte every `every`, until the proxy closes the
/// connection, which must come within 3 s, before the head is whole, and without an
/// answer.
async fn trickle_until_closed(
    reader: &mut (impl AsyncReadExt + Unpin),
    writer: &mut (impl AsyncWriteExt + Unpin),
    every: Duration,
) {
    let head = b"GET /api/v1/tickets HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    let trickle = async {
        let mut ticks = tokio::time::interval(every);
        for byte in head {
            ticks.tick().await;
            if writer.write_all(&[*byte]).await.is_err() {
                // Closed by the proxy: wait for the reader to see it.
                std::future::pending::<()>().await;
            }
        }
    };
    let closed = async {
        let (mut sent, mut buf) = (Vec::new(), [0u8; 1024]);
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break sent,
                Ok(n) => sent.extend_from_slice(&buf[..n]),
            }
        }
    };
    let sent = timeout(Duration::from_secs(3), async {
        tokio::select! {
            sent = closed => sent,
            () = trickle => panic!("the whole head was trickled in without the proxy closing the connection"),
        }
    })
    .await
    .expect("the connection was still open after 3 s");
    assert!(sent.is_empty(), "{:?}", String::from_utf8_lossy(&sent));
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
}

#[tokio::test]
async fn malformed_request_lines_are_refused() {
    // A short header read timeout closes connections whose head never completes.
    let s = Scenario::with(FakeOptions::default(), |c| {
        c.timeouts.header_read = HEADER_READ
    })
    .await;
    let cases: &[&[u8]] = &[
        b"GARBAGE\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET /x HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n",
        b"GET /x HTTP/9.9\r\n\r\n",
        b"GET /api/v1/tickets\r\n\r\n",
        b"GET  /api/v1/tickets HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"GET /api/v1/tickets HTTP/1.1 extra\r\nHost: 127.0.0.1\r\n\r\n",
        b"G\x00T /api/v1/tickets HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"GET /api/v1/\x01tickets HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"GET http://[::1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 tls client hello\r\n\r\n",
        b"\xff\xfe\xfd\r\n\r\n",
    ];
    for case in cases {
        let label = String::from_utf8_lossy(case);
        let answer = send_raw(s.proxy.addr, case).await;
        assert_refused(&label, &answer, &[400, 505]);
    }
    assert_eq!(
        s.zoho.desk_request_count(),
        0,
        "a malformed request reached Desk"
    );
    assert_still_serving(&s).await;
}

#[tokio::test]
async fn invalid_header_bytes_are_refused() {
    let s = Scenario::start().await;
    let head = "GET /api/v1/tickets HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n";
    let cases: &[(&str, &[u8])] = &[
        ("space in a header name", b"Bad Name: x\r\n"),
        ("space before the colon", b"X-Name : x\r\n"),
        ("control char in a header name", b"X-B\x01d: x\r\n"),
        ("DEL in a header name", b"X-B\x7fd: x\r\n"),
        ("NUL in a header name", b"X-B\x00d: x\r\n"),
        ("0x01 in a header value", b"X-Value: a\x01b\r\n"),
        ("DEL in a header value", b"X-Value: a\x7fb\r\n"),
        ("NUL in a header value", b"X-Value: a\x00b\r\n"),
        ("bare CR in a header value", b"X-Value: a\rb\r\n"),
        ("obsolete line folding", b"X-Value: a\r\n  folded\r\n"),
        ("header line without a colon", b"X-Value\r\n"),
        ("empty header name", b": x\r\n"),
    ];
    for (label, bad) in cases {
        let mut request = head.as_bytes().to_vec();
        request.extend_from_slice(bad);
        request.extend_from_slice(b"\r\n");
        let answer = send_raw(s.proxy.addr, &request).await;
        assert_refused(label, &answer, &[400]);
        assert_eq!(
            s.zoho.desk_request_count(),
            0,
            "{label}: the request reached Desk: {:?}",
            s.zoho.desk_requests().last().map(|r| &r.headers)
        );
    }
    assert_still_serving(&s).await;
}

#[tokio::test]
async fn a_transfer_coding_other_than_chunked_is_refused() {
    // hyper takes the chunked framing off; a gzip coding under it would reach Desk as
    // bytes nothing says are coded.
    let s = Scenario::start().await;
    for coding in ["gzip, chunked", "chunked, chunked", "x-custom,chunked"] {
        let request = format!(
            "POST /api/v1/echo HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: {coding}\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        );
        let answer = send_raw(s.proxy.addr, request.as_bytes()).await;
        assert_refused(coding, &answer, &[400]);
        if !answer.is_empty() {
            assert_eq!(
                raw_json(&answer)["errorCode"],
                "PROXY_BAD_REQUEST",
                "{answer}"
            );
        }
        assert_eq!(s.zoho.desk_request_count(), 0, "{coding}: reached Desk");
    }
    let request = "POST /api/v1/echo HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: Chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    assert_eq!(
        raw_status(&send_raw(s.proxy.addr, request.as_bytes()).await),
        200
    );
    assert_still_serving(&s).await;
}

#[tokio::test]
async fn a_100_kib_header_is_refused_with_431_or_closed() {
    let s = Scenario::start().await;
    let request = format!(
        "GET /api/v1/tickets HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let answer = send_raw(s.proxy.addr, request.as_bytes()).await;
    assert_refused("100 KiB header", &answer, &[431]);

    // A long request target is the same attack through the request line.
    let request = get(&format!("/api/v1/tickets?q={}", "a".repeat(100 * 1024)));
    let answer = send_raw(s.proxy.addr, request.as_bytes()).await;
    assert_refused("100 KiB request target", &answer, &[414, 431]);

    assert_eq!(s.zoho.desk_request_count(), 0);
    assert_still_serving(&s).await;
}

#[tokio::test]
async fn a_thousand_headers_are_refused_with_431_or_closed() {
    let s = Scenario::start().await;
    let mut request = String::from("GET /api/v1/tickets HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for i in 0..1000 {
        request.push_str(&format!("X-H{i}: v\r\n"));
    }
    request.push_str("\r\n");
    let answer = send_raw(s.proxy.addr, request.as_bytes()).await;
    assert_refused("1000 headers", &answer, &[431]);

    // The limit is 100 fields, Host and Connection included: 101 are refused, 100 pass.
    // The health endpoint answers without Desk, whose own parser would refuse what the
    // proxy adds to 100 fields.
    let many = |path: &str, n: usize| {
        let mut r = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
        for i in 0..n - 2 {
            r.push_str(&format!("X-H{i}: v\r\n"));
        }
        r + "Connection: close\r\n\r\n"
    };
    let answer = send_raw(s.proxy.addr, many("/api/v1/tickets", 101).as_bytes()).await;
    assert_refused("101 headers", &answer, &[431]);
    assert!(
        !answer.contains("x-request-id"),
        "refused by the proxy's parser, not passed on: {answer}"
    );
    assert_eq!(s.zoho.desk_request_count(), 0);
    let answer = send_raw(s.proxy.addr, many("/_proxy/health", 101).as_bytes()).await;
    assert_refused("101 headers", &answer, &[431]);
    let answer = send_raw(s.proxy.addr, many("/_proxy/health", 100).as_bytes()).await;
    assert_eq!(raw_status(&answer), 200, "100 headers: {answer}");
    let answer = send_raw(s.proxy.addr, many("/api/v1/tickets", 92).as_bytes()).await;
    assert_eq!(raw_status(&answer), 200, "92 headers: {answer}");
    assert_still_serving(&s).await;
}

#[tokio::test]
async fn a_slow_client_is_cut_off_while_others_are_served() {
    let s = Scenario::with(FakeOptions::default(), |c| {
        c.timeouts.header_read = HEADER_READ
    })
    .await;
    assert_still_serving(&s).await; // the token is held before the clock starts
    let desk_before = s.zoho.desk_request_count();

    let head = b"GET /api/v1/tickets HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slowloris\r\n\r\n";
    let (mut reader, mut writer) = TcpStream::connect(s.proxy.addr)
        .await
        .expect("connect")
        .into_split();
    let sent = AtomicUsize::new(0);
    let (first_byte_tx, first_byte_rx) = tokio::sync::oneshot::channel::<()>();
    let started = Instant::now();

    let trickle = async {
        let mut first_byte_tx = Some(first_byte_tx);
        let mut every = tokio::time::interval(Duration::from_millis(100));
        for byte in head {
            every.tick().await;
            if writer.write_all(&[*byte]).await.is_err() {
                // Closed by the proxy: wait for the reader to see it.
                std::future::pending::<()>().await;
            }
            sent.fetch_add(1, Ordering::Relaxed);
            if let Some(tx) = first_byte_tx.take() {
                let _ = tx.send(());
            }
        }
    };
    let closed = async {
        let mut answer = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
        (started.elapsed(), answer)
    };
    let attack = async {
        timeout(Duration::from_secs(3), async {
            tokio::select! {
                closed = closed => closed,
                () = trickle => panic!("the whole head was trickled in without the proxy closing the connection"),
            }
        })
        .await
        .expect("the slow connection was still open after 3 s")
    };
    let others = async {
        first_byte_rx.await.expect("first byte sent");
        let t = Instant::now();
        assert_still_serving(&s).await;
        t.elapsed()
    };
    let ((closed_after, answer), served_in) = tokio::join!(attack, others);
    let sent = sent.load(Ordering::Relaxed);
    eprintln!(
        "slow client: closed after {closed_after:?}, {sent} of {} bytes sent; a concurrent client was served in {served_in:?}",
        head.len()
    );
    assert_cut_off_at_the_header_read_timeout(closed_after);
    assert!(sent < head.len());
    assert!(
        answer.is_empty() || raw_status(&String::from_utf8_lossy(&answer)) == 408,
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    assert!(
        served_in < closed_after,
        "the normal client waited for the slow one"
    );
    assert_eq!(
        s.zoho.desk_request_count() - desk_before,
        1,
        "only the normal request reached Desk"
    );
    assert_still_serving(&s).await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_header_read_timeout() {
    let s = Scenario::with(FakeOptions::default(), |c| {
        c.timeouts.header_read = HEADER_READ
    })
    .await;
    let mut stream = TcpStream::connect(s.proxy.addr).await.expect("connect");
    stream
        .write_all(b"GET /api/v1/tickets HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .expect("write");
    let (status, _) = read_one_response(&mut stream).await;
    assert_eq!(status, 200);
    let idle_since = Instant::now();
    let answer = read_until_closed(&mut stream).await;
    let idle_for = idle_since.elapsed();
    eprintln!("idle keep-alive connection closed after {idle_for:?}");
    assert!(answer.is_empty(), "{answer:?}");
    assert!(idle_for <= Duration::from_secs(2), "{idle_for:?}");
    assert_still_serving(&s).await;
}

/// A kept-alive connection whose next request head only trickles in is cut off at the
/// header read timeout, counted from the end of its last answer, like one that says
/// nothing.
#[tokio::test]
async fn a_head_trickled_after_a_first_answer_is_cut_off_at_the_header_read_timeout() {
    let s = Scenario::with(FakeOptions::default(), |c| {
        c.timeouts.header_read = HEADER_READ
    })
    .await;
    let (mut reader, mut writer) = TcpStream::connect(s.proxy.addr)
        .await
        .expect("connect")
        .into_split();
    writer
        .write_all(b"GET /api/v1/tickets HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .expect("write");
    let mut first = Vec::new();
    let mut buf = [0u8; 4096];
    // The fake's answers are small: the first read that holds a whole head and body.
    while !String::from_utf8_lossy(&first).contains("\r\n\r\n{") {
        let n = reader.read(&mut buf).await.expect("read");
        assert!(n > 0, "closed before the first answer");
        first.extend_from_slice(&buf[..n]);
    }
    assert_eq!(raw_status(&String::from_utf8_lossy(&first)), 200);
    let answered = Instant::now();
    trickle_until_closed(&mut reader, &mut writer, Duration::from_millis(100)).await;
    let closed_after = answered.elapsed();
    eprintln!("trickled second head: closed {closed_after:?} after the first answer");
    assert_cut_off_at_the_header_read_timeout(closed_after);
    assert_still_serving(&s).await;
}

/// The first head's time counts from the accept: a client that waits most of it before
/// its first byte, then trickles, has only what is left.
#[tokio::test]
async fn a_first_head_that_starts_late_has_only_the_rest_of_the_header_read_timeout() {
    let s = Scenario::with(FakeOptions::default(), |c| {
        c.timeouts.header_read = HEADER_READ
    })
    .await;
    let mut stream = TcpStream::connect(s.proxy.addr).await.expect("connect");
    let connected = Instant::now();
    // The attack is time itself: most of the timeout spent before the first byte.
    tokio::time::sleep(HEADER_READ * 4 / 5).await;
    let (mut reader, mut writer) = stream.split();
    trickle_until_closed(&mut reader, &mut writer, Duration::from_millis(50)).await;
    let closed_after = connected.elapsed();
    eprintln!("late first head: closed {closed_after:?} after the connect");
    assert_cut_off_at_the_header_read_timeout(closed_after);
    assert!(
        closed_after < HEADER_READ + Duration::from_millis(300),
        "the timeout started again after the first byte: {closed_after:?}"
    );
    assert_still_serving(&s).await;
}

/// Telling HTTP/1 from h2c waits for the first bytes before hyper ever sees the
/// connection (hyper-util's `auto` builder did so without any timeout): a client that
/// connects and says nothing must not hold its connection (and a file descriptor) for
/// ever.
#[tokio::test]
async fn a_silent_connection_is_closed_after_the_header_read_timeout() {
    let s = Scenario::with(FakeOptions::default(), |c| {
        c.timeouts.header_read = HEADER_READ
    })
    .await;
    let mut stream = TcpStream::connect(s.proxy.addr).await.expect("connect");
    let started = Instant::now();
    let answer = read_until_closed(&mut stream).await;
    let after = started.elapsed();
    eprintln!("silent connection closed after {after:?}");
    assert!(after <= Duration::from_secs(2), "{after:?}: {answer:?}");
    assert_still_serving(&s).await;
}

/// The same hole with the h2 preface: a prefix of it keeps the sniffing waiting for the
/// rest, and the whole preface followed by silence (no SETTINGS frame) is not timed out
/// by the h2 side either.
#[tokio::test]
async fn a_stalled_h2_preface_is_closed_after_the_header_read_timeout() {
    let s = Scenario::with(FakeOptions::default(), |c| {
        c.timeouts.header_read = HEADER_READ
    })
    .await;
    let cases: [(&str, &[u8]); 2] = [
        ("a prefix of the h2 preface", b"PRI * HTTP/2.0\r\n"),
        ("the whole h2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
    ];
    let attempts = cases.map(|(label, bytes)| async move {
        let mut stream = TcpStream::connect(s.proxy.addr).await.expect("connect");
        stream.write_all(bytes).await.expect("write");
        let started = Instant::now();
        let mut buf = [0u8; 1024];
        let closed = timeout(Duration::from_secs(3), async {
            while let Ok(n) = stream.read(&mut buf).await
                && n > 0
            {}
        })
        .await
        .is_ok();
        (label, closed.then(|| started.elapsed()))
    });
    let outcomes = futures_util::future::join_all(attempts).await;
    eprintln!("stalled h2 prefaces: {outcomes:?}");
    for (label, closed_after) in outcomes {
        assert!(
            closed_after.is_some_and(|after| after <= Duration::from_secs(2)),
            "{label}: still open after 3 s"
        );
    }
    assert_still_serving(&s).await;
}

#[tokio::test]
async fn two_hundred_idle_connections_do_not_stop_service() {
    let s = Scenario::start().await;
    let mut idle = Vec::new();
    for i in 0..200 {
        let mut stream = TcpStream::connect(s.proxy.addr).await.expect("connect");
        if i % 2 == 0 {
            // Half of them made one request and now idle in keep-alive.
            stream
                .write_all(b"GET /_proxy/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                .await
                .expect("write");
            let (status, body) = read_one_response(&mut stream).await;
            assert_eq!(status, 200, "{body}");
        }
        idle.push(stream);
    }
    let started = Instant::now();
    assert_still_serving(&s).await;
    eprintln!(
        "with 200 idle connections open, a normal request took {:?}",
        started.elapsed()
    );
    // An idle keep-alive connection is still usable.
    let stream = &mut idle[0];
    stream
        .write_all(b"GET /api/v1/tickets HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .expect("write");
    let (status, _) = read_one_response(stream).await;
    assert_eq!(status, 200);
    drop(idle);
    assert_still_serving(&s).await;
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_never_smuggled() {
    let s = Scenario::start().await;
    let json = r#"{"subject":"smuggling attempt"}"#;
    let chunked = format!("{:x}\r\n{json}\r\n0\r\n\r\n", json.len());
    let smuggled = "GET /api/v1/contacts?smuggled=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    let post =
        "POST /api/v1/tickets HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n";
    let cases: Vec<(&str, String)> = vec![
        (
            "CL then TE",
            format!(
                "{post}Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n{chunked}{smuggled}"
            ),
        ),
        (
            "TE then CL",
            format!(
                "{post}Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n{chunked}{smuggled}"
            ),
        ),
        (
            "CL covering the smuggled request, TE chunked",
            format!(
                "{post}Content-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{chunked}{smuggled}",
                chunked.len() + smuggled.len()
            ),
        ),
        (
            "TE chunked, CL 0, empty chunked body",
            format!(
                "{post}Content-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "TE not ending in chunked",
            format!(
                "{post}Content-Length: {}\r\nTransfer-Encoding: chunked, identity\r\n\r\n{chunked}{smuggled}",
                chunked.len()
            ),
        ),
        (
            "two TE headers, the last not chunked",
            format!(
                "{post}Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\nContent-Length: {}\r\n\r\n{chunked}{smuggled}",
                chunked.len()
            ),
        ),
        (
            "unknown TE",
            format!(
                "{post}Transfer-Encoding: xchunked\r\nContent-Length: {}\r\n\r\n{chunked}{smuggled}",
                chunked.len()
            ),
        ),
        (
            "TE in HTTP/1.0",
            format!(
                "POST /api/v1/tickets HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n{chunked}{smuggled}"
            ),
        ),
        (
            "two different Content-Lengths",
            format!(
                "{post}Content-Length: {}\r\nContent-Length: 4\r\n\r\n{json}{smuggled}",
                json.len()
            ),
        ),
        (
            "a Content-Length list",
            format!(
                "{post}Content-Length: {0}, 4\r\n\r\n{json}{smuggled}",
                json.len()
            ),
        ),
    ];
    for (label, request) in &cases {
        let before = s.zoho.desk_request_count();
        // No `Connection: close`: the proxy must close by itself after such a request.
        let answer = send_raw(s.proxy.addr, request.as_bytes()).await;
        let forwarded = s.zoho.desk_request_count() - before;
        eprintln!(
            "{label}: answered {} and closed; {forwarded} request(s) reached Desk",
            if answer.is_empty() {
                "nothing".to_owned()
            } else {
                raw_status(&answer).to_string()
            }
        );
        assert!(forwarded <= 1, "{label}: {forwarded} requests reached Desk");
        assert!(
            answer.matches("HTTP/1.").count() <= 1,
            "{label}: the client connection answered the smuggled request too: {answer:?}"
        );
        if forwarded == 0 {
            assert_refused(label, &answer, &[400]);
        } else {
            let seen = s.zoho.desk_requests().pop().unwrap();
            assert_eq!(seen.path_and_query, "/api/v1/tickets", "{label}");
            // The framing Desk got is consistent: no leftover Content-Length disagreeing
            // with the body, and not both.
            let cl = seen.headers.get("content-length");
            let te = seen.headers.get("transfer-encoding");
            assert!(cl.is_none() || te.is_none(), "{label}: {:?}", seen.headers);
            if let Some(cl) = cl {
                assert_eq!(
                    cl.to_str().unwrap(),
                    seen.body_len.to_string(),
                    "{label}: Content-Length disagrees with the body Desk read"
                );
            }
        }
    }
    for seen in s.zoho.desk_requests() {
        assert!(
            !seen.path_and_query.contains("smuggled"),
            "a smuggled request reached Desk: {}",
            seen.path_and_query
        );
    }
    assert_still_serving(&s).await;
}

/// Sends one h2c (prior knowledge) GET whose `:authority` and `:scheme` come from `uri`.
async fn h2c_get(
    addr: SocketAddr,
    uri: &str,
    headers: &[(&str, &str)],
) -> (u16, serde_json::Value) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    let connection = tokio::spawn(connection);
    let mut request = http::Request::get(uri);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Empty::<Bytes>::new()).expect("request");
    let (status, body) = timeout(LIMIT, async {
        let response = sender.send_request(request).await.expect("h2 response");
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("h2 body")
            .to_bytes();
        (status, body)
    })
    .await
    .expect("h2 request timed out");
    connection.abort();
    (
        status,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    )
}

#[tokio::test]
async fn h2c_authority_of_another_host_never_sends_the_token_there() {
    let s = Scenario::start().await;
    let evil = EvilListener::start().await;

    // A foreign host name in :authority fails the Host allowlist.
    let (status, body) = h2c_get(
        s.proxy.addr,
        &format!("http://evil.example:{}/api/v1/tickets", evil.addr.port()),
        &[],
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["errorCode"], "PROXY_FORBIDDEN", "{body}");
    assert_eq!(s.zoho.desk_request_count(), 0);

    // :authority naming the evil listener by an allowed name (ports are ignored by the
    // allowlist): the request goes to the upstream, never to the listener.
    let (status, body) = h2c_get(
        s.proxy.addr,
        &format!("http://{}/api/v1/tickets?h2c=1", evil.addr),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let seen = s.zoho.desk_requests().pop().expect("forwarded to Desk");
    assert_eq!(seen.path_and_query, "/api/v1/tickets?h2c=1");
    assert_eq!(
        seen.headers["host"],
        s.fake.desk_url().trim_start_matches("http://")
    );

    // A foreign :authority with an allowed Host header (RFC 9113 §8.3.1 lets a server
    // treat the mismatch as malformed): refused, or forwarded to the upstream only.
    let before = s.zoho.desk_request_count();
    let (status, body) = h2c_get(
        s.proxy.addr,
        &format!(
            "https://evil.example:{}/api/v1/tickets?h2c=2",
            evil.addr.port()
        ),
        &[("host", "localhost")],
    )
    .await;
    eprintln!("h2c :authority evil.example with Host: localhost → {status}");
    assert!(
        status == 200 || status == 403 || status == 400,
        "{status} {body}"
    );
    if status == 200 {
        let seen = s.zoho.desk_requests().pop().expect("forwarded to Desk");
        assert_eq!(seen.path_and_query, "/api/v1/tickets?h2c=2");
        assert_eq!(s.zoho.desk_request_count(), before + 1);
    } else {
        assert!(
            body["errorCode"]
                .as_str()
                .is_some_and(|c| c.starts_with("PROXY_")),
            "{body}"
        );
    }

    assert_eq!(evil.connections(), 0, "the proxy contacted another host");
    assert_still_serving(&s).await;
}

#[tokio::test]
async fn bare_lf_line_endings_are_refused_or_parsed_consistently() {
    // A short header read timeout closes connections whose head never completes.
    let s = Scenario::with(FakeOptions::default(), |c| {
        c.timeouts.header_read = HEADER_READ
    })
    .await;

    // All-LF request: RFC 9112 §2.2 lets a server accept it; if it does, it is one
    // request, forwarded once, with the exact target.
    let answer = send_raw(
        s.proxy.addr,
        b"GET /api/v1/tickets?lf=1 HTTP/1.1\nHost: 127.0.0.1\nConnection: close\n\n",
    )
    .await;
    let status = raw_status(&answer);
    eprintln!("all-LF request: {status}");
    assert!(
        status == 200 || status == 400 || answer.is_empty(),
        "{answer:?}"
    );
    let lf1: Vec<_> = s
        .zoho
        .desk_requests()
        .into_iter()
        .filter(|r| r.path_and_query.contains("lf=1"))
        .collect();
    assert_eq!(lf1.len(), usize::from(status == 200));
    if let Some(seen) = lf1.first() {
        assert_eq!(seen.path_and_query, "/api/v1/tickets?lf=1");
    }

    // Mixed endings: a bare LF inside the head makes a separate header line, not a
    // continuation of the previous value.
    let answer = send_raw(
        s.proxy.addr,
        b"GET /api/v1/tickets?lf=2 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: a\nX-B: b\r\nConnection: close\r\n\r\n",
    )
    .await;
    let status = raw_status(&answer);
    eprintln!("mixed CRLF/LF request: {status}");
    assert!(
        status == 200 || status == 400 || answer.is_empty(),
        "{answer:?}"
    );
    if status == 200 {
        let seen = s.zoho.desk_requests().pop().unwrap();
        assert_eq!(seen.path_and_query, "/api/v1/tickets?lf=2");
        assert_eq!(seen.headers["x-a"], "a", "{:?}", seen.headers);
        assert_eq!(seen.headers["x-b"], "b", "{:?}", seen.headers);
    }

    // A bare LF trying to start a second request inside a header value.
    let answer = send_raw(
        s.proxy.addr,
        b"GET /api/v1/tickets?lf=3 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: a\nGET /api/v1/contacts?smuggled=1 HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_refused("LF then a request line", &answer, &[400]);

    // A lone LF as the whole request.
    let answer = send_raw(s.proxy.addr, b"\n").await;
    assert_refused("lone LF", &answer, &[400]);
    let answer = send_raw(s.proxy.addr, b"\n\n\n\n").await;
    assert_refused("lone LFs", &answer, &[400]);

    for seen in s.zoho.desk_requests() {
        assert!(
            !seen.path_and_query.contains("smuggled") && !seen.path_and_query.contains("lf=3"),
            "reached Desk: {}",
            seen.path_and_query
        );
    }
    assert_still_serving(&s).await;
}

#[tokio::test]
async fn connections_beyond_max_connections_are_closed_at_once() {
    let s = Scenario::with(FakeOptions::default(), |c| c.max_connections = 5).await;
    let mut held = Vec::new();
    for _ in 0..5 {
        let mut stream = TcpStream::connect(s.proxy.addr).await.expect("connect");
        let keep_alive = "GET /api/v1/tickets HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
        stream
            .write_all(keep_alive.as_bytes())
            .await
            .expect("write");
        let (status, _) = read_one_response(&mut stream).await;
        assert_eq!(status, 200);
        held.push(stream);
    }
    // The sixth is closed without an answer.
    let mut sixth = TcpStream::connect(s.proxy.addr).await.expect("connect");
    let _ = sixth.write_all(get("/api/v1/tickets").as_bytes()).await;
    assert_eq!(read_until_closed(&mut sixth).await, "");
    // A slot frees when a connection closes.
    drop(held.pop());
    let mut answered = false;
    for _ in 0..50 {
        let mut stream = TcpStream::connect(s.proxy.addr).await.expect("connect");
        let _ = stream.write_all(get("/api/v1/tickets").as_bytes()).await;
        let mut buf = [0u8; 12];
        if matches!(timeout(LIMIT, stream.read(&mut buf)).await, Ok(Ok(12))) {
            answered = buf.starts_with(b"HTTP/1.1 200");
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(answered, "a freed slot is usable again");
}
