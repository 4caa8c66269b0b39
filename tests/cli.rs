//! The built binary: exit codes, `exchange`, `check`, the token file across restarts,
//! and SIGTERM draining (README "Command line", "Tokens", "Operations").

mod support;

use std::time::Duration;

use support::binary::*;
use support::*;
use zoho_desk_proxy::fake_zoho::{AccountsBehavior, FakeOptions, FakeZoho};

#[tokio::test]
async fn exchange_stores_the_refresh_token_masked_and_serve_reuses_the_access_token() {
    let fake = FakeZoho::start().await.unwrap();
    let zoho = fake.control();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &fake, false, "", "");

    let out = exchange(dir.path(), &config).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let refresh = FakeOptions::default().refresh_token;
    assert!(
        stdout.contains(&format!("…{}", &refresh[refresh.len() - 4..])),
        "{stdout}"
    );
    assert!(
        !stdout.contains(&refresh),
        "the refresh token is printed masked"
    );
    let form = zoho.last_token_form().unwrap();
    assert!(form.contains(&("grant_type".into(), "authorization_code".into())));
    assert!(!form.iter().any(|(k, _)| k == "redirect_uri"));

    let token_file = dir.path().join("state/token.json");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    // A grant token is single-use: Zoho's answer is explained.
    let again = command(dir.path())
        .args(["exchange", "--code", "1000.fakegrant.0001", "--config"])
        .arg(&config)
        .output()
        .await
        .unwrap();
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already used"));
    // Its log lines follow `log.format` (here from the environment), as serve's do.
    let logged = command(dir.path())
        .args(["exchange", "--code", "1000.fakegrant.0001", "--config"])
        .arg(&config)
        .env("ZOHO_PROXY_LOG_FORMAT", "json")
        .env("RUST_LOG", "debug")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&logged.stderr);
    assert!(!stderr.contains('\u{1b}'), "{stderr}");
    assert!(stderr.lines().any(|l| l.starts_with('{')), "{stderr}");

    // A client id of another data centre: the hint names `dc`.
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("1000.FAKECLIENTID", "1000.OTHERDC");
    let other_dc = dir.path().join("other-dc.toml");
    std::fs::write(&other_dc, text).unwrap();
    let wrong = command(dir.path())
        .args(["exchange", "--code", "1000.fakegrant.0001", "--config"])
        .arg(&other_dc)
        .output()
        .await
        .unwrap();
    assert_eq!(wrong.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        stderr.contains("invalid_client") && stderr.contains("`dc`"),
        "{stderr}"
    );

    // serve: refresh token from the file, access token reused without any Accounts call.
    let Serving { child, addr } = serve(dir.path(), &config).await;
    let response = fetch(format!("http://{addr}/api/v1/tickets")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        zoho.token_requests(),
        0,
        "the persisted access token was reused"
    );
    sigterm(&child);
    let status = child.wait_with_output().await.unwrap().status;
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn exchange_spends_no_grant_token_it_cannot_keep_the_answer_of() {
    let fake = FakeZoho::start().await.unwrap();
    let zoho = fake.control();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &fake, false, "", "");
    std::fs::write(dir.path().join("a-file"), "").unwrap();
    std::fs::create_dir(dir.path().join("a-dir.json")).unwrap();
    for token_file in ["a-file/token.json", "a-dir.json"] {
        let out = command(dir.path())
            .args(["exchange", "--code", "1000.fakegrant.0001", "--config"])
            .arg(&config)
            .env("ZOHO_TOKEN_FILE", dir.path().join(token_file))
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{token_file}: {stderr}");
        assert!(stderr.contains("token_file"), "{stderr}");
        assert!(stderr.contains("grant token was not used"), "{stderr}");
    }
    assert_eq!(zoho.exchange_requests(), 0, "the grant token is still good");
}

#[tokio::test]
async fn exchange_whose_answer_was_lost_says_the_grant_token_may_be_spent() {
    let fake = FakeZoho::start().await.unwrap();
    fake.control()
        .set_accounts_behavior(AccountsBehavior::CloseConnection);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &fake, false, "", "");
    let out = exchange(dir.path(), &config).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    // Not "check DNS": the request went out, and the grant token is single-use.
    assert!(
        stderr.contains("may have reached Zoho Accounts") && stderr.contains("may have been used"),
        "{stderr}"
    );
}

#[tokio::test]
async fn exchange_says_when_the_configuration_s_refresh_token_will_be_used_instead() {
    let fake = FakeZoho::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &fake, false, "", "");
    let out = command(dir.path())
        .args(["exchange", "--code", "1000.fakegrant.0001", "--config"])
        .arg(&config)
        .env("ZOHO_REFRESH_TOKEN", "1000.anotherrefreshtoken.0042")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("also set in the configuration") && stdout.contains("ZOHO_REFRESH_TOKEN"),
        "{stdout}"
    );
    assert!(!stdout.contains("anotherrefreshtoken"), "{stdout}");
}

#[tokio::test]
async fn a_corrupt_token_file_is_reported_and_the_proxy_refreshes() {
    let fake = FakeZoho::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &fake, true, "", "");
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    std::fs::write(dir.path().join("state/token.json"), "{{{ not json").unwrap();
    let Serving { child, addr } = serve(dir.path(), &config).await;
    let response = fetch(format!("http://{addr}/api/v1/tickets")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(fake.control().token_requests(), 1);
    sigterm(&child);
    assert!(child.wait_with_output().await.unwrap().status.success());
    // The file was rewritten with the new token.
    let text = std::fs::read_to_string(dir.path().join("state/token.json")).unwrap();
    assert!(text.contains(&fake.control().issued_tokens()[0]));
}

#[tokio::test]
async fn sigterm_turns_ready_503_lets_in_flight_requests_finish_and_exits_0() {
    let fake = FakeZoho::start().await.unwrap();
    let zoho = fake.control();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &fake, true, "", "");
    let Serving { child, addr } = serve(dir.path(), &config).await;
    let base = format!("http://{addr}");
    assert_eq!(status(format!("{base}/api/v1/tickets")).await, 200);

    zoho.set_desk_delay(Duration::from_millis(1500));
    let slow = tokio::spawn({
        let url = format!("{base}/api/v1/tickets");
        async move { client().get(url).send().await.map(|r| r.status().as_u16()) }
    });
    wait_for_desk_requests(&zoho, 2).await;
    sigterm(&child);
    let mut ready = 0;
    for _ in 0..100 {
        ready = client()
            .get(format!("{base}/_proxy/ready"))
            .send()
            .await
            .map_or(0, |r| r.status().as_u16());
        if ready == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(ready, 503, "ready turns 503 at once");
    assert_eq!(
        slow.await.unwrap().unwrap(),
        200,
        "the in-flight request finishes"
    );
    let status = child.wait_with_output().await.unwrap().status;
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn check_reports_each_step_and_exits_0_only_when_all_work() {
    /// `check` with `config` and `envs`, run in `dir`; what it printed.
    async fn check(
        dir: &std::path::Path,
        config: &std::path::Path,
        envs: &[(&str, &str)],
    ) -> (std::process::Output, String) {
        let out = command(dir)
            .args(["check", "--config"])
            .arg(config)
            .envs(envs.iter().copied())
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        (out, stdout)
    }

    let fake = FakeZoho::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &fake, true, "", "");
    let (out, stdout) = check(dir.path(), &config, &[]).await;
    assert!(out.status.success(), "{stdout}");
    for line in [
        "[ok  ] configuration",
        "[ok  ] token file",
        "[ok  ] Zoho Accounts reachable",
        "[ok  ] token refresh",
        "[ok  ] Zoho Desk",
        "all checks passed",
    ] {
        assert!(stdout.contains(line), "{line} in {stdout}");
    }

    // A token file that cannot be written: serve would lose its token at every restart.
    let token_file = dir.path().display().to_string();
    let (out, stdout) = check(dir.path(), &config, &[("ZOHO_TOKEN_FILE", &token_file)]).await;
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("[FAIL] token file") && stdout.contains("fix: set token_file"),
        "{stdout}"
    );

    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("fake-client-secret", "wrong-secret");
    std::fs::write(&config, text).unwrap();
    let (out, stdout) = check(dir.path(), &config, &[]).await;
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("[FAIL] token refresh") && stdout.contains("client secret"),
        "{stdout}"
    );
}

#[tokio::test]
async fn configuration_errors_exit_2_and_name_the_key() {
    let fake = FakeZoho::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("lisen = \"127.0.0.1:0\"", "lisen"),
        (
            "listen = \"0.0.0.0:0\"",
            "access.allow_unauthenticated_remote",
        ),
        (
            "listen = \"0.0.0.0:0\"\n[access]\nallow_cidrs = [\"0.0.0.0/0\", \"::/0\"]",
            "access.allow_unauthenticated_remote",
        ),
        (
            "listen = \"0.0.0.0:0\"\n[access]\nallow_cidrs = [\"0.0.0.0/1\", \"128.0.0.0/1\"]",
            "access.allow_unauthenticated_remote",
        ),
        ("dc = \"mars\"", "dc"),
        (
            "token_store = \"redis://127.0.0.1:1/abc\"",
            "`token_store`: not a Redis URL that can be used",
        ),
    ];
    for (extra, named) in cases {
        let config = write_config(dir.path(), &fake, true, extra, "");
        let out = command(dir.path())
            .args(["serve", "--config"])
            .arg(&config)
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra}: {stderr}");
        assert!(stderr.contains(named), "{extra}: {stderr}");
    }
    // An open listener is one more problem of the list, from the file or from --listen,
    // for serve and check alike.
    let config = write_config(
        dir.path(),
        &fake,
        true,
        "listen = \"0.0.0.0:0\"\ndc = \"mars\"",
        "",
    );
    let other = tempfile::tempdir().unwrap();
    let mars = write_config(other.path(), &fake, true, "dc = \"mars\"", "");
    for args in [
        vec!["serve", "--config", config.to_str().unwrap()],
        vec!["check", "--config", config.to_str().unwrap()],
        vec![
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--config",
            mars.to_str().unwrap(),
        ],
    ] {
        let out = command(dir.path()).args(&args).output().await.unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains("`dc`") && stderr.contains("access.allow_unauthenticated_remote"),
            "{args:?}: {stderr}"
        );
    }
    // A blank key list in the environment (a compose file's unset variable) never opens
    // the proxy: exit 2, naming the variable, even with keys in the file.
    for blank in ["", " , "] {
        let config = write_config(dir.path(), &fake, true, "", "[access]\napi_keys = [\"k\"]");
        let out = command(dir.path())
            .args(["serve", "--config"])
            .arg(&config)
            .env("ZOHO_PROXY_API_KEYS", blank)
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{blank:?}: {stderr}");
        assert!(stderr.contains("ZOHO_PROXY_API_KEYS"), "{stderr}");
    }
    // A blank credential variable never falls back to the file's value.
    for var in ["ZOHO_CLIENT_ID", "ZOHO_CLIENT_SECRET", "ZOHO_REFRESH_TOKEN"] {
        let config = write_config(dir.path(), &fake, true, "", "");
        let out = command(dir.path())
            .args(["serve", "--config"])
            .arg(&config)
            .env(var, "")
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{var}: {stderr}");
        assert!(
            stderr.contains(&format!("{var} is set but empty")),
            "{stderr}"
        );
    }
    let out = command(dir.path())
        .args(["serve", "--bogus"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test]
async fn an_error_and_its_cause_are_printed_once_each() {
    let dir = tempfile::tempdir().unwrap();
    // The error's own text names the cause: it is not repeated after it.
    let out = command(dir.path())
        .args(["serve", "--config", "/nonexistent.toml"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("cannot read /nonexistent.toml: "),
        "{stderr}"
    );
    assert_eq!(stderr.matches("(os error 2)").count(), 1, "{stderr}");

    // A context that does not name its cause still has it printed after it.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        "token_file = \"\"\n[oauth]\nclient_id = \"id\"\nclient_secret = \"s\"\nrefresh_token = \"r\"\n",
    )
    .unwrap();
    let out = command(dir.path())
        .args(["serve", "--listen", &addr, "--config"])
        .arg(&config)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("error: cannot listen on {addr}: ")),
        "{stderr}"
    );
    assert_eq!(stderr.matches("(os error").count(), 1, "{stderr}");
}

#[tokio::test]
async fn a_refresh_guard_above_zohos_limit_is_served_with_a_warning() {
    let fake = FakeZoho::start().await.unwrap();
    for (limit, warned) in [(11, true), (10, false)] {
        let Logged {
            dir: _dir,
            child,
            mut lines,
            addr,
        } = serve_fake_logged(
            &fake,
            &format!("max_refreshes_per_10min = {limit}"),
            "127.0.0.1",
            &[],
        )
        .await;
        // serve_with returns once the "listening" line was read, after the warnings.
        let mut seen = false;
        while let Ok(line) = lines.try_recv() {
            seen |= line.contains("WARN")
                && line.contains("max_refreshes_per_10min")
                && line.contains("Zoho allows 10 refreshes per 10 minutes per refresh token");
        }
        assert_eq!(seen, warned, "max_refreshes_per_10min = {limit}");
        assert_eq!(status(format!("http://{addr}/api/v1/tickets")).await, 200);
        sigterm(&child);
        assert!(child.wait_with_output().await.unwrap().status.success());
    }
}

#[tokio::test]
async fn rejected_credentials_recover_on_sighup_without_a_restart() {
    let fake = FakeZoho::start().await.unwrap();
    let zoho = fake.control();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &fake, true, "", "");
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, good.replace("fake-client-secret", "wrong-secret")).unwrap();
    let Serving { child, addr } = serve(dir.path(), &config).await;
    let base = format!("http://{addr}");

    let response = fetch(format!("{base}/api/v1/tickets")).await;
    let body = assert_proxy_error(response, 503, "PROXY_AUTH_REJECTED").await;
    assert!(
        body["message"].as_str().unwrap().contains("client secret"),
        "{body}"
    );
    let ready = fetch(format!("{base}/_proxy/ready")).await;
    assert_eq!(ready.status(), 503);
    let calls = zoho.token_requests();

    // The operator fixes the file and sends SIGHUP.
    std::fs::write(&config, &good).unwrap();
    signal(&child, "HUP");
    wait_for_token_requests(&zoho, calls + 1).await;
    let mut last = 0;
    for _ in 0..100 {
        last = status(format!("{base}/api/v1/tickets")).await;
        if last == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(last, 200);
    sigterm(&child);
    assert!(child.wait_with_output().await.unwrap().status.success());
}

#[tokio::test]
async fn sigterm_the_moment_the_proxy_says_it_listens_stops_it_gracefully() {
    let fake = FakeZoho::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &fake, true, "", "");
    // The signals are taken over before the proxy says it listens: never killed by one.
    for _ in 0..5 {
        let Serving { child, .. } = serve(dir.path(), &config).await;
        let (status, _) = stopped_by_sigterm(child).await;
        assert!(status.success(), "{status:?}");
    }
}

#[tokio::test]
async fn sigterm_exits_as_soon_as_the_drain_is_done() {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let fake = FakeZoho::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Long grace and idle times: nothing of them may be waited for once idle.
    let config = write_config(
        dir.path(),
        &fake,
        true,
        "",
        "[timeouts]\nshutdown_grace_secs = 30\nheader_read_secs = 20",
    );
    let Serving { child, addr } = serve(dir.path(), &config).await;
    // A connection that sent nothing, an idle HTTP/1.1 keep-alive one, an idle h2c one.
    let silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let keep_alive = client();
    assert_eq!(
        keep_alive
            .get(format!("http://{addr}/api/v1/tickets"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut h2, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = http::Request::get(format!("http://{addr}/api/v1/tickets"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    assert_eq!(h2.send_request(request).await.unwrap().status(), 200);

    let (status, took) = stopped_by_sigterm(child).await;
    assert!(status.success(), "{status:?}");
    assert!(
        took < Duration::from_secs(3),
        "exited {took:?} after SIGTERM with nothing in flight"
    );
    drop(silent);
}

#[tokio::test]
async fn sigterm_does_not_wait_for_a_hanging_token_refresh() {
    let (_fake, zoho, dir, config) = fake_and_config("[timeouts]\nshutdown_grace_secs = 1").await;
    // Accounts takes a minute: the refresh at start is still out when SIGTERM comes.
    zoho.set_accounts_delay(Duration::from_secs(60));
    let Serving { child, .. } = serve(dir.path(), &config).await;
    wait_for_token_requests(&zoho, 1).await;

    let (status, took) = stopped_by_sigterm(child).await;
    assert!(status.success(), "{status:?}");
    assert!(
        took < Duration::from_secs(5),
        "exited {took:?} after SIGTERM, waiting for Accounts"
    );
}

#[tokio::test]
async fn a_request_cut_at_the_end_of_the_grace_period_is_logged_as_the_proxy_s_not_the_client_s() {
    let (_fake, zoho, dir, config) = fake_and_config("[timeouts]\nshutdown_grace_secs = 0.5").await;
    zoho.set_desk_delay(Duration::from_secs(60));
    let (serving, mut lines) = serve_logged(dir.path(), &config, "127.0.0.1:0", &[]).await;
    let request = tokio::spawn(client().get(serving.url("/api/v1/tickets")).send());
    wait_for_desk_requests(&zoho, 1).await;
    let (status, _) = stopped_by_sigterm(serving.child).await;
    assert!(status.success(), "{status:?}");
    assert!(request.await.unwrap().is_err(), "the client got no answer");
    let mut logged = None;
    while let Some(line) = lines.recv().await {
        if line.contains("\"path\":\"/api/v1/tickets\"") {
            logged = Some(serde_json::from_str::<serde_json::Value>(&line).unwrap());
        }
    }
    let logged = logged.expect("the request's log line");
    // Not 499: the client did not go away, the proxy cut it.
    assert_eq!(logged["status"], 503, "{logged}");
    assert_eq!(logged["cut_by_shutdown"], true, "{logged}");
}

/// `exchange` of the fake's grant token with `config`, run in `dir`.
async fn exchange(dir: &std::path::Path, config: &std::path::Path) -> std::process::Output {
    command(dir)
        .args(["exchange", "--code", "1000.fakegrant.0001", "--config"])
        .arg(config)
        .output()
        .await
        .unwrap()
}

/// The fake Zoho, and a config of it (with the refresh token, then `after_oauth`) in a
/// temp dir of its own.
async fn fake_and_config(
    after_oauth: &str,
) -> (
    FakeZoho,
    zoho_desk_proxy::fake_zoho::FakeControl,
    tempfile::TempDir,
    std::path::PathBuf,
) {
    let fake = FakeZoho::start().await.unwrap();
    let zoho = fake.control();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &fake, true, "", after_oauth);
    (fake, zoho, dir, config)
}

/// Sends SIGTERM to `child` and waits for it to exit (50 s at most): its status, and how
/// long it took.
async fn stopped_by_sigterm(child: tokio::process::Child) -> (std::process::ExitStatus, Duration) {
    let started = std::time::Instant::now();
    sigterm(&child);
    let status = tokio::time::timeout(Duration::from_secs(50), child.wait_with_output())
        .await
        .expect("the proxy exits")
        .unwrap()
        .status;
    (status, started.elapsed())
}

/// Starts `demo` with `args` in `dir` on a port the kernel picks (of 127.0.0.1 unless
/// `args` say `--listen`); the child and the proxy's address, read from the banner.
async fn demo(dir: &std::path::Path, args: &[&str]) -> (tokio::process::Child, String) {
    use tokio::io::AsyncBufReadExt;
    let listen: &[&str] = if args.contains(&"--listen") {
        &[]
    } else {
        &["--listen", "127.0.0.1:0"]
    };
    let mut child = command(dir)
        .arg("demo")
        .args(args)
        .args(listen)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let addr = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(url) = line.trim().strip_prefix("proxy:") {
                return url.trim().trim_start_matches("http://").to_owned();
            }
        }
        panic!("the demo printed no proxy address");
    })
    .await
    .expect("the demo's banner");
    // Keep reading the banner so the demo never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, addr)
}

#[tokio::test]
async fn the_demo_serves_the_fake_desk_with_no_credentials() {
    // On loopback, and on every address (in a container, say: the fake holds nothing
    // real, so no key is asked for).
    for args in [&[][..], &["--listen", "0.0.0.0:0"]] {
        let dir = tempfile::tempdir().unwrap();
        let (child, addr) = demo(dir.path(), args).await;
        // The banner's address is one to send to (never 0.0.0.0).
        assert!(addr.starts_with("127.0.0.1:"), "{addr}");
        let tickets: serde_json::Value = fetch(format!("http://{addr}/api/v1/tickets"))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(tickets["data"].as_array().unwrap().len(), 3, "{tickets}");
        // On every address, any name reaches it: a container's service name.
        let by_name = client()
            .get(format!("http://{addr}/api/v1/tickets"))
            .header("Host", "zoho-proxy")
            .send()
            .await
            .unwrap();
        let expected = if args.is_empty() { 403 } else { 200 };
        assert_eq!(by_name.status(), expected, "{args:?}");
        sigterm(&child);
        let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {:?}", out.status);
    }
}

/// The README's three commands of transparent mode: `demo --intercept`, then in another
/// shell `eval "$(zoho-desk-proxy env)"` and a client hard-wired to https://desk.zoho.com:
/// curl, and the `requests` script of examples/.
#[tokio::test]
async fn the_intercept_demo_serves_clients_hard_wired_to_desk() {
    let dir = tempfile::tempdir().unwrap();
    let (child, addr) = demo(dir.path(), &["--intercept"]).await;
    assert!(dir.path().join(".zoho-desk-proxy/ca/ca.pem").exists());
    let shell = |client: &str| {
        let script = format!("eval \"$('{BIN}' env --listen {addr})\" && {client}");
        let mut cmd = tokio::process::Command::new("bash");
        cmd.args(["-c", &script]).current_dir(dir.path());
        cmd
    };
    let has = |program: &str, args: &[&str]| {
        std::process::Command::new(program)
            .args(args)
            .output()
            .is_ok_and(|out| out.status.success())
    };
    if has("curl", &["--version"]) {
        let out = shell("curl -sS --max-time 10 https://desk.zoho.com/api/v1/tickets")
            .output()
            .await
            .unwrap();
        let body = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["data"].as_array().unwrap().len(), 3, "{body}");
    } else {
        eprintln!("curl is not installed: skipping the curl client of the intercept demo");
    }
    if has("python3", &["-c", "import requests"]) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/desk_python.py");
        let out = shell(&format!("python3 '{script}'"))
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("3 tickets"), "{stdout}");
    } else {
        eprintln!("python3 with requests is not installed: skipping examples/desk_python.py");
    }
    sigterm(&child);
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success(), "{:?}", out.status);
}
