//! Access control through the real proxy (README "Security model"): what is refused is refused before
//! anything goes upstream, and what is allowed arrives without the proxy's key.

mod support;

use support::binary::*;
use support::*;
use zoho_desk_proxy::Secret;
use zoho_desk_proxy::fake_zoho::{FakeOptions, FakeZoho};
use zoho_desk_proxy::rules::{Case, PathRule};

/// Compiled `access.allow_paths` rules.
fn allow(rules: &[&str]) -> Vec<PathRule> {
    rules
        .iter()
        .map(|r| PathRule::parse(r, Case::Sensitive).unwrap())
        .collect()
}

/// Compiled `access.deny_paths` rules.
fn deny(rules: &[&str]) -> Vec<PathRule> {
    rules
        .iter()
        .map(|r| PathRule::parse(r, Case::Insensitive).unwrap())
        .collect()
}

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
    let missing = assert_proxy_error(
        c.get(s.url("/api/v1/tickets")).send().await.unwrap(),
        401,
        "PROXY_UNAUTHORIZED",
    )
    .await;
    // Every way to send it is named.
    let message = missing["message"].as_str().unwrap();
    for way in ["X-Proxy-Key", "Bearer", "Basic"] {
        assert!(message.contains(way), "{message}");
    }
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
        c.access.allow_paths = allow(&["/api/v1/tickets", "/api/v1/organizations"]);
        c.access.deny_paths = deny(&["/api/v1/tickets/*/attachments"]);
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
        addr,
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
        status(format!("http://127.0.0.1:{}/api/v1/tickets", addr.port())).await,
        200
    );
    sigterm(&child);
    assert!(child.wait().await.unwrap().success());
}

/// Sends one request on a new h2c connection; the status and the JSON body.
async fn h2c(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, http::HeaderMap, serde_json::Value) {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let mut request = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = sender
        .send_request(
            request
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        headers,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    )
}

fn raw_get(target: &str) -> String {
    format!("GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
}

/// The `Allow` header of a raw HTTP/1.1 answer.
fn raw_allow(answer: &str) -> Option<String> {
    answer.split("\r\n\r\n").next()?.lines().find_map(|l| {
        l.to_ascii_lowercase()
            .strip_prefix("allow: ")
            .map(str::to_owned)
    })
}

#[tokio::test]
async fn path_rules_hold_for_every_spelling_of_a_path_sent_raw() {
    let s = Scenario::with(FakeOptions::default(), |c| {
        c.access.deny_paths = deny(&["/api/v1/agents", "/api/v1/*/attachments"]);
    })
    .await;
    // The spellings that walked around these rules before they were matched on the
    // canonical path: each is refused, none reaches Desk.
    let refused: &[(&str, u16)] = &[
        ("/api/v1/%61gents", 403),
        ("/API/v1/agents", 403),
        ("/api/v1/AGENTS/5", 403),
        ("/api/v1/agents;x=1", 400),
        ("/api/v1/agents/", 403),
        ("/api/v1/x/attachments/", 403),
        ("/api/v1/tickets/attachments/9", 403),
        ("/api/v1/tickets/%61ttachments", 403),
        ("/api/v1/tickets/..;/agents", 400),
        ("/api/v1/tickets/%2e%2e/agents", 400),
        ("/api/v1/tickets%2fagents", 400),
        ("/api/v1/tickets%5cagents", 400),
        ("/api/v1/agents%00", 400),
    ];
    for (target, status) in refused {
        let answer = raw_request(s.proxy.addr, &raw_get(target)).await;
        assert_eq!(raw_status(&answer), *status, "h1 {target}: {answer}");
        let code = if *status == 403 {
            "PROXY_FORBIDDEN"
        } else {
            "PROXY_BAD_REQUEST"
        };
        assert_eq!(raw_json(&answer)["errorCode"], code, "h1 {target}");
        let (h2_status, _, body) = h2c(s.proxy.addr, "GET", target, &[]).await;
        assert_eq!(h2_status, *status, "h2 {target}: {body}");
    }
    assert_eq!(s.zoho.desk_request_count(), 0, "nothing reached Desk");

    // What is forwarded is the canonical form the rules saw.
    let answer = raw_request(s.proxy.addr, &raw_get("/api/v1/%74ickets?q=%61%2Fb&from=0")).await;
    assert_eq!(raw_status(&answer), 200, "{answer}");
    let seen = s.zoho.desk_requests().pop().unwrap();
    assert_eq!(seen.path_and_query, "/api/v1/tickets?q=%61%2Fb&from=0");
    let (status, _, _) = h2c(s.proxy.addr, "GET", "/api/v1/%74ickets/caf%c3%a9", &[]).await;
    assert_eq!(status, 404, "the fake has no such ticket");
    let seen = s.zoho.desk_requests().pop().unwrap();
    // Other escapes go as the client wrote them.
    assert_eq!(seen.path_and_query, "/api/v1/tickets/caf%c3%a9");
}

#[tokio::test]
async fn a_deny_rule_is_not_walked_around_by_escaping_a_sub_delimiter() {
    // A server that decodes before routing reads `a%3Ab` as `a:b`: so do the rules.
    let s = Scenario::with(FakeOptions::default(), |c| {
        c.access.deny_paths = deny(&["/api/v1/tickets/a:b", "/api/v1/contacts/a%2Bb"]);
    })
    .await;
    for path in [
        "/api/v1/tickets/a:b",
        "/api/v1/tickets/a%3Ab",
        "/api/v1/tickets/a%3ab/1",
        "/api/v1/contacts/a+b",
        "/api/v1/contacts/a%2bb",
    ] {
        let answer = raw_request(s.proxy.addr, &raw_get(path)).await;
        assert_eq!(raw_status(&answer), 403, "h1 {path}: {answer}");
        let (status, _, body) = h2c(s.proxy.addr, "GET", path, &[]).await;
        assert_eq!(status, 403, "h2 {path}: {body}");
    }
    assert_eq!(s.zoho.desk_request_count(), 0, "nothing reached Desk");
    // What no rule denies goes to Desk as written.
    let answer = raw_request(s.proxy.addr, &raw_get("/api/v1/tickets/a%3Ac")).await;
    assert_eq!(
        raw_status(&answer),
        404,
        "the fake has no such ticket: {answer}"
    );
    let seen = s.zoho.desk_requests().pop().unwrap();
    assert_eq!(seen.path_and_query, "/api/v1/tickets/a%3Ac");
}

#[tokio::test]
async fn rules_read_an_escape_in_any_case_and_desk_gets_it_as_written() {
    let s = Scenario::with(FakeOptions::default(), |c| {
        c.access.allow_paths = allow(&["/api/v1/tickets/caf%C3%A9"]);
        c.access.deny_paths = deny(&["/api/v1/tickets/caf%c3%a9/secret"]);
    })
    .await;
    let answer = raw_request(s.proxy.addr, &raw_get("/api/v1/tickets/caf%c3%a9")).await;
    assert_eq!(
        raw_status(&answer),
        404,
        "allowed; the fake has no such ticket: {answer}"
    );
    let seen = s.zoho.desk_requests().pop().unwrap();
    assert_eq!(seen.path_and_query, "/api/v1/tickets/caf%c3%a9");
    for path in [
        "/api/v1/tickets/caf%C3%A9/secret",
        "/api/v1/tickets/caf%c3%A9/Secret",
    ] {
        let answer = raw_request(s.proxy.addr, &raw_get(path)).await;
        assert_eq!(raw_status(&answer), 403, "{path}: {answer}");
    }
    let answer = raw_request(s.proxy.addr, &raw_get("/api/v1/tickets/caf%C3%A8")).await;
    assert_eq!(raw_status(&answer), 403, "not allowed: {answer}");
    assert_eq!(s.zoho.desk_request_count(), 1);
}

#[tokio::test]
async fn an_allow_rule_is_not_escaped_by_servlet_path_parameters() {
    let s = Scenario::with(FakeOptions::default(), |c| {
        c.access.allow_paths = allow(&["/api/v1/tickets"]);
    })
    .await;
    for (target, status) in [
        ("/api/v1/tickets/..;/agents", 400),
        ("/api/v1/tickets;/../agents", 400),
        ("/api/v1/Tickets", 403),
        ("/api/v1/ticketsX", 403),
    ] {
        let answer = raw_request(s.proxy.addr, &raw_get(target)).await;
        assert_eq!(raw_status(&answer), status, "{target}: {answer}");
    }
    let answer = raw_request(s.proxy.addr, &raw_get("/api/v1/tickets?limit=1")).await;
    assert_eq!(raw_status(&answer), 200, "{answer}");
    assert_eq!(s.zoho.desk_request_count(), 1);
}

#[tokio::test]
async fn trace_track_and_connect_are_405_with_allow_and_never_forwarded() {
    let s = Scenario::start().await;
    // In any case: a server behind Desk's front may not hold to HTTP's case rule.
    for method in ["TRACE", "TRACK", "trace", "Track"] {
        let answer = raw_request(
            s.proxy.addr,
            &format!(
                "{method} /api/v1/tickets HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            ),
        )
        .await;
        assert_eq!(raw_status(&answer), 405, "{method}: {answer}");
        assert_eq!(raw_json(&answer)["errorCode"], "PROXY_METHOD_NOT_ALLOWED");
        assert_eq!(
            raw_allow(&answer).as_deref(),
            Some("get, head, post, put, patch, delete, options"),
            "{method}: {answer}"
        );
        let (status, headers, _) = h2c(s.proxy.addr, method, "/api/v1/tickets", &[]).await;
        assert_eq!(status, 405, "h2 {method}");
        assert!(headers.contains_key("allow"), "h2 {method}");
    }
    let answer = raw_request(
        s.proxy.addr,
        "CONNECT desk.zoho.com:443 HTTP/1.1\r\nHost: desk.zoho.com:443\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(raw_status(&answer), 405, "{answer}");
    assert!(raw_allow(&answer).is_some(), "{answer}");
    // The proxy's own endpoints answer GET and HEAD.
    let answer = raw_request(
        s.proxy.addr,
        "POST /_proxy/health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(raw_status(&answer), 405, "{answer}");
    assert_eq!(raw_allow(&answer).as_deref(), Some("get, head"));
    assert_eq!(s.zoho.desk_request_count(), 0);
}

#[tokio::test]
async fn a_read_only_proxy_refuses_method_overrides() {
    let s = Scenario::with(FakeOptions::default(), |c| {
        c.access.allow_methods = Some(vec![http::Method::GET, http::Method::HEAD]);
    })
    .await;
    for header in [
        "X-HTTP-Method-Override",
        "X-HTTP-Method",
        "X-Method-Override",
    ] {
        for claimed in ["DELETE", "delete", "GET, DELETE", "TRACE"] {
            let answer = raw_request(
                s.proxy.addr,
                &format!("GET /api/v1/tickets/1 HTTP/1.1\r\nHost: 127.0.0.1\r\n{header}: {claimed}\r\nConnection: close\r\n\r\n"),
            )
            .await;
            assert_eq!(raw_status(&answer), 405, "{header}: {claimed}: {answer}");
            assert_eq!(raw_allow(&answer).as_deref(), Some("get, head"));
            let (status, _, _) = h2c(
                s.proxy.addr,
                "GET",
                "/api/v1/tickets/1",
                &[(header, claimed)],
            )
            .await;
            assert_eq!(status, 405, "h2 {header}: {claimed}");
        }
    }
    let post = client()
        .post(s.url("/api/v1/tickets"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(post.headers()["allow"], "GET, HEAD");
    assert_proxy_error(post, 405, "PROXY_METHOD_NOT_ALLOWED").await;
    assert_eq!(s.zoho.desk_request_count(), 0);
    // An override naming an allowed method is fine.
    let ok = client()
        .get(s.url("/api/v1/tickets"))
        .header("X-HTTP-Method-Override", "GET")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    // Every line of a repeated override counts, not only the first, in any order among
    // the other headers.
    let answer = raw_request(
        s.proxy.addr,
        "GET /api/v1/tickets/1 HTTP/1.1\r\nX-Method-Override: GET\r\nHost: 127.0.0.1\r\nAccept: */*\r\nx-method-override: DELETE\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(raw_status(&answer), 405, "{answer}");
    assert_eq!(s.zoho.desk_request_count(), 1);
}

#[tokio::test]
async fn a_cross_site_browser_request_without_an_allowed_origin_is_refused() {
    let s = Scenario::with(FakeOptions::default(), |c| {
        c.access.allow_origins = vec!["http://localhost:3000".into()];
    })
    .await;
    for site in ["cross-site", "same-site", "Cross-Site"] {
        let refused = client()
            .get(s.url("/api/v1/tickets"))
            .header("Sec-Fetch-Site", site)
            .send()
            .await
            .unwrap();
        let body = assert_proxy_error(refused, 403, "PROXY_FORBIDDEN").await;
        assert!(body["message"].as_str().unwrap().contains("Sec-Fetch-Site"));
        let (status, _, _) = h2c(
            s.proxy.addr,
            "GET",
            "/api/v1/tickets",
            &[("sec-fetch-site", site)],
        )
        .await;
        assert_eq!(status, 403, "h2 {site}");
    }
    assert_eq!(s.zoho.desk_request_count(), 0);
    // From the allowed origin, or not from another site at all, it is fine.
    for headers in [
        vec![
            ("Sec-Fetch-Site", "cross-site"),
            ("Origin", "http://localhost:3000"),
        ],
        vec![("Sec-Fetch-Site", "same-origin")],
        vec![("Sec-Fetch-Site", "none")],
    ] {
        let mut request = client().get(s.url("/api/v1/tickets"));
        for (k, v) in &headers {
            request = request.header(*k, *v);
        }
        assert_eq!(request.send().await.unwrap().status(), 200, "{headers:?}");
    }
}

#[tokio::test]
async fn a_malformed_host_is_a_bad_request() {
    let s = Scenario::with(FakeOptions::default(), |c| {
        c.access.allow_hosts = Some(vec!["*".into()]);
    })
    .await;
    for host in [
        "user@127.0.0.1",
        "127.0.0.1:80a",
        "[::1]x",
        "[::1]:8080junk",
        "127.0.0.1:",
        "127.0.0.1:99999",
        "a b",
    ] {
        let answer = raw_request(
            s.proxy.addr,
            &format!("GET /api/v1/tickets HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(raw_status(&answer), 400, "Host: {host}: {answer}");
        assert_eq!(
            raw_json(&answer)["errorCode"],
            "PROXY_BAD_REQUEST",
            "{host}"
        );
    }
    let answer = raw_request(
        s.proxy.addr,
        "GET /api/v1/tickets HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(raw_status(&answer), 400, "two Host headers: {answer}");
    let answer = raw_request(
        s.proxy.addr,
        "GET http://user@desk.zoho.com/api/v1/tickets HTTP/1.1\r\nHost: desk.zoho.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        matches!(raw_status(&answer), 400 | 403),
        "userinfo in absolute-form: {answer}"
    );
    assert_eq!(s.zoho.desk_request_count(), 0);
    assert_eq!(status(s.url("/api/v1/tickets")).await, 200);
}
