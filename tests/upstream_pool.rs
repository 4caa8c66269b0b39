//! Desk's connections (README "How requests are forwarded"): an HTTP/1.1 connection is
//! kept alive between requests, replaced when Desk closed it while it waited, closed
//! after `timeouts.idle_secs` unused, and closed when the client leaves in the middle of
//! Desk's answer; a request Desk may have received is never sent twice.
//!
//! Desk here is a plain TCP server of the test's own, so that it can close, stall and
//! count connections exactly as the test says.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use zoho_desk_proxy::config::Config;
use zoho_desk_proxy::fake_zoho::{FakeOptions, FakeZoho};

/// How Desk treats each request.
#[derive(Clone, Copy, PartialEq)]
enum Behaviour {
    /// A 200 with a short body; the connection stays open.
    KeepAlive,
    /// The same, its body chunked (its end is known only from the last chunk).
    KeepAliveChunked,
    /// A 204, no body; the connection stays open.
    NoContent,
    /// A 200 with a short body (no `Connection: close`), then the connection is closed.
    CloseAfterAnswer,
    /// The head and 64 KiB of a 16 MiB body, then silence.
    StallInBody,
    /// The request is read, then the connection is closed without an answer.
    CloseWithoutAnswer,
    /// A `101 Switching Protocols` no request asked for, then silence until the proxy
    /// closes the connection.
    SwitchProtocols,
    /// A 200 that announces 100 bytes, sends 10, and closes the connection.
    CutShort,
}

/// What Desk saw.
#[derive(Debug, PartialEq)]
enum Event {
    /// A connection was accepted (its number, from 1).
    Connected(usize),
    /// A request head arrived on connection `n`: its request line.
    Request(usize, String),
    /// Desk closed connection `n` itself.
    ClosedByDesk(usize),
    /// The proxy closed connection `n` (Desk read its end).
    ClosedByProxy(usize),
}

struct RawDesk {
    addr: SocketAddr,
    events: mpsc::UnboundedReceiver<Event>,
}

impl RawDesk {
    async fn start(behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok((tcp, _)) = listener.accept().await {
                n += 1;
                let _ = tx.send(Event::Connected(n));
                tokio::spawn(serve(tcp, n, behaviour, tx.clone()));
            }
        });
        Self { addr, events }
    }

    /// The next event, within 10 s.
    async fn next(&mut self) -> Event {
        tokio::time::timeout(Duration::from_secs(10), self.events.recv())
            .await
            .expect("an event from Desk within 10 s")
            .expect("Desk runs")
    }

    /// Asserts that the next events are connection `n` opening, the request `line` on it,
    /// and then `end`.
    async fn expect_connection(&mut self, n: usize, line: &str, end: Event) {
        assert_eq!(
            self.until(&end).await,
            vec![Event::Connected(n), request(n, line), end]
        );
    }

    /// Events until `last` (included).
    async fn until(&mut self, last: &Event) -> Vec<Event> {
        let mut seen = Vec::new();
        loop {
            let event = self.next().await;
            let done = event == *last;
            seen.push(event);
            if done {
                return seen;
            }
        }
    }
}

async fn serve(
    mut tcp: TcpStream,
    n: usize,
    behaviour: Behaviour,
    tx: mpsc::UnboundedSender<Event>,
) {
    let mut buffer = Vec::new();
    loop {
        // One request head (the tests send no bodies but a small POST's).
        let head_end = loop {
            if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0u8; 4096];
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => {
                    let _ = tx.send(Event::ClosedByProxy(n));
                    return;
                }
                Ok(read) => buffer.extend_from_slice(&chunk[..read]),
            }
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
        let length = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
            })
            .unwrap_or(0);
        while buffer.len() < head_end + length {
            let mut chunk = [0u8; 4096];
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(read) => buffer.extend_from_slice(&chunk[..read]),
            }
        }
        buffer.drain(..head_end + length);
        let line = head.lines().next().unwrap_or_default().to_owned();
        let _ = tx.send(Event::Request(n, line));
        let body = b"{\"data\":[]}";
        match behaviour {
            Behaviour::KeepAliveChunked => {
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{}\r\n0\r\n\r\n",
                    body.len(),
                    String::from_utf8_lossy(body)
                );
                tcp.write_all(answer.as_bytes()).await.unwrap();
            }
            Behaviour::KeepAlive | Behaviour::CloseAfterAnswer => {
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                tcp.write_all(answer.as_bytes()).await.unwrap();
                tcp.write_all(body).await.unwrap();
                if behaviour == Behaviour::CloseAfterAnswer {
                    drop(tcp);
                    let _ = tx.send(Event::ClosedByDesk(n));
                    return;
                }
            }
            Behaviour::NoContent => {
                tcp.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                    .await
                    .unwrap();
            }
            Behaviour::CutShort => {
                let answer = "HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789";
                tcp.write_all(answer.as_bytes()).await.unwrap();
                drop(tcp);
                let _ = tx.send(Event::ClosedByDesk(n));
                return;
            }
            Behaviour::SwitchProtocols => {
                let head = "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n";
                tcp.write_all(head.as_bytes()).await.unwrap();
                let _ = tcp.read(&mut [0u8; 1024]).await;
                let _ = tx.send(Event::ClosedByProxy(n));
                return;
            }
            Behaviour::StallInBody => {
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: 16777216\r\n\r\n";
                tcp.write_all(head.as_bytes()).await.unwrap();
                let _ = tcp.write_all(&vec![b'x'; 64 * 1024]).await;
                // Silence until the proxy goes away.
                let mut chunk = [0u8; 1024];
                loop {
                    match tcp.read(&mut chunk).await {
                        Ok(0) | Err(_) => {
                            let _ = tx.send(Event::ClosedByProxy(n));
                            return;
                        }
                        Ok(_) => {}
                    }
                }
            }
            Behaviour::CloseWithoutAnswer => {
                drop(tcp);
                let _ = tx.send(Event::ClosedByDesk(n));
                return;
            }
        }
    }
}

/// A proxy (one serving thread) in front of `desk`, with `extra` TOML appended.
async fn proxy_to(desk: &RawDesk, fake: &FakeZoho, extra: &str) -> TestProxy {
    proxy_at(&format!("http://{}", desk.addr), fake, extra).await
}

/// A proxy (one serving thread) whose `upstream` is `url`, with `extra` TOML appended.
async fn proxy_at(url: &str, fake: &FakeZoho, extra: &str) -> TestProxy {
    let o = FakeOptions::default();
    let toml = format!(
        "upstream = \"{url}\"\naccounts_url = \"{}\"\ntoken_file = \"\"\n\
         [oauth]\nclient_id = \"{}\"\nclient_secret = \"{}\"\nrefresh_token = \"{}\"\n\
         [limits]\nworkers = 1\n{extra}",
        fake.accounts_url(),
        o.client_id,
        o.client_secret,
        o.refresh_token
    );
    start_proxy(Config::from_toml(&toml).unwrap()).await
}

/// A GET's status, once its whole body was read (a client that drops an answer half-read
/// closes its connection, and the proxy then closes Desk's).
async fn get(url: String) -> u16 {
    let answer = client().get(url).send().await.unwrap();
    let status = answer.status().as_u16();
    answer.bytes().await.unwrap();
    status
}

/// A POST that creates a ticket: one that must never reach Desk twice.
async fn post_ticket(proxy: &TestProxy) -> reqwest::Response {
    client()
        .post(proxy.url("/api/v1/tickets"))
        .body("{\"subject\":\"once\"}")
        .send()
        .await
        .unwrap()
}

fn request(n: usize, line: &str) -> Event {
    Event::Request(n, line.to_owned())
}

#[tokio::test]
async fn a_kept_alive_connection_serves_request_after_request() {
    for behaviour in [
        Behaviour::KeepAlive,
        Behaviour::KeepAliveChunked,
        Behaviour::NoContent,
    ] {
        kept_alive(behaviour).await;
    }
}

async fn kept_alive(behaviour: Behaviour) {
    let fake = FakeZoho::start().await.unwrap();
    let mut desk = RawDesk::start(behaviour).await;
    let proxy = proxy_to(&desk, &fake, "").await;
    for i in 0..5 {
        let path = format!("/api/v1/tickets?n={i}");
        let status = if behaviour == Behaviour::NoContent {
            204
        } else {
            200
        };
        assert_eq!(get(proxy.url(&path)).await, status);
        let line = format!("GET {path} HTTP/1.1");
        let expected = if i == 0 {
            vec![Event::Connected(1), request(1, &line)]
        } else {
            vec![request(1, &line)]
        };
        assert_eq!(desk.until(expected.last().unwrap()).await, expected);
    }
}

#[tokio::test]
async fn a_connection_desk_closed_while_it_waited_is_replaced_and_nothing_is_sent_twice() {
    let fake = FakeZoho::start().await.unwrap();
    let mut desk = RawDesk::start(Behaviour::CloseAfterAnswer).await;
    let proxy = proxy_to(&desk, &fake, "").await;
    for n in 1..=4 {
        // Desk has closed the last connection (the event says so) before the next request.
        let body = support::fetch(proxy.url("/api/v1/tickets")).await;
        assert_eq!(body.status(), 200);
        assert_eq!(body.text().await.unwrap(), "{\"data\":[]}");
        desk.expect_connection(n, "GET /api/v1/tickets HTTP/1.1", Event::ClosedByDesk(n))
            .await;
    }
    // A POST on a connection Desk closed after answering: sent once, on a new connection.
    let answer = post_ticket(&proxy).await;
    assert_eq!(answer.status(), 200);
    desk.expect_connection(5, "POST /api/v1/tickets HTTP/1.1", Event::ClosedByDesk(5))
        .await;
}

#[tokio::test]
async fn a_request_desk_received_is_not_sent_again_when_the_connection_drops() {
    let fake = FakeZoho::start().await.unwrap();
    let mut desk = RawDesk::start(Behaviour::CloseWithoutAnswer).await;
    let proxy = proxy_to(&desk, &fake, "").await;
    let answer = post_ticket(&proxy).await;
    assert_eq!(answer.status(), 502);
    let error: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(error["errorCode"], "PROXY_UPSTREAM_UNREACHABLE");
    desk.expect_connection(1, "POST /api/v1/tickets HTTP/1.1", Event::ClosedByDesk(1))
        .await;
    // Nothing more reaches Desk: a health check of the proxy's own, then a GET that opens
    // connection 2 (whose request is the next event).
    assert_eq!(status(proxy.url("/_proxy/health")).await, 200);
    assert_eq!(get(proxy.url("/api/v1/agents")).await, 502);
    desk.expect_connection(2, "GET /api/v1/agents HTTP/1.1", Event::ClosedByDesk(2))
        .await;
}

#[tokio::test]
async fn an_upstream_path_prefix_is_added_once_in_origin_and_absolute_form() {
    let fake = FakeZoho::start().await.unwrap();
    let mut desk = RawDesk::start(Behaviour::KeepAlive).await;
    let proxy = proxy_at(&format!("http://{}/gw", desk.addr), &fake, "").await;
    assert_eq!(get(proxy.url("/api/v1/tickets?limit=1")).await, 200);
    let first = request(1, "GET /gw/api/v1/tickets?limit=1 HTTP/1.1");
    assert_eq!(desk.until(&first).await, vec![Event::Connected(1), first]);
    // Absolute-form names the upstream's URL in full, prefix included.
    let at = desk.addr;
    let absolute = |path: &str| {
        format!("GET http://{at}{path} HTTP/1.1\r\nHost: {at}\r\nConnection: close\r\n\r\n")
    };
    let answer = raw_request(proxy.addr, &absolute("/gw/api/v1/tickets")).await;
    assert_eq!(raw_status(&answer), 200, "{answer}");
    let second = request(1, "GET /gw/api/v1/tickets HTTP/1.1");
    assert_eq!(desk.until(&second).await, vec![second]);
    // A path outside the prefix is not the upstream's: refused, nothing sent.
    for path in ["/api/v1/tickets", "/gwx/api/v1/tickets"] {
        let answer = raw_request(proxy.addr, &absolute(path)).await;
        assert_eq!(raw_status(&answer), 403, "{path}: {answer}");
    }
    assert_eq!(get(proxy.url("/api/v1/contacts")).await, 200);
    let last = request(1, "GET /gw/api/v1/contacts HTTP/1.1");
    assert_eq!(desk.until(&last).await, vec![last]);
}

#[tokio::test]
async fn an_answer_desk_cuts_short_reaches_the_client_cut_short_and_is_counted() {
    let fake = FakeZoho::start().await.unwrap();
    let mut desk = RawDesk::start(Behaviour::CutShort).await;
    let proxy = proxy_to(&desk, &fake, "").await;
    // The client sees the answer break off: in its body, or before its head when the
    // head had not gone out yet (it leaves with the body's first part).
    if let Ok(answer) = client().get(proxy.url("/api/v1/tickets")).send().await {
        assert_eq!(answer.status(), 200);
        assert!(answer.bytes().await.is_err(), "the body broke off");
    }
    desk.expect_connection(1, "GET /api/v1/tickets HTTP/1.1", Event::ClosedByDesk(1))
        .await;
    wait_for_metric(&proxy, "zoho_proxy_upstream_errors_total{kind=\"body\"} 1").await;
}

#[tokio::test]
async fn a_protocol_switch_no_request_asked_for_is_a_502_and_its_connection_is_closed() {
    let fake = FakeZoho::start().await.unwrap();
    let mut desk = RawDesk::start(Behaviour::SwitchProtocols).await;
    let proxy = proxy_to(&desk, &fake, "").await;
    for n in 1..=2 {
        // The client's own upgrade request is not one: `Upgrade` is never forwarded.
        let answer = client()
            .get(proxy.url("/api/v1/tickets"))
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 502);
        let error: serde_json::Value = answer.json().await.unwrap();
        assert_eq!(error["errorCode"], "PROXY_UPSTREAM_UNREACHABLE");
        assert!(
            error["message"].as_str().unwrap().contains("101"),
            "{error}"
        );
        desk.expect_connection(n, "GET /api/v1/tickets HTTP/1.1", Event::ClosedByProxy(n))
            .await;
    }
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_idle_secs() {
    let fake = FakeZoho::start().await.unwrap();
    let mut desk = RawDesk::start(Behaviour::KeepAlive).await;
    let proxy = proxy_to(&desk, &fake, "[timeouts]\nidle_secs = 0.3\n").await;
    assert_eq!(get(proxy.url("/api/v1/tickets")).await, 200);
    let answered = tokio::time::Instant::now();
    desk.expect_connection(1, "GET /api/v1/tickets HTTP/1.1", Event::ClosedByProxy(1))
        .await;
    let idle = answered.elapsed();
    assert!(
        idle >= Duration::from_millis(250) && idle < Duration::from_secs(5),
        "closed after {idle:?}"
    );
    // The next request opens a new connection.
    assert_eq!(get(proxy.url("/api/v1/tickets")).await, 200);
    assert_eq!(desk.next().await, Event::Connected(2));
}

#[tokio::test]
async fn a_client_that_leaves_mid_answer_closes_desk_s_connection() {
    let fake = FakeZoho::start().await.unwrap();
    let mut desk = RawDesk::start(Behaviour::StallInBody).await;
    let proxy = proxy_to(&desk, &fake, "").await;
    for version in ["HTTP/1.1", "HTTP/2"] {
        let client = if version == "HTTP/1.1" {
            client()
        } else {
            h2c_client()
        };
        let answer = client.get(proxy.url("/api/v1/files")).send().await.unwrap();
        assert_eq!(answer.status(), 200, "{version}");
        let n = if version == "HTTP/1.1" { 1 } else { 2 };
        assert_eq!(desk.next().await, Event::Connected(n), "{version}");
        assert_eq!(
            desk.next().await,
            request(n, "GET /api/v1/files HTTP/1.1"),
            "{version}"
        );
        drop(answer);
        drop(client);
        assert_eq!(desk.next().await, Event::ClosedByProxy(n), "{version}");
    }
}

/// Many clients at once share as many connections as `limits.max_upstream_requests`
/// allows, and every request is answered.
#[tokio::test]
async fn concurrent_requests_stay_within_the_upstream_limit() {
    let fake = FakeZoho::start().await.unwrap();
    let mut desk = RawDesk::start(Behaviour::KeepAliveChunked).await;
    let proxy = Arc::new(proxy_to(&desk, &fake, "max_upstream_requests = 4\n").await);
    let mut tasks = Vec::new();
    for i in 0..64 {
        let proxy = Arc::clone(&proxy);
        tasks.push(tokio::spawn(async move {
            get(proxy.url(&format!("/api/v1/tickets?i={i}"))).await
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), 200);
    }
    let mut connections = 0;
    let mut requests = 0;
    while requests < 64 {
        match desk.next().await {
            Event::Connected(_) => connections += 1,
            Event::Request(..) => requests += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        (1..=4).contains(&connections),
        "{connections} connections for max_upstream_requests = 4"
    );
}
