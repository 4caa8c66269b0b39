//! Desk's limits (README "Desk's limits"): requests beyond the portal's concurrency wait
//! in line instead of getting Desk's 429s, over HTTP/1.1 and HTTP/2; a client that leaves
//! the line is never sent; a 429 is retried once for idempotent requests only; Desk's
//! remaining credits show in the metrics and `/_proxy/ready`.

mod support;

use std::time::Duration;

use futures_util::future::join_all;
use support::*;
use zoho_desk_proxy::fake_zoho::FakeOptions;

/// A proxy with `desk.max_concurrent = limit` in front of a fake Desk capped at `cap`
/// whose answers take `delay`.
async fn capped(limit: usize, cap: usize, delay: Duration) -> Scenario {
    let s = Scenario::with(FakeOptions::default(), |c| {
        c.desk.max_concurrent = limit;
    })
    .await;
    s.zoho.set_desk_concurrency_cap(Some(cap));
    s.zoho.set_desk_delay(delay);
    s
}

#[tokio::test]
async fn thirty_parallel_requests_never_exceed_the_limit_at_desk_and_all_succeed() {
    for h2 in [false, true] {
        let s = capped(3, 3, Duration::from_millis(150)).await;
        let client = if h2 { h2c_client() } else { client() };
        let url = s.url("/api/v1/tickets");
        let answers = join_all((0..30).map(|_| client.get(&url).send())).await;
        for answer in answers {
            assert_eq!(answer.unwrap().status(), 200, "h2: {h2}");
        }
        assert_eq!(s.zoho.desk_429s(), 0, "h2: {h2}: Desk never refused a call");
        assert_eq!(s.zoho.desk_max_concurrent(), 3, "h2: {h2}");
        wait_for_metric(&s.proxy, "zoho_proxy_desk_in_flight 0").await;
        wait_for_metric(&s.proxy, "zoho_proxy_desk_queue_depth 0").await;
    }
}

#[tokio::test]
async fn without_the_limit_desk_refuses_calls_over_its_cap() {
    // The fake's cap is what the limit protects against: with the limit above it, Desk
    // answers 429 (each retried once by the proxy, and some still reach the clients).
    let s = capped(100, 3, Duration::from_millis(150)).await;
    let url = s.url("/api/v1/tickets");
    let client = client();
    let answers = join_all((0..30).map(|_| client.get(&url).send())).await;
    let refused = answers
        .into_iter()
        .filter(|a| a.as_ref().is_ok_and(|a| a.status() == 429))
        .count();
    assert!(s.zoho.desk_429s() > 0);
    assert!(refused > 0, "some clients saw Desk's 429");
}

#[tokio::test]
async fn the_waiters_are_shown_in_the_metrics_while_they_wait() {
    let s = capped(1, 1, Duration::from_millis(300)).await;
    let url = s.url("/api/v1/tickets");
    let client = client();
    let requests: Vec<_> = (0..3)
        .map(|_| tokio::spawn(client.get(&url).send()))
        .collect();
    wait_for_metric(&s.proxy, "zoho_proxy_desk_in_flight 1").await;
    wait_for_metric(&s.proxy, "zoho_proxy_desk_queue_depth 2").await;
    for request in requests {
        assert_eq!(request.await.unwrap().unwrap().status(), 200);
    }
    assert_eq!(s.zoho.desk_max_concurrent(), 1);
}

#[tokio::test]
async fn the_metrics_count_the_proxy_s_own_line_when_it_is_the_tighter() {
    // Desk's limit cannot bind: the proxy's own bound (2) is the line.
    let s = Scenario::with(FakeOptions::default(), |c| {
        c.desk.max_concurrent = 10;
        c.max_upstream_requests = 2;
        c.workers = 1;
    })
    .await;
    s.zoho.set_desk_delay(Duration::from_millis(400));
    let url = s.url("/api/v1/tickets");
    let client = client();
    let requests: Vec<_> = (0..6)
        .map(|_| tokio::spawn(client.get(&url).send()))
        .collect();
    wait_for_metric(&s.proxy, "zoho_proxy_desk_queue_depth 4").await;
    let text = metrics_text(s.proxy.url("/_proxy/metrics")).await;
    assert!(
        text.lines().any(|l| l == "zoho_proxy_desk_in_flight 2"),
        "two at Desk while four wait: {text}"
    );
    for request in requests {
        assert_eq!(request.await.unwrap().unwrap().status(), 200);
    }
    assert_eq!(s.zoho.desk_max_concurrent(), 2);
    wait_for_metric(&s.proxy, "zoho_proxy_desk_in_flight 0").await;
    wait_for_metric(&s.proxy, "zoho_proxy_desk_queue_depth 0").await;
}

#[tokio::test]
async fn a_client_that_leaves_the_line_is_never_sent() {
    let s = capped(1, 1, Duration::from_millis(400)).await;
    let url = s.url("/api/v1/tickets");
    let first = tokio::spawn(client().get(&url).send());
    wait_for_desk_requests(&s.zoho, 1).await;
    // Waits in line, then gives up.
    let gone = client()
        .get(&url)
        .timeout(Duration::from_millis(100))
        .send()
        .await;
    assert!(gone.is_err());
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    // The next request goes; the one that left never did.
    assert_eq!(status(&url).await, 200);
    assert_eq!(s.zoho.desk_request_count(), 2);
    wait_for_metric(&s.proxy, "zoho_proxy_desk_queue_depth 0").await;
}

#[tokio::test]
async fn a_call_whose_client_left_keeps_its_slot_until_desk_is_done() {
    for h2 in [false, true] {
        // Desk takes 600 ms, and goes on with a call whose caller hung up.
        let s = capped(1, 1, Duration::from_millis(600)).await;
        let client = if h2 { h2c_client() } else { client() };
        let url = s.url("/api/v1/tickets");
        let gone = client
            .get(&url)
            .timeout(Duration::from_millis(150))
            .send()
            .await;
        assert!(gone.is_err());
        // It reached Desk (on a slow machine, perhaps only after its client gave up).
        wait_for_desk_requests(&s.zoho, 1).await;
        assert_eq!(s.zoho.desk_request_count(), 1);
        // The next request waits for Desk to be done with the first instead of meeting
        // Desk's limit (and its 429).
        let next = client.get(&url).send().await.unwrap();
        assert_eq!(next.status(), 200, "h2: {h2}");
        assert_eq!(s.zoho.desk_429s(), 0, "h2: {h2}");
        assert_eq!(s.zoho.desk_max_concurrent(), 1, "h2: {h2}");
        wait_for_metric(&s.proxy, "zoho_proxy_desk_in_flight 0").await;
    }
}

#[tokio::test]
async fn a_call_desk_has_not_answered_by_response_secs_keeps_its_slot_after_the_504() {
    for h2 in [false, true] {
        // Desk takes 500 ms; the proxy gives up waiting at 300 ms, and Desk goes on.
        let s = Scenario::with(FakeOptions::default(), |c| {
            c.desk.max_concurrent = 2;
            c.timeouts.response = Duration::from_millis(300);
        })
        .await;
        s.zoho.set_desk_concurrency_cap(Some(2));
        s.zoho.set_desk_delay(Duration::from_millis(500));
        let client = if h2 { h2c_client() } else { client() };
        let url = s.url("/api/v1/tickets");
        // A steady stream of requests, more than Desk can take.
        let mut requests = Vec::new();
        for _ in 0..16 {
            requests.push(tokio::spawn(client.get(&url).send()));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut timed_out = 0;
        for request in requests {
            let status = request.await.unwrap().unwrap().status();
            assert!(status == 200 || status == 504, "h2: {h2}: {status}");
            timed_out += usize::from(status == 504);
        }
        assert!(
            timed_out > 0,
            "h2: {h2}: Desk was slower than response_secs"
        );
        wait_for_metric(&s.proxy, "zoho_proxy_desk_in_flight 0").await;
        // A 504's call still counted at Desk until Desk was done with it.
        assert_eq!(s.zoho.desk_429s(), 0, "h2: {h2}");
        assert!(
            s.zoho.desk_max_concurrent() <= 2,
            "h2: {h2}: {}",
            s.zoho.desk_max_concurrent()
        );
    }
}

#[tokio::test]
async fn a_request_that_waits_past_response_secs_gets_504_and_is_never_sent() {
    let s = Scenario::one_desk_call(Duration::from_millis(300)).await;
    // Holds Desk's one call for 1.5 s: its head comes at once, its body a part every
    // 100 ms (the call is held until the body is done; the head, and each part, count
    // against response_secs).
    let slow_url = s.url("/api/v1/drip?ms=1500&every=100");
    let slow = tokio::spawn(async move {
        let answer = client().get(slow_url).send().await.unwrap();
        (answer.status(), answer.bytes().await.is_ok())
    });
    wait_for_desk_requests(&s.zoho, 1).await;
    let started = std::time::Instant::now();
    let late = fetch(s.url("/api/v1/tickets")).await;
    let body = assert_proxy_error(late, 504, "PROXY_UPSTREAM_TIMEOUT").await;
    // It says what happened: a wait for a call, not a silent Desk.
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("desk.max_concurrent, 1") && message.contains("never sent"),
        "{message}"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(slow.await.unwrap(), (http::StatusCode::OK, true));
    assert_eq!(
        s.zoho.desk_request_count(),
        1,
        "the late request never reached Desk"
    );
}

#[tokio::test]
async fn a_request_out_of_line_gets_desk_s_whole_response_time() {
    // Desk takes 600 ms; the second request waits 600 ms in line, of its 1 s. Sent with
    // the 400 ms left, it was given up at 1 s while Desk did the work (a retried POST
    // then creates twice; audit).
    let s = Scenario::one_desk_call(Duration::from_millis(1000)).await;
    s.zoho.set_desk_delay(Duration::from_millis(600));
    let client = client();
    let (first, second) = tokio::join!(
        client.get(s.url("/api/v1/tickets")).send(),
        client.get(s.url("/api/v1/contacts")).send(),
    );
    assert_eq!(first.unwrap().status(), 200);
    assert_eq!(second.unwrap().status(), 200);
    assert_eq!(s.zoho.desk_request_count(), 2);
}

#[tokio::test]
async fn a_429_is_retried_once_for_idempotent_requests_after_retry_after() {
    let s = Scenario::start().await;
    // GET: retried after Retry-After (0 s here), and the client sees Desk's second answer.
    s.zoho.throttle_next_desk_requests(1, Some(0));
    assert_eq!(status(s.url("/api/v1/tickets")).await, 200);
    assert_eq!(s.zoho.desk_request_count(), 2);
    // At most once.
    s.zoho.throttle_next_desk_requests(2, Some(0));
    let answer = fetch(s.url("/api/v1/tickets")).await;
    assert_eq!(answer.status(), 429);
    assert_eq!(answer.headers()["retry-after"], "0");
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(
        body["errorCode"], "TOO_MANY_REQUESTS",
        "Desk's answer, unchanged"
    );
    assert_eq!(s.zoho.desk_request_count(), 4);
    // POST is not idempotent: Desk's 429 goes to the client at once.
    s.zoho.throttle_next_desk_requests(1, Some(0));
    let post = client()
        .post(s.url("/api/v1/tickets"))
        .header("content-type", "application/json")
        .body(r#"{"subject":"twice?"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 429);
    assert_eq!(s.zoho.desk_request_count(), 5);
    // PUT and DELETE are.
    s.zoho.throttle_next_desk_requests(1, Some(0));
    let delete = client()
        .delete(s.url("/api/v1/tickets/189200000000100003"))
        .send()
        .await
        .unwrap();
    assert_ne!(delete.status(), 429);
    assert_eq!(s.zoho.desk_request_count(), 7);
    wait_for_metric(&s.proxy, "zoho_proxy_desk_429_total 5").await;
}

#[tokio::test]
async fn a_429_after_a_401_retry_is_retried_too() {
    // Each retry once, in either order: a token revoked under load must not hand the
    // clients 429s the proxy would otherwise have absorbed.
    let s = Scenario::start().await;
    assert_eq!(status(s.url("/api/v1/tickets")).await, 200);
    // The 401 (a revoked token), then Desk's 429 to the retry, then the 429's retry.
    s.zoho.revoke_all_tokens();
    s.zoho.throttle_desk_requests_after(1, 1, Some(0));
    assert_eq!(status(s.url("/api/v1/tickets")).await, 200);
    assert_eq!(s.zoho.desk_request_count(), 4);
    assert_eq!(s.zoho.desk_429s(), 1);
    // Each once: 401, 429, 429 gives the client Desk's second 429 after three calls.
    s.zoho.revoke_all_tokens();
    s.zoho.throttle_desk_requests_after(1, 2, Some(0));
    assert_eq!(status(s.url("/api/v1/tickets")).await, 429);
    assert_eq!(s.zoho.desk_request_count(), 7);
    // And 429 then 401: both retried.
    s.zoho.throttle_desk_requests_after(0, 1, Some(0));
    s.zoho.revoke_all_tokens();
    let calls = s.zoho.desk_request_count();
    assert_eq!(status(s.url("/api/v1/tickets")).await, 200, "429 then 401");
    assert_eq!(s.zoho.desk_request_count(), calls + 3);
}

#[tokio::test]
async fn a_429_whose_wait_does_not_fit_the_response_time_goes_to_the_client() {
    let s = Scenario::with(FakeOptions::default(), |c| {
        c.timeouts.response = Duration::from_secs(2);
    })
    .await;
    s.zoho.throttle_next_desk_requests(1, Some(60));
    let started = std::time::Instant::now();
    let answer = fetch(s.url("/api/v1/tickets")).await;
    assert_eq!(answer.status(), 429);
    assert_eq!(answer.headers()["retry-after"], "60");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(s.zoho.desk_request_count(), 1);
    // No Retry-After: 1 s.
    s.zoho.throttle_next_desk_requests(1, None);
    let started = std::time::Instant::now();
    assert_eq!(status(s.url("/api/v1/tickets")).await, 200);
    assert!(started.elapsed() >= Duration::from_secs(1));
}

#[tokio::test]
async fn a_retry_after_a_429_has_what_is_left_of_the_response_time() {
    let s = Scenario::with(FakeOptions::default(), |c| {
        c.timeouts.response = Duration::from_secs(2);
    })
    .await;
    // Desk takes 1.2 s for each answer: the 429 comes at 1.2 s, and its retry (at once)
    // would have its head at 2.4 s, past the request's 2 s.
    s.zoho.set_desk_delay(Duration::from_millis(1200));
    s.zoho.throttle_next_desk_requests(1, Some(0));
    let answer = fetch(s.url("/api/v1/tickets")).await;
    assert_eq!(answer.status(), 504);
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(body["errorCode"], "PROXY_UPSTREAM_TIMEOUT", "{body}");
    assert_eq!(s.zoho.desk_request_count(), 2, "retried, then timed out");
}

#[tokio::test]
async fn a_retry_after_a_401_that_follows_a_429_retry_keeps_the_request_s_time() {
    let s = Scenario::with(FakeOptions::default(), |c| {
        c.timeouts.response = Duration::from_secs(2);
    })
    .await;
    // Each answer takes 0.8 s: a 429 at 0.8 s, its retry's 401 at 1.6 s, and the retry
    // after the 401 would have its head at 2.4 s, past the request's 2 s.
    s.zoho.set_desk_delay(Duration::from_millis(800));
    s.zoho.throttle_next_desk_requests(1, Some(0));
    s.zoho.fail_next_desk_requests(2, Some("INVALID_OAUTH"));
    let answer = fetch(s.url("/api/v1/tickets")).await;
    assert_eq!(answer.status(), 504);
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(body["errorCode"], "PROXY_UPSTREAM_TIMEOUT", "{body}");
    assert_eq!(
        s.zoho.desk_request_count(),
        3,
        "the 429's retry, then the 401's"
    );
}

#[tokio::test]
async fn desk_s_remaining_credits_show_in_the_metrics_and_ready() {
    let s = Scenario::start().await;
    let metrics = fetch(s.url("/_proxy/metrics")).await.text().await.unwrap();
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("zoho_proxy_desk_rate_limit_remaining ")),
        "unknown is not 0: {metrics}"
    );
    let ready: serde_json::Value = fetch(s.url("/_proxy/ready")).await.json().await.unwrap();
    assert!(ready.get("desk_rate_limit_remaining").is_none(), "{ready}");
    assert_eq!(ready["desk_max_concurrent"], 10, "the standard edition's");
    let answer = fetch(s.url("/api/v1/tickets")).await;
    let remaining: i64 = answer.headers()["x-rate-limit-remaining-v3"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    wait_for_metric(
        &s.proxy,
        &format!("zoho_proxy_desk_rate_limit_remaining {remaining}"),
    )
    .await;
    let ready: serde_json::Value = fetch(s.url("/_proxy/ready")).await.json().await.unwrap();
    assert_eq!(ready["desk_rate_limit_remaining"], remaining, "{ready}");
}
