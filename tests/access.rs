//! Access control through the real proxy (SPEC §7): what is refused is refused before
//! anything goes upstream, and what is allowed arrives without the proxy's key.

mod support;

use support::binary::*;
use support::*;
use zoho_desk_proxy::fake_zoho::{FakeOptions, FakeZoho};
use zoho_desk_proxy::secret::Secret;

async fn keyed() -> Scenario {
    Scenario::with(FakeOptions::default(), |c| {
        c.access.api_keys = vec![Secret::new("k-123456".into())];
    })
    .await
}

#[tokio::test]
async fn a_key_is_needed_and_never_reaches_zoho() {
    let s = keyed().await;
    let c = client();
    assert_proxy_error(
        c.get(s.url("/api/v1/tickets")).send().await.unwrap(),
        401,
        "PROXY_UNAUTHORIZED",
    )
    .await;
    let wrong = c
        .get(s.url("/api/v1/tickets"))
        .header("X-Proxy-Key", "nope")
        .send()
        .await
        .unwrap();
    assert_proxy_error(wrong, 401, "PROXY_UNAUTHORIZED").await;
    assert_eq!(s.zoho.desk_request_count(), 0);

    let ok = c
        .get(s.url("/api/v1/tickets"))
        .header("X-Proxy-Key", "k-123456")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let bearer = c
        .get(s.url("/api/v1/tickets"))
        .header("Proxy-Authorization", "Bearer k-123456")
        .send()
        .await
        .unwrap();
    assert_eq!(bearer.status(), 200);
    for seen in s.zoho.desk_requests() {
        assert!(!seen.headers.contains_key("x-proxy-key"));
        assert!(!seen.headers.contains_key("proxy-authorization"));
        assert!(
            seen.headers["authorization"]
                .to_str()
                .unwrap()
                .starts_with("Zoho-oauthtoken ")
        );
    }
}

#[tokio::test]
async fn health_and_ready_stay_open_metrics_needs_the_key() {
    let s = keyed().await;
    let c = client();
    assert_eq!(
        c.get(s.url("/_proxy/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    wait_for_token_requests(&s.zoho, 1).await;
    assert_ne!(
        c.get(s.url("/_proxy/ready")).send().await.unwrap().status(),
        401
    );
    assert_proxy_error(
        c.get(s.url("/_proxy/metrics")).send().await.unwrap(),
        401,
        "PROXY_UNAUTHORIZED",
    )
    .await;
    let metrics = c
        .get(s.url("/_proxy/metrics"))
        .header("X-Proxy-Key", "k-123456")
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), 200);
}

#[tokio::test]
async fn browser_attacks_are_refused_before_anything_goes_upstream() {
    let s = Scenario::start().await;
    let c = client();
    // A page of evil.example posting a ticket through the proxy.
    let post = c
        .post(s.url("/api/v1/tickets"))
        .header("Origin", "https://evil.example")
        .json(&serde_json::json!({"subject": "pwned"}))
        .send()
        .await
        .unwrap();
    let body = assert_proxy_error(post, 403, "PROXY_FORBIDDEN").await;
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("access.allow_origins")
    );
    // DNS rebinding: the browser sends the attacker's host name.
    for host in ["evil.example", "localhost.evil.example", "127.0.0.1.nip.io"] {
        let answer = raw_request(
            s.proxy.addr,
            &format!("GET /api/v1/tickets HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(raw_status(&answer), 403, "{host}: {answer}");
        assert_eq!(raw_json(&answer)["errorCode"], "PROXY_FORBIDDEN");
    }
    assert_eq!(s.zoho.desk_request_count(), 0, "nothing reached Desk");
}

#[tokio::test]
async fn method_and_path_rules_apply_to_forwarded_requests() {
    let s = Scenario::with(FakeOptions::default(), |c| {
        c.access.allow_methods = Some(vec![http::Method::GET]);
        c.access.allow_paths = vec!["/api/v1/tickets".into(), "/api/v1/organizations".into()];
        c.access.deny_paths = vec!["/api/v1/tickets/*/attachments".into()];
    })
    .await;
    let c = client();
    assert_eq!(
        c.get(s.url("/api/v1/tickets"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let post = c
        .post(s.url("/api/v1/tickets"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_proxy_error(post, 405, "PROXY_METHOD_NOT_ALLOWED").await;
    assert_proxy_error(
        c.get(s.url("/api/v1/contacts")).send().await.unwrap(),
        403,
        "PROXY_FORBIDDEN",
    )
    .await;
    let attachments = c
        .get(s.url("/api/v1/tickets/1/attachments"))
        .send()
        .await
        .unwrap();
    assert_proxy_error(attachments, 403, "PROXY_FORBIDDEN").await;
    assert_eq!(s.zoho.desk_request_count(), 1);
}

#[tokio::test]
async fn a_remote_listener_needs_an_explicit_opt_in_and_then_warns() {
    let fake = FakeZoho::start().await.unwrap();
    let Logged {
        dir: _dir,
        mut child,
        lines: mut rx,
        port,
    } = serve_fake_logged(
        &fake,
        "[access]\nallow_unauthenticated_remote = true\nallow_hosts = [\"*\"]",
        "0.0.0.0",
        &[],
    )
    .await;
    // serve_with returns once the "listening" line was read, after the warning.
    let mut warned = false;
    while let Ok(line) = rx.try_recv() {
        warned |= line.contains("WARN") && line.contains("non-loopback");
    }
    assert!(warned, "a warning is logged");
    assert_eq!(
        status(format!("http://127.0.0.1:{port}/api/v1/tickets")).await,
        200
    );
    sigterm(&child);
    assert!(child.wait().await.unwrap().success());
}
