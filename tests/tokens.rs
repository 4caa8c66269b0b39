//! Tokens (README "Tokens"): single flight, generation check, background refresh, Zoho's quirks,
//! failures, and the refresh guard — seen from outside, through the proxy.

mod support;

use std::time::Duration;

use support::*;
use zoho_desk_proxy::fake_zoho::{AccountsBehavior, FakeOptions};

async fn get(s: &Scenario, path: &str) -> reqwest::Response {
    fetch(s.url(path)).await
}

/// Asks for tickets until the proxy serves them again, after the backoff of a failed
/// refresh (5 s at most).
async fn served_again(s: &Scenario) {
    eventually("a request is served again", async || {
        get(s, "/api/v1/tickets").await.status() == 200
    })
    .await;
}

#[tokio::test]
async fn concurrent_401s_cause_one_refresh_and_all_succeed() {
    let s = Scenario::start().await;
    assert_eq!(get(&s, "/api/v1/tickets").await.status(), 200);
    assert_eq!(s.zoho.token_requests(), 1);

    s.zoho.revoke_all_tokens();
    // Desk answers after a while, so that most 401s arrive after the refresh they caused
    // has finished: only the generation check keeps those from refreshing again.
    s.zoho.set_desk_delay(Duration::from_millis(200));
    let c = client();
    let requests = (0..500).map(|i| {
        let c = c.clone();
        let url = s.url("/api/v1/echo");
        async move {
            // Half with a small body, replayed after the refresh.
            let request = if i % 2 == 0 {
                c.get(url)
            } else {
                c.post(url).body(format!("body-{i}"))
            };
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let echo: serde_json::Value = response.json().await.unwrap_or_default();
            (i, status, echo)
        }
    });
    let results = futures_util::future::join_all(requests).await;
    for (i, status, echo) in &results {
        assert_eq!(*status, 200, "request {i}: {echo}");
        if i % 2 == 1 {
            assert_eq!(echo["body"], format!("body-{i}"), "replayed body of {i}");
        }
    }
    assert_eq!(
        s.zoho.token_requests(),
        2,
        "500 concurrent 401s must cost exactly one refresh"
    );
}

#[tokio::test]
async fn a_second_401_goes_back_as_desk_sent_it() {
    let s = Scenario::start().await;
    assert_eq!(get(&s, "/api/v1/tickets").await.status(), 200);
    s.zoho.fail_next_desk_requests(2, Some("INVALID_OAUTH"));
    let response = get(&s, "/api/v1/tickets").await;
    assert_eq!(response.status(), 401);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["errorCode"], "INVALID_OAUTH");
    // The retry's token was rejected too: it is never sent again, and one refresh
    // replaces it for the requests after it.
    wait_for_token_requests(&s.zoho, 3).await;
    assert_eq!(get(&s, "/api/v1/tickets").await.status(), 200);
    assert_eq!(s.zoho.token_requests(), 3, "one refresh per rejected token");
    let sent: Vec<_> = s
        .zoho
        .desk_requests()
        .iter()
        .map(|r| r.headers["authorization"].clone())
        .collect();
    assert_eq!(sent.len(), 4);
    assert_ne!(sent[1], sent[2], "the retry used a new token");
    assert_ne!(
        sent[2], sent[3],
        "the rejected retry's token was not sent again"
    );
}

#[tokio::test]
async fn a_401_without_body_refreshes_and_retries() {
    let s = Scenario::start().await;
    assert_eq!(get(&s, "/api/v1/tickets").await.status(), 200);
    s.zoho.fail_next_desk_requests(1, None);
    assert_eq!(get(&s, "/api/v1/tickets").await.status(), 200);
    assert_eq!(s.zoho.token_requests(), 2);
}

#[tokio::test]
async fn the_retry_after_a_401_sends_the_client_s_headers_again_with_one_token() {
    let s = Scenario::start().await;
    s.zoho.fail_next_desk_requests(1, Some("INVALID_OAUTH"));
    let response = client()
        .post(s.url("/api/v1/echo"))
        .header("orgId", "7001")
        .header("X-Trace", "a")
        .header("X-Trace", "b")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let sent = s.zoho.desk_requests();
    assert_eq!(sent.len(), 2);
    for (attempt, request) in sent.iter().enumerate() {
        assert_eq!(request.headers["orgid"], "7001", "attempt {attempt}");
        let traces: Vec<_> = request.headers.get_all("x-trace").iter().collect();
        assert_eq!(traces, ["a", "b"], "attempt {attempt}");
        assert_eq!(
            request.headers.get_all("authorization").iter().count(),
            1,
            "attempt {attempt}"
        );
    }
    assert_ne!(
        sent[0].headers["authorization"], sent[1].headers["authorization"],
        "the retry used the new token"
    );
}

#[tokio::test]
async fn scope_class_401s_pass_through_and_cost_no_refresh() {
    let s = Scenario::start().await;
    assert_eq!(get(&s, "/api/v1/tickets").await.status(), 200);
    for code in ["SCOPE_MISMATCH", "OAUTH_ORG_MISMATCH", "UNAUTHORIZED"] {
        s.zoho.fail_next_desk_requests(1, Some(code));
        let response = get(&s, "/api/v1/tickets").await;
        assert_eq!(response.status(), 401);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["errorCode"], code);
    }
    assert_eq!(s.zoho.token_requests(), 1);
}

#[tokio::test]
async fn a_compressed_401_is_read_for_its_error_code() {
    // Desk compresses its 401 when the client accepts it (curl --compressed, requests,
    // Node): the proxy reads it all the same, and passes it on as Desk sent it.
    let s = Scenario::start().await;
    assert_eq!(get(&s, "/api/v1/tickets").await.status(), 200);
    let gzipped = |path: &str| {
        client()
            .get(s.url(path))
            .header("accept-encoding", "gzip, deflate, br")
            .send()
    };
    for code in ["SCOPE_MISMATCH", "OAUTH_ORG_MISMATCH", "UNAUTHORIZED"] {
        s.zoho.fail_next_desk_requests(1, Some(code));
        let response = gzipped("/api/v1/tickets").await.unwrap();
        assert_eq!(response.status(), 401, "{code}");
        assert_eq!(response.headers()["content-encoding"], "gzip", "{code}");
        let compressed = response.bytes().await.unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(
            &mut flate2::read::GzDecoder::new(&compressed[..]),
            &mut text,
        )
        .unwrap();
        assert!(text.contains(code), "{text}");
    }
    assert_eq!(s.zoho.token_requests(), 1, "no refresh for a valid token");
    // One that says the token is bad is refreshed and retried.
    s.zoho.fail_next_desk_requests(1, Some("INVALID_OAUTH"));
    assert_eq!(gzipped("/api/v1/tickets").await.unwrap().status(), 200);
    assert_eq!(s.zoho.token_requests(), 2);
}

#[tokio::test]
async fn a_401_whose_body_stalls_is_a_504_and_frees_its_call() {
    let s = Scenario::one_desk_call(Duration::from_millis(500)).await;
    assert_eq!(get(&s, "/api/v1/tickets").await.status(), 200);
    s.zoho.stall_forced_401_bodies(true);
    s.zoho.fail_next_desk_requests(1, Some("INVALID_OAUTH"));
    let response = tokio::time::timeout(Duration::from_secs(10), get(&s, "/api/v1/tickets"))
        .await
        .expect("answered within the response time, not held");
    assert_eq!(response.status(), 504);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["errorCode"], "PROXY_UPSTREAM_TIMEOUT", "{body}");
    // Desk's one call is free again.
    assert_eq!(get(&s, "/api/v1/tickets").await.status(), 200);
    let metrics = get(&s, "/_proxy/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("zoho_proxy_upstream_errors_total{kind=\"timeout\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_401_larger_than_any_desk_error_has_no_error_code_so_it_costs_a_refresh_and_a_retry() {
    let s = Scenario::with(FakeOptions::default(), |c| {
        c.desk.max_concurrent = 1;
        c.replay_body_bytes = 16;
    })
    .await;
    assert_eq!(get(&s, "/api/v1/tickets").await.status(), 200);
    // A body of 70 KB: no Desk error is that large (a gateway's page, say), and none the
    // proxy reads: a 401 whose body has no errorCode (it had been a 502 and no refresh).
    let huge = "INVALID_OAUTH".repeat(5_500);
    s.zoho.fail_next_desk_requests(1, Some(&huge));
    assert_eq!(get(&s, "/api/v1/tickets").await.status(), 200, "retried");
    assert_eq!(s.zoho.token_requests(), 2, "one refresh");
    // A request that cannot be sent again gets a 502 that says so (the 401 is not held
    // whole to be passed on), and the refresh still happens.
    s.zoho.fail_next_desk_requests(1, Some(&huge));
    let response = post_1000_bytes(&s).await;
    assert_eq!(response.status(), 502);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["errorCode"], "PROXY_UPSTREAM_UNREACHABLE", "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("larger than 64 KiB"), "{message}");
    assert_eq!(get(&s, "/api/v1/tickets").await.status(), 200);
    assert_eq!(s.zoho.token_requests(), 3, "the refresh happened");
}

/// A POST of 1000 bytes to the fake's echo: more than the tests' 16-byte replay buffer.
async fn post_1000_bytes(s: &Scenario) -> reqwest::Response {
    client()
        .post(s.url("/api/v1/echo"))
        .body(vec![b'x'; 1000])
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_body_too_large_to_replay_gets_the_401_and_the_refresh_still_happens() {
    let s = Scenario::with(FakeOptions::default(), |c| c.replay_body_bytes = 16).await;
    assert_eq!(get(&s, "/api/v1/tickets").await.status(), 200);
    s.zoho.revoke_all_tokens();
    let response = post_1000_bytes(&s).await;
    assert_eq!(response.status(), 401, "a streamed body cannot be replayed");
    wait_for_token_requests(&s.zoho, 2).await;
    let response = post_1000_bytes(&s).await;
    assert_eq!(response.status(), 200);
    assert_eq!(s.zoho.token_requests(), 2);
}

#[tokio::test]
async fn tokens_are_refreshed_in_the_background_before_expiry() {
    let options = FakeOptions {
        token_lifetime: Duration::from_secs(2),
        ..FakeOptions::default()
    };
    let s = Scenario::with(options, |_| {}).await;
    // Refreshes at half-life (margin 300 s capped at 1 s) without any request.
    wait_for_token_requests(&s.zoho, 3).await;
    // And no request ever carries an expired token.
    for _ in 0..20 {
        assert_eq!(get(&s, "/api/v1/tickets").await.status(), 200);
    }
}

#[tokio::test]
async fn expires_in_in_milliseconds_is_understood() {
    let options = FakeOptions {
        expires_in_ms_quirk: true,
        ..FakeOptions::default()
    };
    let s = Scenario::with(options, |_| {}).await;
    assert_eq!(get(&s, "/api/v1/tickets").await.status(), 200);
    let ready: serde_json::Value = get(&s, "/_proxy/ready").await.json().await.unwrap();
    let secs = ready["token_expires_in_secs"].as_u64().unwrap();
    assert!((3500..=3600).contains(&secs), "{ready}");
}

#[tokio::test]
async fn throttling_answers_503_with_retry_after_and_backs_off() {
    for status in [200, 400] {
        let s = Scenario::start().await;
        s.zoho
            .set_accounts_behavior(AccountsBehavior::Throttle { status });
        let body = assert_proxy_error(
            get(&s, "/api/v1/tickets").await,
            503,
            "PROXY_TOKEN_UNAVAILABLE",
        )
        .await;
        assert!(
            body["message"].as_str().unwrap().contains("throttl"),
            "{body}"
        );
        let response = get(&s, "/api/v1/tickets").await;
        let retry_after: u64 = response.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(retry_after >= 50, "Retry-After {retry_after}");
        assert_proxy_error(response, 503, "PROXY_TOKEN_UNAVAILABLE").await;
        assert_eq!(
            s.zoho.token_requests(),
            1,
            "no new Accounts call while throttled"
        );
    }
}

#[tokio::test]
async fn rejected_credentials_answer_auth_rejected_and_are_not_retried() {
    let options = FakeOptions {
        refresh_token: "1000.other".into(),
        ..FakeOptions::default()
    };
    let fake_options = FakeOptions::default();
    let fake = zoho_desk_proxy::fake_zoho::FakeZoho::start_with(fake_options)
        .await
        .unwrap();
    let proxy = start_proxy(config_for(&fake, &options)).await;
    let zoho = fake.control();
    for _ in 0..3 {
        let response = fetch(proxy.url("/api/v1/tickets")).await;
        let body = assert_proxy_error(response, 503, "PROXY_AUTH_REJECTED").await;
        assert!(
            body["message"].as_str().unwrap().contains("exchange"),
            "{body}"
        );
    }
    let ready = fetch(proxy.url("/_proxy/ready")).await;
    assert_eq!(ready.status(), 503);
    let ready: serde_json::Value = ready.json().await.unwrap();
    assert!(
        ready["reason"].as_str().unwrap().contains("invalid_code"),
        "{ready}"
    );
    assert_eq!(zoho.token_requests(), 1);
}

#[tokio::test]
async fn accounts_down_while_the_token_is_valid_is_invisible() {
    let s = Scenario::start().await;
    assert_eq!(get(&s, "/api/v1/tickets").await.status(), 200);
    s.zoho.set_accounts_behavior(AccountsBehavior::Unavailable);
    for _ in 0..10 {
        assert_eq!(get(&s, "/api/v1/tickets").await.status(), 200);
    }
}

#[tokio::test]
async fn a_401_retry_that_never_went_out_is_not_logged_or_counted_as_one() {
    let s = Scenario::start().await;
    assert_eq!(get(&s, "/api/v1/tickets").await.status(), 200);
    // Desk rejects the token, and Accounts cannot give another: the retry never goes out.
    s.zoho.set_accounts_behavior(AccountsBehavior::Unavailable);
    s.zoho.revoke_all_tokens();
    assert_proxy_error(
        get(&s, "/api/v1/tickets").await,
        503,
        "PROXY_TOKEN_UNAVAILABLE",
    )
    .await;
    let metrics = metrics_text(s.url("/_proxy/metrics")).await;
    assert!(
        metrics.contains("zoho_proxy_retries_after_401_total 0"),
        "{metrics}"
    );
    // One that does go out is.
    s.zoho.set_accounts_behavior(AccountsBehavior::Normal);
    served_again(&s).await;
    s.zoho.revoke_all_tokens();
    assert_eq!(get(&s, "/api/v1/tickets").await.status(), 200);
    wait_for_metric(&s.proxy, "zoho_proxy_retries_after_401_total 1").await;
}

#[tokio::test]
async fn accounts_down_without_a_token_is_503_with_retry_after() {
    let s = Scenario::start().await;
    s.zoho
        .set_accounts_behavior(AccountsBehavior::CloseConnection);
    let response = get(&s, "/api/v1/tickets").await;
    assert!(response.headers().contains_key("retry-after"));
    assert_proxy_error(response, 503, "PROXY_TOKEN_UNAVAILABLE").await;
    // Backing off: the next request is answered at once, without a new call.
    let before = s.zoho.token_requests();
    assert_proxy_error(
        get(&s, "/api/v1/tickets").await,
        503,
        "PROXY_TOKEN_UNAVAILABLE",
    )
    .await;
    assert_eq!(s.zoho.token_requests(), before);
    // Accounts back: the proxy recovers after its backoff.
    s.zoho.set_accounts_behavior(AccountsBehavior::Normal);
    wait_for_token_requests(&s.zoho, before + 1).await;
    served_again(&s).await;
}

#[tokio::test]
async fn the_refresh_guard_holds_whatever_desk_does() {
    let s = Scenario::with(FakeOptions::default(), |c| {
        c.oauth.max_refreshes_per_10min = 3
    })
    .await;
    assert_eq!(get(&s, "/api/v1/tickets").await.status(), 200);
    // Desk keeps rejecting every token: each request costs at most one refresh, and the
    // guard stops them at 3.
    for _ in 0..6 {
        s.zoho.revoke_all_tokens();
        let _ = get(&s, "/api/v1/tickets").await;
    }
    assert_eq!(s.zoho.token_requests(), 3);
    s.zoho.revoke_all_tokens();
    let response = get(&s, "/api/v1/tickets").await;
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after > 60, "{retry_after}");
    let body = assert_proxy_error(response, 503, "PROXY_TOKEN_UNAVAILABLE").await;
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("3 token refreshes in the last 10 minutes (oauth.max_refreshes_per_10min)"),
        "{body}"
    );
}

#[tokio::test]
async fn a_hanging_accounts_gives_503_within_a_bounded_wait() {
    let s = Scenario::with(FakeOptions::default(), |c| {
        c.timeouts.response = Duration::from_millis(500);
    })
    .await;
    s.zoho.set_accounts_delay(Duration::from_secs(30));
    let started = std::time::Instant::now();
    let response = tokio::time::timeout(Duration::from_secs(5), get(&s, "/api/v1/tickets"))
        .await
        .expect("the request must not hang");
    assert!(response.headers().contains_key("retry-after"));
    assert_proxy_error(response, 503, "PROXY_TOKEN_UNAVAILABLE").await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

/// Sends `n` GETs at once, each on its own connection; their statuses.
async fn burst(s: &Scenario, n: usize) -> Vec<u16> {
    let requests = (0..n).map(|_| async {
        client()
            .get(s.url("/api/v1/tickets"))
            .send()
            .await
            .map_or(0, |r| r.status().as_u16())
    });
    futures_util::future::join_all(requests).await
}

/// Two upstream slots on one thread, and a Desk that takes 100 ms per request: requests
/// queue for Desk, as behind a busy portal.
async fn queued() -> Scenario {
    let s = Scenario::with(FakeOptions::default(), |c| {
        c.max_upstream_requests = 2;
        c.workers = 1;
    })
    .await;
    assert_eq!(get(&s, "/api/v1/tickets").await.status(), 200);
    s.zoho.set_desk_delay(DESK);
    s
}

const DESK: Duration = Duration::from_millis(100);

#[tokio::test]
async fn queued_requests_never_send_a_token_desk_already_rejected() {
    let s = queued().await;
    let zoho = s.zoho.clone();
    let revoke = tokio::spawn(async move {
        // Revoked while ~6 requests went through and the rest wait for a slot.
        wait_for_desk_requests(&zoho, 7).await;
        zoho.revoke_all_tokens();
    });
    let statuses = burst(&s, 60).await;
    revoke.await.unwrap();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");

    let seen = s.zoho.desk_requests();
    let rejected: Vec<_> = seen
        .iter()
        .filter(|r| r.token_accepted == Some(false))
        .collect();
    let first_401 = rejected
        .iter()
        .map(|r| r.received_at + DESK)
        .min()
        .expect("Desk rejected the revoked token");
    let late: Vec<_> = rejected
        .iter()
        .filter(|r| r.received_at > first_401 + Duration::from_millis(50))
        .map(|r| r.received_at - first_401)
        .collect();
    assert!(
        late.is_empty(),
        "{} of {} rejected sends arrived after Desk's first 401 (after {late:?})",
        late.len(),
        rejected.len()
    );
    assert!(
        rejected.len() <= 2,
        "only the 2 in flight: {}",
        rejected.len()
    );
    assert_eq!(s.zoho.token_requests(), 2, "one refresh");
}

#[tokio::test]
async fn a_retry_that_meets_a_revoked_new_token_marks_it_and_refreshes_at_once() {
    let s = queued().await;
    let zoho = s.zoho.clone();
    let revoke = tokio::spawn(async move {
        wait_for_desk_requests(&zoho, 5).await;
        zoho.revoke_all_tokens();
        // The new token is revoked soon after it is issued.
        wait_for_token_requests(&zoho, 2).await;
        tokio::time::sleep(DESK).await;
        zoho.revoke_all_tokens();
    });
    let statuses = burst(&s, 40).await;
    revoke.await.unwrap();
    let refused = statuses.iter().filter(|s| **s == 401).count();
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 401),
        "{statuses:?}"
    );
    // At most the retries in flight with the second token when it was revoked.
    assert!(refused <= 2, "{refused} of 40 clients got Desk's 401");
    assert_eq!(s.zoho.token_requests(), 3, "one refresh per revocation");
}

#[tokio::test]
async fn credentials_reloaded_during_a_refresh_are_not_undone_by_its_answer() {
    let options = FakeOptions::default();
    let fake = zoho_desk_proxy::fake_zoho::FakeZoho::start_with(options.clone())
        .await
        .unwrap();
    let zoho = fake.control();
    let good = config_for(&fake, &options);
    let mut wrong = good.clone();
    wrong.oauth.client_secret = zoho_desk_proxy::Secret::new("wrong-secret".into());
    let (proxy, reload) = start_proxy_with_reload(wrong).await;
    // The wrong secret's call is slow: the operator fixes it while it is in flight.
    zoho.set_accounts_delay(Duration::from_secs(1));
    let request = tokio::spawn({
        let url = proxy.url("/api/v1/tickets");
        async move { fetch(url).await.status().as_u16() }
    });
    wait_for_token_requests(&zoho, 1).await;
    reload.send(good).await.unwrap();
    assert_eq!(
        request.await.unwrap(),
        200,
        "served with the reloaded credentials"
    );
    let ready = fetch(proxy.url("/_proxy/ready")).await;
    assert_eq!(ready.status(), 200, "ready without a second reload");
    assert_eq!(zoho.token_requests(), 2, "one call with each secret");
}

#[tokio::test]
async fn a_new_refresh_token_does_not_reuse_the_access_token_of_the_old() {
    // A new grant (for new scopes, or a leaked refresh token replaced): the access token
    // the file holds was issued with the old refresh token, and is not reused.
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token.json");
    let file = token_file.clone();
    let s = Scenario::with(FakeOptions::default(), |c| c.token_file = Some(file)).await;
    assert_eq!(get(&s, "/api/v1/tickets").await.status(), 200);
    s.proxy.stop().await;
    let copy = dir.path().join("copy.json");
    std::fs::copy(&token_file, &copy).unwrap();

    let options = FakeOptions {
        refresh_token: "1000.another-refresh-token".into(),
        ..FakeOptions::default()
    };
    let s = Scenario::with(options.clone(), |c| c.token_file = Some(copy)).await;
    wait_for_token_requests(&s.zoho, 1).await;
    assert_eq!(get(&s, "/api/v1/tickets").await.status(), 200);

    // The same refresh token: reused, no call.
    let file = token_file.clone();
    let s = Scenario::with(FakeOptions::default(), |c| c.token_file = Some(file)).await;
    assert_eq!(get(&s, "/_proxy/ready").await.status(), 200);
    assert_eq!(s.zoho.token_requests(), 0);
}

#[tokio::test]
async fn a_token_desk_rejected_is_taken_out_of_the_token_file() {
    // Desk rejects the token while Accounts fails: a restart must not take the token in
    // the file for a valid one (ready at once, every request a 401 and a refresh).
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token.json");
    let file = token_file.clone();
    let s = Scenario::with(FakeOptions::default(), |c| c.token_file = Some(file)).await;
    assert_eq!(get(&s, "/api/v1/tickets").await.status(), 200);
    s.zoho
        .set_accounts_behavior(zoho_desk_proxy::fake_zoho::AccountsBehavior::Unavailable);
    s.zoho.revoke_all_tokens();
    assert_eq!(get(&s, "/api/v1/tickets").await.status(), 503);
    s.proxy.stop().await;
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&token_file).unwrap()).unwrap();
    assert!(saved["access_token"].is_null(), "{saved}");
    assert_eq!(saved["client_id"], FakeOptions::default().client_id);
}

#[tokio::test]
async fn the_token_file_is_written_at_shutdown_even_after_a_failed_save_or_its_removal() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let token_file = state.join("token.json");
    let saved_token = || {
        std::fs::read_to_string(&token_file)
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .and_then(|json| json["access_token"].as_str().map(str::to_owned))
    };

    // Saving fails (a file where the directory goes) until the directory is made.
    std::fs::write(&state, "not a directory").unwrap();
    let file = token_file.clone();
    let s = Scenario::with(FakeOptions::default(), |c| c.token_file = Some(file)).await;
    assert_eq!(get(&s, "/api/v1/tickets").await.status(), 200);
    std::fs::remove_file(&state).unwrap();
    std::fs::create_dir(&state).unwrap();
    s.proxy.stop().await;
    let issued = s.zoho.issued_tokens();
    assert_eq!(saved_token().as_ref(), issued.last(), "saved at shutdown");

    // Removed while the proxy ran: written again at shutdown.
    let file = token_file.clone();
    let s = Scenario::with(FakeOptions::default(), |c| c.token_file = Some(file)).await;
    assert_eq!(get(&s, "/api/v1/tickets").await.status(), 200);
    std::fs::remove_file(&token_file).unwrap();
    s.proxy.stop().await;
    assert!(saved_token().is_some(), "saved at shutdown");
}
