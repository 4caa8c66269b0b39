//! Record and replay (README "Testing against recorded Desk traffic"): Desk's traffic
//! recorded to HAR through the fake Desk, then replayed by the built binary with the fake
//! stopped and no credentials; what a recording never holds; misses and strict mode; a
//! recording cut short; bad files; a browser's HAR.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::binary::*;
use support::*;
use zoho_desk_proxy::Secret;
use zoho_desk_proxy::fake_zoho::{FIRST_TICKET_ID, FakeOptions};

const KEY: &str = "k-record-test-key";

/// One request of the scenario, and what the client saw.
#[derive(Debug, Clone)]
struct Seen {
    method: &'static str,
    path: String,
    body: Option<&'static str>,
    status: u16,
    content_type: Option<String>,
    content_encoding: Option<String>,
    content_length: Option<String>,
    bytes: Vec<u8>,
}

async fn send(
    base: &str,
    method: &'static str,
    path: &str,
    body: Option<&'static str>,
) -> reqwest::Response {
    // No automatic decompression: bodies are compared as sent.
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let mut request = client
        .request(method.parse().unwrap(), format!("{base}{path}"))
        .header("x-proxy-key", KEY)
        .header("cookie", "session=client-cookie-secret");
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body);
    }
    request.send().await.unwrap()
}

async fn seen(base: &str, method: &'static str, path: &str, body: Option<&'static str>) -> Seen {
    let answer = send(base, method, path, body).await;
    let header = |name: &str| {
        answer
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    Seen {
        method,
        path: path.to_owned(),
        body,
        status: answer.status().as_u16(),
        content_type: header("content-type"),
        content_encoding: header("content-encoding"),
        content_length: header("content-length"),
        bytes: answer.bytes().await.unwrap().to_vec(),
    }
}

/// The scenario recorded: lists before and after a create (the same request, two
/// answers), a query, a POST, a binary gzip body, a HEAD, a Desk 404, cookies both ways.
async fn scenario(base: &str) -> Vec<Seen> {
    let ticket = format!("/api/v1/tickets/{FIRST_TICKET_ID}");
    let mut all = Vec::new();
    all.push(seen(base, "GET", "/api/v1/tickets", None).await);
    all.push(seen(base, "GET", "/api/v1/tickets?from=0&limit=2", None).await);
    all.push(
        seen(
            base,
            "POST",
            "/api/v1/tickets",
            Some(r#"{"subject":"Printer on fire"}"#),
        )
        .await,
    );
    all.push(seen(base, "GET", "/api/v1/tickets", None).await);
    all.push(seen(base, "GET", &ticket, None).await);
    all.push(seen(base, "HEAD", &ticket, None).await);
    all.push(seen(base, "GET", "/api/v1/gzip", None).await);
    all.push(seen(base, "GET", "/api/v1/organizations", None).await);
    all.push(seen(base, "GET", "/api/v1/nothing-here", None).await);
    all
}

/// Records the scenario to `dir/desk.har` through an in-process proxy in front of the
/// fake; returns what the client saw, and the secrets that must not be in the file.
async fn record(dir: &Path) -> (PathBuf, Vec<Seen>, Vec<String>) {
    let (s, file) = recording(dir, |c| c.access.api_keys = vec![Secret::new(KEY.into())]).await;
    let seen = scenario(&s.url("")).await;
    let options = FakeOptions::default();
    let mut secrets = vec![
        options.client_secret.clone(),
        options.refresh_token.clone(),
        KEY.to_owned(),
        "client-cookie-secret".to_owned(),
        "fake-csrf-cookie".to_owned(),
    ];
    secrets.extend(s.zoho.issued_tokens());
    s.proxy.stop().await;
    (file, seen, secrets)
}

/// A HAR file's JSON.
fn har_of(file: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap()
}

/// An in-process proxy in front of the fake, recording to `dir/desk.har`, its config
/// changed by `tweak`; and the file.
async fn recording(
    dir: &Path,
    tweak: impl FnOnce(&mut zoho_desk_proxy::config::Config),
) -> (Scenario, PathBuf) {
    let file = dir.join("desk.har");
    let recorded = file.clone();
    let s = Scenario::with(FakeOptions::default(), move |c| {
        c.record.file = Some(recorded);
        tweak(c);
    })
    .await;
    (s, file)
}

/// `zoho-desk-proxy replay FILE` in `dir` (no proxy.toml there, no Zoho variables), with
/// `args` and `envs`; its stderr lines on the returned channel.
async fn replay(
    dir: &Path,
    file: &Path,
    args: &[&str],
    envs: &[(&str, &str)],
) -> (Serving, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let mut cmd = command(dir);
    cmd.arg("replay")
        .arg(file)
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .envs(envs.iter().copied());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    (listening(cmd, Some(tx)).await, rx)
}

/// `/_proxy/metrics` of a serving binary.
async fn metrics_of(serving: &Serving) -> String {
    metrics_text(serving.url("/_proxy/metrics")).await
}

async fn stop(serving: Serving) -> std::process::ExitStatus {
    sigterm(&serving.child);
    tokio::time::timeout(Duration::from_secs(20), serving.child.wait_with_output())
        .await
        .unwrap()
        .unwrap()
        .status
}

#[tokio::test]
async fn recorded_traffic_replays_byte_for_byte_with_no_fake_and_no_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let (file, recorded, secrets) = record(dir.path()).await;
    // (The fake and the proxy are gone.)

    let text = std::fs::read_to_string(&file).unwrap();
    let har: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(har["log"]["version"], "1.2");
    assert_eq!(har["log"]["creator"]["name"], "zoho-desk-proxy");
    let entries = har["log"]["entries"].as_array().unwrap();
    assert_eq!(
        entries.len(),
        recorded.len(),
        "one entry per forwarded request"
    );
    for secret in &secrets {
        assert!(
            !text.contains(secret.as_str()),
            "a secret in the recording: {secret}"
        );
    }
    assert!(text.contains("Zoho-oauthtoken ***"));
    for entry in entries {
        for h in entry["request"]["headers"].as_array().unwrap() {
            let name = h["name"].as_str().unwrap();
            assert!(
                !["cookie", "x-proxy-key", "proxy-authorization"].contains(&name),
                "{name}"
            );
        }
        for h in entry["response"]["headers"].as_array().unwrap() {
            assert_ne!(h["name"], "set-cookie");
        }
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "Desk's data is its owner's");
    }

    let (serving, _lines) = replay(dir.path(), &file, &[], &[]).await;
    let base = serving.url("");
    // The same requests, the same answers, in the same order.
    for expected in &recorded {
        let got = seen(&base, expected.method, &expected.path, expected.body).await;
        assert_eq!(got.status, expected.status, "{expected:?}");
        assert_eq!(got.content_type, expected.content_type, "{expected:?}");
        assert_eq!(
            got.content_encoding, expected.content_encoding,
            "{expected:?}"
        );
        // A HEAD's too: Desk's word on the body it did not send.
        assert_eq!(got.content_length, expected.content_length, "{expected:?}");
        assert_eq!(
            got.bytes, expected.bytes,
            "{} {}",
            expected.method, expected.path
        );
    }
    // The last answer repeats: the list after the create.
    let again = seen(&base, "GET", "/api/v1/tickets", None).await;
    assert_eq!(again.bytes, recorded[3].bytes);
    // A query's parameters in another order match.
    let reordered = seen(&base, "GET", "/api/v1/tickets?limit=2&from=0", None).await;
    assert_eq!(reordered.bytes, recorded[1].bytes);
    // Request ids and the proxy's own endpoints work as in normal serving.
    let answer = send(&base, "GET", "/api/v1/tickets", None).await;
    assert!(answer.headers().contains_key("x-request-id"));
    let ready: serde_json::Value = fetch(serving.url("/_proxy/ready"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(ready["mode"], "replay", "{ready}");
    // Desk's credits, as the recorded answers tell them.
    let metrics = metrics_of(&serving).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("zoho_proxy_desk_rate_limit_remaining ")),
        "{metrics}"
    );
    assert_eq!(stop(serving).await.code(), Some(0));
}

#[tokio::test]
async fn a_secret_desk_or_a_client_puts_anywhere_is_masked() {
    // Desk echoing the token it got (in a body, a header), a client putting its key or
    // the client secret in the query or the body: none of it reaches the file.
    let dir = tempfile::tempdir().unwrap();
    let (s, file) = recording(dir.path(), |c| {
        c.access.api_keys = vec![Secret::new(KEY.into())];
        c.record.max_body_bytes = 300;
    })
    .await;
    s.zoho.echo_credentials(true);
    let options = FakeOptions::default();
    let secret = options.client_secret.clone();
    let client = client();
    let query = format!("/api/v1/echo?key={KEY}&cs={secret}");
    let answer = client
        .post(s.url(&query))
        .header("x-proxy-key", KEY)
        .header("x-forwarded-key", KEY)
        .body(format!(
            "{{\"secret\":\"{secret}\",\"pad\":\"{}\"}}",
            "x".repeat(40)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let echoed = answer.text().await.unwrap();
    let token = s.zoho.issued_tokens().pop().unwrap();
    assert!(
        echoed.contains(&token),
        "the fake echoes the token: {echoed}"
    );
    s.proxy.stop().await;

    let text = std::fs::read_to_string(&file).unwrap();
    let mut secrets = vec![KEY.to_owned(), secret, options.refresh_token.clone()];
    secrets.extend(s.zoho.issued_tokens());
    for secret in &secrets {
        assert!(!text.contains(secret.as_str()), "{secret} in {text}");
    }
    let entries = har_of(&file)["log"]["entries"].as_array().unwrap().clone();
    assert_eq!(entries.len(), 1);
    let entry = &entries[0];
    let request = &entry["request"];
    assert!(
        request["url"].as_str().unwrap().contains("key=***&cs=***"),
        "{entry}"
    );
    assert!(
        request["postData"]["text"]
            .as_str()
            .unwrap()
            .contains("\"secret\":\"***\""),
        "{entry}"
    );
    let content = entry["response"]["content"]["text"].as_str().unwrap();
    assert!(content.contains("Zoho-oauthtoken ***"), "{entry}");
}

#[tokio::test]
async fn a_request_recorded_with_a_secret_masked_in_its_query_is_replayed() {
    // The recording holds `key=***`: the same request, masked as it was recorded, is
    // answered (it had been a miss, and a CI job under --replay-strict had no way
    // forward; audit).
    let dir = tempfile::tempdir().unwrap();
    let (s, file) = recording(dir.path(), |c| {
        c.access.api_keys = vec![Secret::new(KEY.into())];
    })
    .await;
    let query = format!("/api/v1/tickets?key={KEY}&limit=2");
    let recorded = client()
        .get(s.url(&query))
        .header("x-proxy-key", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(recorded.status(), 200);
    let recorded = recorded.text().await.unwrap();
    s.proxy.stop().await;
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(!text.contains(KEY) && text.contains("key=***"), "{text}");

    let (serving, _lines) = replay(dir.path(), &file, &[], &[("ZOHO_PROXY_API_KEYS", KEY)]).await;
    let replayed = client()
        .get(serving.url(&query))
        .header("x-proxy-key", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(replayed.status(), 200);
    assert_eq!(replayed.text().await.unwrap(), recorded);
    stop(serving).await;
}

#[tokio::test]
async fn a_secret_in_a_compressed_request_body_is_masked() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let (s, file) = recording(dir.path(), |c| {
        c.access.api_keys = vec![Secret::new(KEY.into())];
    })
    .await;
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), Default::default());
    gzip.write_all(format!("{{\"key\":\"{KEY}\"}}").as_bytes())
        .unwrap();
    let answer = client()
        .post(s.url("/api/v1/echo"))
        .header("x-proxy-key", KEY)
        .header("content-encoding", "gzip")
        .body(gzip.finish().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    s.proxy.stop().await;
    let har = har_of(&file);
    let request = &har["log"]["entries"][0]["request"];
    assert_eq!(
        request["postData"]["text"],
        format!("{{\"key\":\"***\"}}"),
        "{request}"
    );
    let headers = request["headers"].as_array().unwrap();
    assert!(
        !headers.iter().any(|h| h["name"] == "content-encoding"),
        "recorded decoded: {request}"
    );
}

#[tokio::test]
async fn a_secret_a_reload_brought_is_masked_too() {
    // The proxy starts with a client secret Accounts refuses; the operator fixes it
    // (SIGHUP). The recording opened with the old one masks the new one as well.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("desk.har");
    let options = FakeOptions::default();
    let fake = zoho_desk_proxy::fake_zoho::FakeZoho::start_with(options.clone())
        .await
        .unwrap();
    let mut good = config_for(&fake, &options);
    good.record.file = Some(file.clone());
    let mut wrong = good.clone();
    wrong.oauth.client_secret = Secret::new("a-client-secret-since-replaced".into());
    let (proxy, reload) = start_proxy_with_reload(wrong).await;
    reload.send(good).await.unwrap();
    // Refreshed with the reloaded secret: the reload was taken.
    wait_for_metric(&proxy, "zoho_proxy_token_refreshes_total{result=\"ok\"} 1").await;
    let secret = &options.client_secret;
    let answer = fetch(proxy.url(&format!("/api/v1/echo?cs={secret}"))).await;
    assert_eq!(answer.status(), 200);
    proxy.stop().await;
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(!text.contains(secret.as_str()), "{secret} in {text}");
    assert!(text.contains("cs=***"), "{text}");
}

#[tokio::test]
async fn a_recording_damaged_before_its_end_is_neither_replayed_nor_appended_to() {
    // A crash only ever cuts a recording's end; a line damaged with whole entries after
    // it (an edit, a merge) must not cost those entries.
    let dir = tempfile::tempdir().unwrap();
    let (s, file) = recording(dir.path(), |_| {}).await;
    for n in 0..3 {
        let path = format!("/api/v1/tickets?from={n}");
        assert_eq!(send(&s.url(""), "GET", &path, None).await.status(), 200);
    }
    s.proxy.stop().await;
    let text = std::fs::read_to_string(&file).unwrap();
    let second = text.find("\n,{").unwrap() + 1;
    let damaged = format!("{}<<<<<<< HEAD\n{}", &text[..second], &text[second..]);
    std::fs::write(&file, &damaged).unwrap();

    let out = command(dir.path())
        .arg("replay")
        .arg(&file)
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 3 is not an entry"), "{stderr}");

    let mut config = config_for(&s.fake, &FakeOptions::default());
    config.record.file = Some(file.clone());
    let err = refused_at_start(config).await;
    assert!(matches!(err, zoho_desk_proxy::RunError::Record(_)), "{err}");
    assert!(
        err.to_string().contains("--record") && err.to_string().contains("line 3"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        damaged,
        "unchanged"
    );
}

#[tokio::test]
async fn a_miss_on_a_request_recorded_with_its_body_cut_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let (s, file) = recording(dir.path(), |c| c.record.max_body_bytes = 16).await;
    let body = r#"{"subject":"longer than sixteen bytes"}"#;
    let answer = send(&s.url(""), "POST", "/api/v1/tickets", Some(body)).await;
    assert_eq!(answer.status(), 200);
    s.proxy.stop().await;

    let (serving, _) = replay(dir.path(), &file, &[], &[]).await;
    let answer = send(&serving.url(""), "POST", "/api/v1/tickets", Some(body)).await;
    assert_eq!(answer.status(), 404);
    let text = answer.text().await.unwrap();
    assert!(text.contains("PROXY_REPLAY_MISS"), "{text}");
    assert!(text.contains("body cut at record.max_body_bytes"), "{text}");
    stop(serving).await;
}

#[tokio::test]
async fn two_recorders_never_share_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let (s, file) = recording(dir.path(), |_| {}).await;
    assert_eq!(
        send(&s.url(""), "GET", "/api/v1/tickets", None)
            .await
            .status(),
        200
    );
    let mut config = config_for(&s.fake, &FakeOptions::default());
    config.record.file = Some(file.clone());
    let err = refused_at_start(config.clone()).await;
    assert!(
        err.to_string()
            .contains("another process is recording to it"),
        "{err}"
    );
    s.proxy.stop().await;
    assert_eq!(har_of(&file)["log"]["entries"].as_array().unwrap().len(), 1);
    // Once the first has stopped, the file is free.
    let proxy = start_proxy(config).await;
    proxy.stop().await;
}

#[tokio::test]
async fn a_miss_names_the_closest_request_and_strict_mode_fails_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let (file, _, _) = record(dir.path()).await;

    let (serving, mut lines) = replay(dir.path(), &file, &["--replay-strict"], &[]).await;
    let base = serving.url("");
    // Another body for a POST misses; the closest is the recorded POST.
    let miss = send(
        &base,
        "POST",
        "/api/v1/tickets",
        Some(r#"{"subject":"other"}"#),
    )
    .await;
    let body = assert_proxy_error(miss, 404, "PROXY_REPLAY_MISS").await;
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("the recording has POST /api/v1/tickets with another body"),
        "only the body differs, and the miss says so: {message}"
    );
    let miss = send(&base, "GET", "/api/v1/tickets?limit=3", None).await;
    let body = assert_proxy_error(miss, 404, "PROXY_REPLAY_MISS").await;
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("GET /api/v1/tickets"),
        "{body}"
    );
    let metrics = metrics_of(&serving).await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "zoho_proxy_replay_misses_total 2"),
        "{metrics}"
    );
    let status = stop(serving).await;
    assert_eq!(status.code(), Some(1), "strict mode: misses fail the run");
    // The reader ends at the child's EOF, which closes the channel.
    let mut log = String::new();
    while let Some(line) = lines.recv().await {
        log.push_str(&line);
        log.push('\n');
    }
    assert!(
        log.contains("POST /api/v1/tickets"),
        "the misses are listed at exit: {log}"
    );
    assert!(!log.contains("limit=3"), "queries are never logged: {log}");

    // Without --replay-strict the same misses exit 0; strict with no miss exits 0.
    let (serving, _lines) = replay(dir.path(), &file, &[], &[]).await;
    assert_eq!(status_of(&serving, "/api/v1/missing").await, 404);
    assert_eq!(stop(serving).await.code(), Some(0));
    let (serving, _lines) = replay(dir.path(), &file, &["--strict"], &[]).await;
    assert_eq!(status_of(&serving, "/api/v1/organizations").await, 200);
    assert_eq!(stop(serving).await.code(), Some(0));
}

async fn status_of(serving: &Serving, path: &str) -> u16 {
    send(&serving.url(""), "GET", path, None)
        .await
        .status()
        .as_u16()
}

#[tokio::test]
async fn access_rules_hold_in_replay() {
    let dir = tempfile::tempdir().unwrap();
    let (file, _, _) = record(dir.path()).await;
    let (serving, _lines) = replay(
        dir.path(),
        &file,
        &[],
        &[("ZOHO_PROXY_API_KEYS", "another-key")],
    )
    .await;
    let answer = send(&serving.url(""), "GET", "/api/v1/tickets", None).await;
    assert_proxy_error(answer, 401, "PROXY_UNAUTHORIZED").await;
    let answer = client()
        .get(serving.url("/api/v1/tickets"))
        .header("x-proxy-key", "another-key")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    // Sent raw: an HTTP client library would resolve the dot-segments itself.
    let answer = raw_request(
        serving.addr,
        "GET /api/v1/%2e%2e/secrets HTTP/1.1\r\nHost: x\r\nX-Proxy-Key: another-key\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(raw_status(&answer), 400, "{answer}");
    stop(serving).await;
}

#[tokio::test]
async fn a_recording_cut_short_is_repaired_and_recording_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (file, recorded, _) = record(dir.path()).await;
    // A crash in the middle of a write: the last entry is half there, no trailer.
    let text = std::fs::read_to_string(&file).unwrap();
    let cut = text.len() - 40;
    std::fs::write(&file, &text[..cut]).unwrap();
    assert!(serde_json::from_str::<serde_json::Value>(&text[..cut]).is_err());

    // Replay takes the whole entries.
    let (serving, _lines) = replay(dir.path(), &file, &[], &[]).await;
    let got = seen(
        &serving.url(""),
        "GET",
        "/api/v1/tickets?from=0&limit=2",
        None,
    )
    .await;
    assert_eq!(got.bytes, recorded[1].bytes);
    stop(serving).await;

    // Recording again repairs the file and appends.
    let (file, more, _) = record(dir.path()).await;
    let har = har_of(&file);
    let entries = har["log"]["entries"].as_array().unwrap().len();
    assert_eq!(entries, recorded.len() - 1 + more.len());
}

#[tokio::test]
async fn bad_files_get_a_clear_error_and_bad_entries_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let run = |file: PathBuf| {
        let dir = dir.path().to_owned();
        async move {
            command(&dir)
                .arg("replay")
                .arg(file)
                .args(["--listen", "127.0.0.1:0"])
                .output()
                .await
                .unwrap()
        }
    };
    let missing = run(dir.path().join("nope.har")).await;
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("nope.har"));

    let garbage = dir.path().join("garbage.har");
    std::fs::write(&garbage, "{\"log\": {\"entries\": [\n  {\"request\": \n").unwrap();
    let out = run(garbage).await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not a HAR file") && stderr.contains("line"),
        "{stderr}"
    );

    let no_entries = dir.path().join("empty.json");
    std::fs::write(&no_entries, "{\"hello\": 1}").unwrap();
    let out = run(no_entries).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("log.entries"));

    let huge = dir.path().join("huge.har");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len((1 << 30) + 1)
        .unwrap();
    let out = run(huge).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 GiB"));

    // A pipe is no recording (it would be read for ever): refused at once, as replayed or
    // recorded to.
    #[cfg(unix)]
    {
        let fifo = dir.path().join("fifo.har");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let out = tokio::time::timeout(Duration::from_secs(10), run(fifo.clone()))
            .await
            .expect("refused, not read for ever");
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("not a regular file"));
        let config = dir.path().join("record.toml");
        std::fs::write(
            &config,
            "[oauth]\nclient_id = \"1000.X\"\nclient_secret = \"s\"\nrefresh_token = \"1000.r\"\n",
        )
        .unwrap();
        let recorded = command(dir.path())
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&config)
            .arg("--record")
            .arg(&fifo)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(10), recorded)
            .await
            .expect("refused, not read for ever")
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("not a regular file"));
    }

    // Hand-edited entries: broken ones are skipped with a warning naming them, duplicates
    // answer in order, binary bodies come back as bytes.
    let edited = dir.path().join("edited.har");
    let entry = |url: &str, status: u16, text: &str, encoding: Option<&str>| {
        serde_json::json!({
            "request": {"method": "GET", "url": url, "headers": []},
            "response": {"status": status, "headers": [{"name": "Content-Type", "value": "application/octet-stream"}],
                "content": {"text": text, "encoding": encoding, "mimeType": "application/octet-stream"}}
        })
    };
    let har = serde_json::json!({"log": {"version": "1.2", "creator": {"name": "hand"}, "entries": [
        entry("https://desk.zoho.com/api/v1/a", 200, "first", None),
        entry("https://desk.zoho.com/api/v1/a", 200, "second", None),
        entry("https://desk.zoho.com/api/v1/bin", 200, "AAGAgf8=", Some("base64")),
        entry("https://desk.zoho.com/api/v1/broken", 200, "!!!", Some("base64")),
        entry("not a url at all", 200, "x", None),
        entry("https://desk.zoho.com/api/v1/failed", 0, "", None),
        {"request": 42},
    ]}});
    std::fs::write(&edited, har.to_string()).unwrap();
    let (serving, mut lines) = replay(dir.path(), &edited, &[], &[]).await;
    let base = serving.url("");
    assert_eq!(seen(&base, "GET", "/api/v1/a", None).await.bytes, b"first");
    assert_eq!(seen(&base, "GET", "/api/v1/a", None).await.bytes, b"second");
    assert_eq!(seen(&base, "GET", "/api/v1/a", None).await.bytes, b"second");
    assert_eq!(
        seen(&base, "GET", "/api/v1/bin", None).await.bytes,
        [0x00, 0x01, 0x80, 0x81, 0xff]
    );
    assert_eq!(status_of(&serving, "/api/v1/broken").await, 404);
    assert_eq!(status_of(&serving, "/api/v1/failed").await, 404);
    stop(serving).await;
    // The reader ends at the child's EOF, which closes the channel.
    let mut log = String::new();
    while let Some(line) = lines.recv().await {
        log.push_str(&line);
        log.push('\n');
    }
    for skipped in ["\"entry\":3", "\"entry\":4", "\"entry\":5", "\"entry\":6"] {
        assert!(log.contains(skipped), "{skipped} named in {log}");
    }
}

#[tokio::test]
async fn a_browser_har_replays_its_desk_entries() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/browser.har");
    let dir = tempfile::tempdir().unwrap();
    let (serving, mut lines) = replay(dir.path(), &fixture, &[], &[]).await;
    let base = serving.url("");
    let tickets = seen(&base, "GET", "/api/v1/tickets?limit=1&from=0", None).await;
    assert_eq!(tickets.status, 200);
    assert_eq!(
        tickets.content_encoding, None,
        "a browser stores bodies decoded"
    );
    let json: serde_json::Value = serde_json::from_slice(&tickets.bytes).unwrap();
    assert_eq!(json["data"][0]["subject"], "Printer on fire");
    let contact = seen(&base, "GET", "/api/v1/contacts/1892000000042032", None).await;
    assert_eq!(contact.status, 404);
    assert!(String::from_utf8_lossy(&contact.bytes).contains("URL_NOT_FOUND"));
    // Other hosts' entries (scripts, Accounts) are not Desk's.
    assert_eq!(status_of(&serving, "/js/app.js").await, 404);
    stop(serving).await;
    // The reader ends at the child's EOF, which closes the channel.
    let mut log = String::new();
    while let Some(line) = lines.recv().await {
        log.push_str(&line);
        log.push('\n');
    }
    assert!(log.contains("static.zohocdn.com"), "{log}");
}

#[tokio::test]
async fn the_demo_records_its_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = command(dir.path())
        .args(["demo", "--record", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut addr = None;
    while let Some(line) = lines.next_line().await.unwrap() {
        if let Some(url) = line.trim().strip_prefix("proxy:") {
            addr = Some(url.trim().to_owned());
            break;
        }
    }
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let base = addr.expect("the demo's address");
    assert_eq!(status(format!("{base}/api/v1/tickets")).await, 200);
    sigterm(&child);
    let out = child.wait_with_output().await.unwrap();
    assert!(out.status.success());
    let text = std::fs::read_to_string(dir.path().join("zoho-desk-demo.har")).unwrap();
    let har: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(har["log"]["entries"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_replay_reads_no_credential_and_matches_a_streamed_body_by_its_digest() {
    let dir = tempfile::tempdir().unwrap();
    let (file, recorded, _) = record(dir.path()).await;
    // Every credential source points at something missing: a replay looks at none.
    let config = dir.path().join("ci.toml");
    std::fs::write(
        &config,
        r#"
token_file = "/nonexistent/token.json"
token_store = "redis://127.0.0.1:1"
[oauth]
client_id = "x"
client_secret_file = "/nonexistent/secret"
refresh_token_file = "/nonexistent/refresh"
"#,
    )
    .unwrap();
    let (serving, _lines) = replay(
        dir.path(),
        &file,
        &["--config", config.to_str().unwrap()],
        &[],
    )
    .await;
    // The recorded POST, sent chunked (no length): matched by its digest as it streams.
    let post = recorded.iter().find(|s| s.method == "POST").unwrap();
    let chunks: Vec<Result<&'static [u8], std::io::Error>> =
        post.body.unwrap().as_bytes().chunks(5).map(Ok).collect();
    let answer = client()
        .post(serving.url("/api/v1/tickets"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), post.status);
    assert_eq!(answer.bytes().await.unwrap().to_vec(), post.bytes);
    assert_eq!(stop(serving).await.code(), Some(0));
}

#[tokio::test]
async fn bytes_after_the_trailer_are_repaired_before_recording_appends() {
    let dir = tempfile::tempdir().unwrap();
    let (file, recorded, _) = record(dir.path()).await;
    // Something after the end (an editor's newline, a half-written repair): appending at
    // the trailer must not leave it in the middle of the file.
    let mut text = std::fs::read_to_string(&file).unwrap();
    text.push_str("\n\n");
    std::fs::write(&file, &text).unwrap();
    let (file, more, _) = record(dir.path()).await;
    let har = har_of(&file);
    let entries = har["log"]["entries"].as_array().unwrap().len();
    assert_eq!(entries, recorded.len() + more.len());
}

#[tokio::test]
async fn an_answer_cut_off_before_its_end_is_recorded_as_truncated() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let dir = tempfile::tempdir().unwrap();
    let (s, file) = recording(dir.path(), |_| {}).await;
    let whole = fetch(s.url("/api/v1/tickets")).await;
    assert_eq!(whole.status(), 200);
    whole.bytes().await.unwrap();
    // Desk sends the head at once and the body a minute later: the client takes the
    // head and leaves.
    let mut stream = tokio::net::TcpStream::connect(s.proxy.addr).await.unwrap();
    stream
        .write_all(b"GET /api/v1/slow-body?ms=60000 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut buf = [0u8; 1024];
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "the head never came");
        head.extend_from_slice(&buf[..n]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"));
    wait_for_metric(&s.proxy, "zoho_proxy_desk_in_flight 1").await;
    drop(stream);
    // Desk's call is given back when the answer ends, after its recording is handed over.
    wait_for_metric(&s.proxy, "zoho_proxy_desk_in_flight 0").await;
    s.proxy.stop().await;

    let har = har_of(&file);
    let entries = har["log"]["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{har}");
    let content = |path: &str| {
        let entry = entries
            .iter()
            .find(|e| e["request"]["url"].as_str().unwrap().contains(path))
            .unwrap();
        entry["response"]["content"].clone()
    };
    assert_eq!(content("/api/v1/tickets").get("_truncated"), None, "whole");
    let cut = content("/api/v1/slow-body");
    assert_eq!(cut["_truncated"], true, "{cut}");
    assert_eq!(cut["size"], 0, "{cut}");
}

#[tokio::test]
async fn an_answer_that_ends_with_trailers_is_recorded_whole() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    // A Desk stand-in whose chunked answer ends with trailers (written by hand: a hyper
    // server sends trailers only to a request with `TE: trailers`, a hop-by-hop header
    // the proxy does not forward).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let desk = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let Ok(n) = tcp.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    head.extend_from_slice(&buf[..n]);
                    if head.windows(4).any(|w| w == b"\r\n\r\n") {
                        head.clear();
                        let answer = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\nb\r\n{\"data\":[]}\r\n0\r\nx-checksum: abc\r\n\r\n";
                        if tcp.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let (s, file) = recording(dir.path(), move |c| {
        c.upstream = zoho_desk_proxy::BaseUrl::parse(&format!("http://{desk}")).unwrap();
    })
    .await;
    let answer = client().get(s.url("/api/v1/tickets")).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.bytes().await.unwrap(), "{\"data\":[]}");
    wait_for_metric(&s.proxy, "zoho_proxy_desk_in_flight 0").await;
    s.proxy.stop().await;

    let har = har_of(&file);
    let entries = har["log"]["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{har}");
    let content = &entries[0]["response"]["content"];
    assert_eq!(content.get("_truncated"), None, "{content}");
    assert_eq!(content["text"], "{\"data\":[]}", "{content}");
}

#[tokio::test]
async fn a_replayed_429_counts_as_desk_s() {
    let dir = tempfile::tempdir().unwrap();
    let (s, file) = recording(dir.path(), |_| {}).await;
    // Desk's 429, and again for the retry: the client gets it.
    s.zoho.throttle_next_desk_requests(2, Some(0));
    assert_eq!(status(s.url("/api/v1/tickets")).await, 429);
    s.proxy.stop().await;

    let (serving, _lines) = replay(dir.path(), &file, &[], &[]).await;
    assert_eq!(status(serving.url("/api/v1/tickets")).await, 429);
    let metrics = metrics_of(&serving).await;
    assert!(
        metrics.lines().any(|l| l == "zoho_proxy_desk_429_total 1"),
        "{metrics}"
    );
    stop(serving).await;
}
