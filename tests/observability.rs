//! What an operator sees (SPEC §8): metrics after traffic, request ids, JSON log lines —
//! and never a secret, token or query string in the output of a full session.

mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use zoho_desk_proxy::fake_zoho::{AccountsBehavior, FakeOptions, FakeZoho};

#[tokio::test]
async fn metrics_expose_the_series_after_traffic() {
    let s = Scenario::start().await;
    assert_eq!(
        client()
            .get(s.url("/api/v1/tickets"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    s.zoho.fail_next_desk_requests(1, Some("INVALID_OAUTH"));
    assert_eq!(
        client()
            .get(s.url("/api/v1/tickets"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        client()
            .get(s.url("/api/v1/nothing"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    let c = client();
    let response = c.get(s.url("/_proxy/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .contains("openmetrics-text")
    );
    let text = response.text().await.unwrap();
    for line in [
        "zoho_proxy_requests_total{method=\"GET\",status_class=\"2xx\"} 2",
        "zoho_proxy_requests_total{method=\"GET\",status_class=\"4xx\"} 1",
        "zoho_proxy_token_refreshes_total{result=\"ok\"} 2",
        "zoho_proxy_retries_after_401_total 1",
        "zoho_proxy_request_duration_seconds_count 3",
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
    let ok = client().get(s.url("/api/v1/tickets")).send().await.unwrap();
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
    let dir = tempfile::tempdir().unwrap();
    let api_key = "proxy-key-7f3a9c1e5b";
    let config = write_config(dir.path(), &fake, &options, api_key);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_zoho-desk-proxy"))
        .current_dir(dir.path())
        .args(["serve", "--config"])
        .arg(&config)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "trace")
        .env("ZOHO_PROXY_LOG_FORMAT", "json")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let collector = tokio::spawn(async move {
        let mut all = String::new();
        let mut ready_tx = Some(ready_tx);
        while let Ok(Some(line)) = stderr.next_line().await {
            if line.contains("zoho-desk-proxy listening")
                && let Some(tx) = ready_tx.take()
            {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    tokio::time::timeout(Duration::from_secs(20), ready_rx)
        .await
        .unwrap()
        .unwrap();

    let base = format!("http://127.0.0.1:{port}");
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

    let pid = child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let out = child.wait_with_output().await.unwrap();
    assert!(out.status.success());
    let mut logs = collector.await.unwrap();
    logs.push_str(&String::from_utf8_lossy(&out.stdout));

    assert!(logs.contains("token refreshed"), "the session refreshed");
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

fn write_config(dir: &Path, fake: &FakeZoho, o: &FakeOptions, api_key: &str) -> std::path::PathBuf {
    let text = format!(
        "upstream = \"{}\"\naccounts_url = \"{}\"\ntoken_file = \"{}\"\n[oauth]\nclient_id = \"{}\"\nclient_secret = \"{}\"\nrefresh_token = \"{}\"\nmax_refreshes_per_10min = 100\n[access]\napi_keys = [\"{api_key}\"]\n",
        fake.desk_url(),
        fake.accounts_url(),
        dir.join("token.json").display(),
        o.client_id,
        o.client_secret,
        o.refresh_token,
    );
    let path = dir.join("proxy.toml");
    std::fs::write(&path, text).unwrap();
    path
}
