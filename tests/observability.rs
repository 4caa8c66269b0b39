//! What an operator sees (README "Operations"): metrics after traffic, request ids, JSON log lines —
//! and never a secret, token or query string in the output of a full session.

mod support;

use std::time::Duration;

use support::binary::*;
use support::*;
use zoho_desk_proxy::fake_zoho::{AccountsBehavior, FakeOptions, FakeZoho};

#[tokio::test]
async fn metrics_expose_the_series_after_traffic() {
    let s = Scenario::start().await;
    assert_eq!(status(s.url("/api/v1/tickets")).await, 200);
    s.zoho.fail_next_desk_requests(1, Some("INVALID_OAUTH"));
    assert_eq!(status(s.url("/api/v1/tickets")).await, 200);
    assert_eq!(status(s.url("/api/v1/nothing")).await, 404);
    let c = client();
    // OpenMetrics for a scraper that asks for it…
    let response = c
        .get(s.url("/_proxy/metrics"))
        .header(
            "Accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    assert!(response.text().await.unwrap().ends_with("# EOF\n"));
    // …and the classic text format for any other.
    let response = c.get(s.url("/_proxy/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = response.text().await.unwrap();
    assert!(!text.contains("# EOF"), "{text}");
    for line in [
        // Two forwarded, and the first scrape.
        "zoho_proxy_requests_total{method=\"GET\",status_class=\"2xx\"} 3",
        "zoho_proxy_requests_total{method=\"GET\",status_class=\"4xx\"} 1",
        "zoho_proxy_token_refreshes_total{result=\"ok\"} 2",
        "zoho_proxy_retries_after_401_total 1",
        "zoho_proxy_request_duration_seconds_count 4",
        "zoho_proxy_upstream_errors_total{kind=\"unreachable\"} 0",
        // The scrape itself is in flight.
        "zoho_proxy_in_flight_requests 1",
    ] {
        assert!(text.contains(line), "{line} missing in\n{text}");
    }
    let expiry = text
        .lines()
        .find_map(|l| l.strip_prefix("zoho_proxy_token_expiry_seconds "))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap();
    assert!(expiry > 3500.0 && expiry <= 3600.0, "{expiry}");
}

#[tokio::test]
async fn every_answer_carries_a_request_id() {
    let s = Scenario::start().await;
    let ok = fetch(s.url("/api/v1/tickets")).await;
    let refused = client()
        .get(s.url("/api/v1/tickets"))
        .header("Origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    let a = ok.headers()["x-request-id"].to_str().unwrap().to_owned();
    let b = refused.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(a.len(), 16);
    assert_ne!(a, b);
}

/// A blank `RUST_LOG` (a compose file's `RUST_LOG=${LOG_LEVEL}` with nothing to put
/// there) is the default level, not silence: the start line and every request's line.
#[tokio::test]
async fn a_blank_rust_log_logs_at_the_default_level() {
    let fake = FakeZoho::start().await.unwrap();
    for blank in ["", "  "] {
        // Waits for the "listening" line: it never came when a blank RUST_LOG silenced all.
        let mut proxy = serve_fake_logged(&fake, "", "127.0.0.1", &[("RUST_LOG", blank)]).await;
        let answer = fetch(format!("http://{}/api/v1/tickets", proxy.addr)).await;
        assert_eq!(answer.status(), 200);
        loop {
            let line = tokio::time::timeout(Duration::from_secs(5), proxy.lines.recv())
                .await
                .expect("the request's log line")
                .expect("log open");
            if line.contains("\"path\":\"/api/v1/tickets\"") {
                break;
            }
        }
        sigterm(&proxy.child);
        let _ = proxy.child.wait().await;
    }
}

/// A sane `X-Request-Id` from the client is the request's id everywhere: its log line,
/// its answer, and the request Desk receives; an insane one is replaced, everywhere too.
#[tokio::test]
async fn a_client_request_id_is_used_in_the_log_the_answer_and_at_desk() {
    let fake = FakeZoho::start().await.unwrap();
    let zoho = fake.control();
    let mut proxy = serve_fake_logged(&fake, "", "127.0.0.1", &[]).await;
    let url = format!("http://{}/api/v1/tickets", proxy.addr);
    let long = "x".repeat(129);
    let cases: [(&str, bool); 5] = [
        ("build-42/step-7:a1b2", true),
        (&long, false),
        ("has space", false),
        ("tab\there", false),
        ("", false),
    ];
    for (sent, kept) in cases {
        let response = client()
            .get(&url)
            .header("X-Request-Id", sent)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let id = response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        if kept {
            assert_eq!(id, sent);
        } else {
            assert_eq!(id.len(), 16, "{sent:?} replaced by a new id: {id}");
            assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        }
        let at_desk = zoho.desk_requests().pop().unwrap();
        assert_eq!(at_desk.headers["x-request-id"], id.as_str(), "{sent:?}");
        assert_eq!(at_desk.headers.get_all("x-request-id").iter().count(), 1);
        let logged = loop {
            let line = tokio::time::timeout(Duration::from_secs(5), proxy.lines.recv())
                .await
                .expect("a log line")
                .expect("log open");
            if line.contains("\"path\":\"/api/v1/tickets\"") {
                break serde_json::from_str::<serde_json::Value>(&line).unwrap();
            }
        };
        assert_eq!(logged["request_id"], id.as_str(), "{sent:?}");
    }
    sigterm(&proxy.child);
    let _ = proxy.child.wait().await;
}

/// Runs the binary through refreshes, Accounts errors, 401 retries, refusals and upstream
/// errors with `RUST_LOG=trace`, then greps everything it printed for every secret.
#[tokio::test]
async fn no_secret_token_or_query_appears_in_the_output_of_a_full_session() {
    let options = FakeOptions {
        token_lifetime: Duration::from_secs(2),
        ..FakeOptions::default()
    };
    let fake = FakeZoho::start_with(options.clone()).await.unwrap();
    let zoho = fake.control();
    let api_key = "proxy-key-7f3a9c1e5b";
    let Logged {
        dir: _dir,
        child,
        lines: mut lines_rx,
        addr,
    } = serve_fake_logged(
        &fake,
        &format!("max_refreshes_per_10min = 100\n[access]\napi_keys = [\"{api_key}\"]"),
        "127.0.0.1",
        &[("RUST_LOG", "trace")],
    )
    .await;
    let collector = tokio::spawn(async move {
        let mut all = String::new();
        while let Some(line) = lines_rx.recv().await {
            all.push_str(&line);
            all.push('\n');
        }
        all
    });

    let base = format!("http://{addr}");
    let c = client();
    let mut bodies = String::new();
    let send = |request: reqwest::RequestBuilder| {
        let request = request.header("X-Proxy-Key", api_key);
        async move {
            let response = request.send().await.unwrap();
            let head = format!("{:?}", response.headers());
            let body = response.text().await.unwrap_or_default();
            format!("{head}\n{body}\n")
        }
    };
    bodies += &send(c.get(format!("{base}/api/v1/tickets?searchStr=query-secret-5521"))).await;
    // 401 with retry, twice; a 401 that passes through.
    zoho.fail_next_desk_requests(1, Some("INVALID_OAUTH"));
    bodies += &send(
        c.post(format!("{base}/api/v1/echo?x=query-secret-5521"))
            .body("hello"),
    )
    .await;
    zoho.revoke_all_tokens();
    bodies += &send(c.get(format!("{base}/api/v1/echo"))).await;
    zoho.fail_next_desk_requests(2, Some("INVALID_OAUTH"));
    bodies += &send(c.get(format!("{base}/api/v1/tickets"))).await;
    // Refusals: wrong key, Origin, dot-segments.
    bodies += &c
        .get(format!("{base}/api/v1/tickets"))
        .header("X-Proxy-Key", "wrong-key-value")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    bodies += &send(
        c.get(format!("{base}/api/v1/tickets"))
            .header("Origin", "https://evil.example"),
    )
    .await;
    bodies += &send(c.get(format!("{base}/api/v1/tickets/a;b?x=query-secret-5521"))).await;
    // A Host with userinfo is refused without its value, which may hold a password.
    bodies += &send(
        c.get(format!("{base}/api/v1/tickets"))
            .header("Host", "user:query-secret-5521@127.0.0.1"),
    )
    .await;
    bodies += &send(c.get(format!("{base}/_proxy/metrics"))).await;
    bodies += &send(c.get(format!("{base}/_proxy/ready"))).await;
    // Background refreshes (2 s tokens), then Accounts failing and throttling.
    wait_for_token_requests(&zoho, 5).await;
    zoho.set_accounts_behavior(AccountsBehavior::Error {
        status: 500,
        body: "{\"error\":\"internal\"}".into(),
    });
    wait_for_token_requests(&zoho, 6).await;
    zoho.set_accounts_behavior(AccountsBehavior::Throttle { status: 400 });
    wait_for_token_requests(&zoho, 7).await;
    bodies += &send(c.get(format!("{base}/api/v1/tickets?limit=1&q=query-secret-5521"))).await;

    sigterm(&child);
    let out = child.wait_with_output().await.unwrap();
    assert!(out.status.success());
    let mut logs = collector.await.unwrap();
    logs.push_str(&String::from_utf8_lossy(&out.stdout));

    assert!(logs.contains("token refreshed"), "the session refreshed");
    for rule in [
        "access.api_keys",
        "access.allow_origins",
        "path parameters",
        "userinfo",
    ] {
        assert!(
            logs.lines()
                .any(|l| l.contains("request refused") && l.contains(rule)),
            "every refusal is logged with its rule ({rule})"
        );
    }
    assert!(
        logs.contains("\"retried\":true"),
        "the session retried after a 401"
    );
    assert!(
        logs.contains("\"complete\":true"),
        "request lines say when a body was sent whole"
    );
    assert!(logs.lines().count() > 50, "RUST_LOG=trace was in effect");
    let mut secrets = vec![
        options.client_secret.clone(),
        options.refresh_token.clone(),
        api_key.to_owned(),
        "wrong-key-value".to_owned(),
        "query-secret-5521".to_owned(),
    ];
    let tokens = zoho.issued_tokens();
    assert!(tokens.len() >= 5);
    secrets.extend(tokens.iter().cloned());
    // The random parts of a token, in case it is printed in pieces.
    secrets.extend(
        tokens
            .iter()
            .flat_map(|t| t.split('.').skip(1).map(str::to_owned)),
    );
    for secret in &secrets {
        assert!(
            !logs.contains(secret.as_str()),
            "a secret ({}…) appears in the logs",
            &secret[..4]
        );
    }
    for token in &tokens {
        assert!(
            !bodies.contains(token.as_str()),
            "a token appears in a response"
        );
    }
}

/// Two requests for tickets at once through a binary with `extra` TOML in front of a Desk
/// that takes `delay`: their statuses, their log lines (read after it stopped), and the
/// requests Desk received.
async fn two_at_once(delay: Duration, extra: &str) -> ((u16, u16), Vec<serde_json::Value>, u64) {
    let fake = FakeZoho::start().await.unwrap();
    fake.control().set_desk_delay(delay);
    let Logged {
        dir: _dir,
        child,
        lines: mut lines_rx,
        addr,
    } = serve_fake_logged(&fake, extra, "127.0.0.1", &[("RUST_LOG", "info")]).await;
    let url = format!("http://127.0.0.1:{}/api/v1/tickets", addr.port());
    let statuses = tokio::join!(status(&url), status(&url));
    sigterm(&child);
    let out = child.wait_with_output().await.unwrap();
    assert!(out.status.success());
    let mut lines = Vec::new();
    while let Some(line) = lines_rx.recv().await {
        lines.push(line);
    }
    let logged = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "request" && v["path"] == "/api/v1/tickets")
        .collect();
    (statuses, logged, fake.control().desk_request_count())
}

/// `upstream_ms` is Desk's time; a wait for a `limits.max_upstream_requests` slot shows in
/// `duration_ms` only.
#[tokio::test]
async fn a_queued_request_logs_desk_time_apart_from_its_wait() {
    let (statuses, logged, _) = two_at_once(
        Duration::from_millis(300),
        "[limits]\nmax_upstream_requests = 1\nworkers = 1",
    )
    .await;
    assert_eq!(statuses, (200, 200));
    let timings: Vec<(f64, f64)> = logged
        .iter()
        .map(|v| {
            let ms = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
            (ms("upstream_ms"), ms("duration_ms"))
        })
        .collect();
    assert_eq!(timings.len(), 2, "{logged:?}");
    for (upstream, _) in &timings {
        assert!((290.0..550.0).contains(upstream), "{timings:?}");
    }
    let waited = timings.iter().map(|t| t.1).fold(0.0, f64::max);
    assert!(waited >= 590.0, "the second request waited: {timings:?}");
}

/// A request that timed out in line was never sent: its log line has no `upstream_ms`.
#[tokio::test]
async fn a_request_never_sent_logs_no_desk_time() {
    let (statuses, logged, desk_requests) = two_at_once(
        Duration::from_millis(600),
        "[limits]\nmax_upstream_requests = 1\nworkers = 1\n[timeouts]\nresponse_secs = 0.2",
    )
    .await;
    assert_eq!(statuses, (504, 504));
    let mut upstream: Vec<Option<f64>> = logged.iter().map(|v| v["upstream_ms"].as_f64()).collect();
    upstream.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    assert_eq!(upstream.len(), 2, "{logged:?}");
    assert!(upstream[0].is_none(), "never sent: {upstream:?}");
    assert!(
        upstream[1].is_some(),
        "sent, 504 after 200 ms: {upstream:?}"
    );
    assert_eq!(desk_requests, 1);
}

#[tokio::test]
async fn a_log_reader_that_goes_away_stops_nothing() {
    // `serve 2>&1 | tee log` whose tee exits, a restarted journald: every log line then
    // meets a closed pipe, and the proxy goes on serving and stops cleanly.
    let fake = FakeZoho::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &fake, true, "", "");
    let mut child = command(dir.path())
        .args(["serve", "--config"])
        .arg(&config)
        .args(["--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stderr.take().unwrap()));
    let addr = loop {
        let line = lines.next_line().await.unwrap().expect("a listening line");
        if line.contains("zoho-desk-proxy listening") {
            let logged: serde_json::Value = serde_json::from_str(&line).unwrap();
            break logged["listen"].as_str().unwrap().to_owned();
        }
    };
    drop(lines);
    for _ in 0..3 {
        assert_eq!(status(format!("http://{addr}/api/v1/tickets")).await, 200);
    }
    sigterm(&child);
    let exit = child.wait().await.unwrap();
    assert!(exit.success(), "{exit:?}");
}
