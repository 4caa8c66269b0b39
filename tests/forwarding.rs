//! Forwarding (README "How requests are forwarded"): what reaches Desk, what comes back, and what never leaves.

mod support;

use std::time::Duration;

use support::*;
use zoho_desk_proxy::fake_zoho::FakeOptions;

#[tokio::test]
async fn request_reaches_desk_with_token_host_org_and_exact_target() {
    let s = Scenario::with(FakeOptions::default(), |c| {
        c.org_id = Some("60001234567".parse().unwrap());
    })
    .await;
    let response = client()
        .get(s.url("/api/v1/tickets?limit=10&q=a%2Fb+c%20d"))
        .header("Authorization", "Bearer client-own")
        .header("Cookie", "session=localhost-cookie")
        .header("Connection", "keep-alive, x-hop")
        .header("X-Hop", "must go")
        .header("X-Custom", "stays")
        .header("Accept-Encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-rate-limit-remaining-v3"], "4999");
    assert!(response.headers().contains_key("x-request-id"));
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(
        body["data"].as_array().is_some_and(|d| !d.is_empty()),
        "{body}"
    );

    let seen = s.zoho.desk_requests().pop().unwrap();
    assert_eq!(
        seen.path_and_query,
        "/api/v1/tickets?limit=10&q=a%2Fb+c%20d"
    );
    let token = s.zoho.issued_tokens().pop().unwrap();
    assert_eq!(
        seen.headers["authorization"],
        format!("Zoho-oauthtoken {token}").as_str()
    );
    assert_eq!(
        seen.headers["host"],
        s.fake.desk_url().trim_start_matches("http://")
    );
    assert_eq!(seen.headers["orgid"], "60001234567");
    assert_eq!(seen.headers["x-custom"], "stays");
    assert_eq!(seen.headers["accept-encoding"], "gzip");
    for gone in ["cookie", "x-hop", "proxy-authorization", "x-proxy-key"] {
        assert!(!seen.headers.contains_key(gone), "{gone} reached Desk");
    }
    assert_eq!(seen.headers.get_all("authorization").iter().count(), 1);
}

#[tokio::test]
async fn a_client_org_id_is_kept() {
    let s = Scenario::with(FakeOptions::default(), |c| {
        c.org_id = Some("1".parse().unwrap())
    })
    .await;
    let response = client()
        .get(s.url("/api/v1/tickets"))
        .header("orgId", "777")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        s.zoho.desk_requests().pop().unwrap().headers["orgid"],
        "777"
    );
}

#[tokio::test]
async fn compressed_bodies_pass_unchanged() {
    let s = Scenario::start().await;
    let response = fetch(s.url("/api/v1/gzip")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-encoding"], "gzip");
    let bytes = response.bytes().await.unwrap();
    assert_eq!(&bytes[..2], &[0x1f, 0x8b], "still gzip on the wire");
}

#[tokio::test]
async fn post_bodies_and_desk_errors_pass_unchanged() {
    let s = Scenario::start().await;
    let created = client()
        .post(s.url("/api/v1/tickets"))
        .json(&serde_json::json!({"subject": "Printer on fire"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 200);
    let ticket: serde_json::Value = created.json().await.unwrap();
    assert_eq!(ticket["subject"], "Printer on fire");

    let invalid = client()
        .post(s.url("/api/v1/tickets"))
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(invalid.status(), 422);
    let body: serde_json::Value = invalid.json().await.unwrap();
    assert_eq!(body["errorCode"], "INVALID_DATA");

    let missing = fetch(s.url("/api/v1/nothing-here")).await;
    assert_eq!(missing.status(), 404);
}

#[tokio::test]
async fn h2c_clients_are_served() {
    let s = Scenario::start().await;
    let response = h2c_client()
        .get(s.url("/api/v1/tickets?limit=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    let seen = s.zoho.desk_requests().pop().unwrap();
    assert_eq!(seen.path_and_query, "/api/v1/tickets?limit=1");
    assert!(
        seen.headers["authorization"]
            .to_str()
            .unwrap()
            .starts_with("Zoho-oauthtoken ")
    );
    // The h2 :authority was the proxy's; Desk sees its own host.
    assert_eq!(
        seen.headers["host"],
        s.fake.desk_url().trim_start_matches("http://")
    );
}

#[tokio::test]
async fn an_upstream_redirect_reaches_the_client_unfollowed() {
    let s = Scenario::start().await;
    let evil = EvilListener::start().await;
    let to = format!("http://{}/steal", evil.addr);
    let response = client()
        .get(s.url(&format!("/api/v1/redirect?to={}", urlencode(&to))))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 302);
    assert_eq!(response.headers()["location"], to.as_str());
    assert_eq!(evil.connections(), 0, "the proxy followed the redirect");
}

#[tokio::test]
async fn absolute_form_goes_only_to_the_upstream() {
    let s = Scenario::start().await;
    let evil = EvilListener::start().await;

    let answer = raw_request(
        s.proxy.addr,
        &format!(
            "GET http://{0}/api/v1/tickets HTTP/1.1\r\nHost: {0}\r\nConnection: close\r\n\r\n",
            evil.addr
        ),
    )
    .await;
    assert_eq!(raw_status(&answer), 403, "{answer}");
    assert_eq!(raw_json(&answer)["errorCode"], "PROXY_FORBIDDEN");
    assert_eq!(evil.connections(), 0);

    let desk = s.fake.desk_url().trim_start_matches("http://").to_owned();
    let answer = raw_request(
        s.proxy.addr,
        &format!(
            "GET http://{desk}/api/v1/tickets HTTP/1.1\r\nHost: {desk}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(raw_status(&answer), 200, "{answer}");

    // Same host, another port.
    let host = desk.split(':').next().unwrap();
    let answer = raw_request(
        s.proxy.addr,
        &format!("GET http://{host}:{}/api/v1/tickets HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n", evil.addr.port()),
    )
    .await;
    assert_eq!(raw_status(&answer), 403, "{answer}");
    assert_eq!(evil.connections(), 0);
}

#[tokio::test]
async fn connect_is_refused_with_405() {
    let s = Scenario::start().await;
    let answer = raw_request(
        s.proxy.addr,
        "CONNECT desk.zoho.com:443 HTTP/1.1\r\nHost: desk.zoho.com:443\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(raw_status(&answer), 405, "{answer}");
    assert_eq!(raw_json(&answer)["errorCode"], "PROXY_METHOD_NOT_ALLOWED");
}

#[tokio::test]
async fn dot_segments_and_empty_segments_are_refused() {
    let s = Scenario::start().await;
    for path in [
        "/api/v1/../admin",
        "/api/v1/%2e%2e/admin",
        "/api/v1/./tickets",
        "/api//v1/tickets",
    ] {
        let answer = raw_request(
            s.proxy.addr,
            &format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(raw_status(&answer), 400, "{path}: {answer}");
        assert_eq!(raw_json(&answer)["errorCode"], "PROXY_BAD_REQUEST");
    }
    assert_eq!(s.zoho.desk_request_count(), 0);
}

#[tokio::test]
async fn unreachable_desk_is_502() {
    let fake = zoho_desk_proxy::fake_zoho::FakeZoho::start().await.unwrap();
    let mut config = config_for(&fake, &FakeOptions::default());
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    config.upstream = zoho_desk_proxy::BaseUrl::parse(&format!("http://{closed}")).unwrap();
    let proxy = start_proxy(config).await;
    let response = fetch(proxy.url("/api/v1/tickets")).await;
    assert_proxy_error(response, 502, "PROXY_UPSTREAM_UNREACHABLE").await;
}

#[tokio::test]
async fn slow_desk_is_504() {
    let s = Scenario::with(FakeOptions::default(), |c| {
        c.timeouts.response = Duration::from_millis(300);
    })
    .await;
    s.zoho.set_desk_delay(Duration::from_secs(3));
    let response = fetch(s.url("/api/v1/tickets")).await;
    assert_proxy_error(response, 504, "PROXY_UPSTREAM_TIMEOUT").await;
}

/// Sends `requests` at once (each on its own connection, spread over the workers) to a
/// proxy allowing 3 at Desk; all get 200, and Desk never sees more than 3 at once.
async fn at_most_three_reach_desk_at_once(workers: usize, requests: usize) {
    let s = Scenario::with(FakeOptions::default(), |c| {
        c.max_upstream_requests = 3;
        c.workers = workers;
    })
    .await;
    s.zoho.set_desk_delay(Duration::from_millis(200));
    let sent = (0..requests).map(|_| status(s.url("/api/v1/tickets")));
    let statuses = futures_util::future::join_all(sent).await;
    assert!(statuses.iter().all(|&code| code == 200), "{statuses:?}");
    assert_eq!(s.zoho.desk_request_count(), requests as u64);
    assert_eq!(s.zoho.desk_max_concurrent(), 3, "at most 3 at Desk at once");
}

#[tokio::test]
async fn requests_beyond_max_upstream_requests_wait_their_turn() {
    at_most_three_reach_desk_at_once(1, 9).await;
}

#[tokio::test]
async fn max_upstream_requests_holds_for_the_whole_process_across_workers() {
    // Split into parts that add up to 3 (2 and 1); parts rounded up would allow 4.
    at_most_three_reach_desk_at_once(2, 12).await;
}

#[tokio::test]
async fn a_queued_request_times_out_as_504_only_for_its_wait_in_line() {
    let s = Scenario::with(FakeOptions::default(), |c| {
        c.max_upstream_requests = 1;
        c.workers = 1;
        c.timeouts.response = Duration::from_millis(500);
    })
    .await;
    // It waits 350 ms for the only slot, then Desk takes its 350 ms: within the time
    // Desk has once the request is sent.
    s.zoho.set_desk_delay(Duration::from_millis(350));
    let first = status(s.url("/api/v1/tickets"));
    let queued = async {
        wait_for_desk_requests(&s.zoho, 1).await;
        status(s.url("/api/v1/tickets")).await
    };
    assert_eq!(tokio::join!(first, queued), (200, 200));
    // Desk takes 800 ms: the first gets its 504 at 500 ms, but Desk keeps its call until
    // it answers, so the second waits past its 500 ms, gets a 504, and is never sent.
    s.zoho.set_desk_delay(Duration::from_millis(800));
    let sent_before = s.zoho.desk_request_count();
    let first = fetch(s.url("/api/v1/tickets"));
    let queued = async {
        wait_for_desk_requests(&s.zoho, sent_before + 1).await;
        fetch(s.url("/api/v1/tickets")).await
    };
    let (first, queued) = tokio::join!(first, queued);
    assert_proxy_error(first, 504, "PROXY_UPSTREAM_TIMEOUT").await;
    let body = assert_proxy_error(queued, 504, "PROXY_UPSTREAM_TIMEOUT").await;
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("never sent"),
        "{body}"
    );
    assert_eq!(s.zoho.desk_request_count(), sent_before + 1);
}

#[tokio::test]
async fn uploads_and_downloads_stream() {
    let s = Scenario::start().await;
    let size: u64 = 8 * 1024 * 1024;
    let response = fetch(s.url(&format!("/api/v1/download?bytes={size}"))).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-length"],
        size.to_string().as_str()
    );
    let bytes = response.bytes().await.unwrap();
    assert_eq!(bytes.len() as u64, size);
    assert!(bytes.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));

    // A chunked upload (unknown length) streams through.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..64).map(|_| Ok(vec![7u8; 128 * 1024])).collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let response = client()
        .post(s.url("/api/v1/upload"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let answer: serde_json::Value = response.json().await.unwrap();
    assert_eq!(answer["bytes"], 64 * 128 * 1024);
}

#[tokio::test]
async fn health_and_ready() {
    let s = Scenario::start().await;
    let health = fetch(s.url("/_proxy/health")).await;
    assert_eq!(health.status(), 200);
    assert_eq!(
        health.json::<serde_json::Value>().await.unwrap(),
        serde_json::json!({"status": "ok"})
    );
    // Ready after the first refresh.
    wait_for_token_requests(&s.zoho, 1).await;
    let mut ready = fetch(s.url("/_proxy/ready")).await;
    for _ in 0..50 {
        if ready.status() == 200 {
            break;
        }
        tokio::task::yield_now().await;
        ready = fetch(s.url("/_proxy/ready")).await;
    }
    assert_eq!(ready.status(), 200);
    // The prefix itself, and any name under it, is the proxy's: a 404 that lists the
    // endpoints, never forwarded.
    for path in ["/_proxy/nothing", "/_proxy", "/_proxy/", "/_proxy?x=1"] {
        let unknown = assert_proxy_error(fetch(s.url(path)).await, 404, "PROXY_NOT_FOUND").await;
        assert!(
            unknown["message"]
                .as_str()
                .unwrap()
                .contains("/_proxy/health"),
            "{path}: {unknown}"
        );
    }
    assert_eq!(
        s.zoho.desk_request_count(),
        0,
        "/_proxy/ is never forwarded"
    );
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn a_request_whose_client_left_while_it_waited_for_a_slot_is_never_sent() {
    use tokio::io::AsyncWriteExt;

    let s = Scenario::with(FakeOptions::default(), |c| {
        c.max_upstream_requests = 1;
        c.workers = 1;
    })
    .await;
    s.zoho.set_desk_delay(Duration::from_millis(300));
    // The first request holds the only slot for 300 ms.
    let first = tokio::spawn(status(s.url("/api/v1/tickets?n=1")));
    while s.zoho.desk_request_count() == 0 {
        tokio::task::yield_now().await;
    }
    // The second queues behind it, and its client goes away.
    let mut gone = tokio::net::TcpStream::connect(s.proxy.addr).await.unwrap();
    gone.write_all(
        b"POST /api/v1/tickets?n=2 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n\r\n{}",
    )
    .await
    .unwrap();
    drop(gone);
    // The slot is first come, first served: had the second still been waiting, it would
    // reach Desk before the third.
    let third = status(s.url("/api/v1/tickets?n=3")).await;
    assert_eq!((first.await.unwrap(), third), (200, 200));
    let seen: Vec<String> = s
        .zoho
        .desk_requests()
        .into_iter()
        .map(|r| r.path_and_query)
        .collect();
    assert_eq!(seen, ["/api/v1/tickets?n=1", "/api/v1/tickets?n=3"]);
}
