//! Test harness: start the fake Zoho and the real proxy in-process, on port 0, and talk
//! to them like a user would.
#![allow(dead_code)]

pub mod binary;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use zoho_desk_proxy::config::Config;
use zoho_desk_proxy::fake_zoho::{FakeControl, FakeOptions, FakeZoho};

/// A proxy running in-process.
pub struct TestProxy {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), zoho_desk_proxy::RunError>>>,
}

impl TestProxy {
    /// `http://127.0.0.1:PORT` + path.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Sends the shutdown signal without waiting.
    pub fn signal_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Shuts down and waits for `run` to return.
    pub async fn stop(mut self) {
        self.signal_shutdown();
        if let Some(task) = self.task.take() {
            task.await
                .expect("proxy task panicked")
                .expect("proxy failed");
        }
    }

    /// Waits for `run` to return (after `signal_shutdown`).
    pub async fn join(mut self) {
        if let Some(task) = self.task.take() {
            task.await
                .expect("proxy task panicked")
                .expect("proxy failed");
        }
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.signal_shutdown();
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// The fake and a proxy in front of it.
pub struct Scenario {
    pub fake: FakeZoho,
    pub zoho: FakeControl,
    pub proxy: TestProxy,
}

impl Scenario {
    /// Default fake, default proxy config.
    pub async fn start() -> Self {
        Self::with(FakeOptions::default(), |_| {}).await
    }

    /// Default fake, and a proxy with one call at Desk at a time and `response` as
    /// `timeouts.response_secs`.
    pub async fn one_desk_call(response: Duration) -> Self {
        Self::with(FakeOptions::default(), |c| {
            c.desk.max_concurrent = 1;
            c.timeouts.response = response;
        })
        .await
    }

    /// A fake with `options` and a proxy whose config `tweak` may change.
    pub async fn with(options: FakeOptions, tweak: impl FnOnce(&mut Config)) -> Self {
        let fake = FakeZoho::start_with(options.clone())
            .await
            .expect("fake zoho starts");
        let mut config = config_for(&fake, &options);
        tweak(&mut config);
        let proxy = start_proxy(config).await;
        let zoho = fake.control();
        Self { fake, zoho, proxy }
    }

    pub fn url(&self, path: &str) -> String {
        self.proxy.url(path)
    }
}

/// A proxy config pointing at the fake, with its credentials, a long guard and no token
/// file; `listen` is replaced by the bound address.
pub fn config_for(fake: &FakeZoho, options: &FakeOptions) -> Config {
    let toml = format!(
        r#"
        upstream = "{}"
        accounts_url = "{}"
        token_file = ""
        [oauth]
        client_id = "{}"
        client_secret = "{}"
        refresh_token = "{}"
        max_refreshes_per_10min = 100
        "#,
        fake.desk_url(),
        fake.accounts_url(),
        options.client_id,
        options.client_secret,
        options.refresh_token,
    );
    Config::from_toml(&toml).expect("test config is valid")
}

/// `run` on `config`, expected to stop at start with an error (within 10 s, not serve).
pub async fn refused_at_start(config: Config) -> zoho_desk_proxy::RunError {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let run = zoho_desk_proxy::run(config, listener, std::future::pending());
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("refused at start, not served")
        .expect_err("refused")
}

/// Starts `run` on 127.0.0.1:0.
pub async fn start_proxy(mut config: Config) -> TestProxy {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    config.listen = addr;
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(zoho_desk_proxy::run(config, listener, async {
        let _ = rx.await;
    }));
    TestProxy {
        addr,
        shutdown: Some(tx),
        task: Some(task),
    }
}

/// An HTTP/1.1 client that follows no redirect and uses no proxy.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(64)
        .build()
        .expect("client")
}

/// The status of a plain GET (HTTP/1.1).
pub async fn status(url: impl reqwest::IntoUrl) -> u16 {
    fetch(url).await.status().as_u16()
}

/// A plain GET through [`client`].
pub async fn fetch(url: impl reqwest::IntoUrl) -> reqwest::Response {
    client().get(url).send().await.expect("request")
}

/// An h2c (prior knowledge) client.
pub fn h2c_client() -> reqwest::Client {
    reqwest::Client::builder()
        .http2_prior_knowledge()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

/// Sends raw bytes and reads the whole answer (the connection is closed after it).
pub async fn raw_request(addr: SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// The status code of a raw HTTP/1.1 answer.
pub fn raw_status(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The JSON body of a raw HTTP/1.1 answer with Content-Length.
pub fn raw_json(answer: &str) -> serde_json::Value {
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or("");
    serde_json::from_str(body).unwrap_or(serde_json::Value::Null)
}

/// A listener that must never be contacted: counts every connection it accepts.
pub struct EvilListener {
    pub addr: SocketAddr,
    connections: tokio::sync::watch::Receiver<usize>,
    _task: JoinHandle<()>,
}

impl EvilListener {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::watch::channel(0usize);
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tx.send_modify(|n| *n += 1);
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nstole",
                    )
                    .await;
            }
        });
        Self {
            addr,
            connections: rx,
            _task: task,
        }
    }

    pub fn connections(&self) -> usize {
        *self.connections.borrow()
    }
}

/// Asserts a proxy error answer: status and errorCode.
pub async fn assert_proxy_error(
    response: reqwest::Response,
    status: u16,
    code: &str,
) -> serde_json::Value {
    assert_eq!(response.status().as_u16(), status, "status");
    let body: serde_json::Value = response.json().await.expect("json error body");
    assert_eq!(body["errorCode"], code, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    body
}

/// Waits until the fake has seen at least `n` token requests (no sleeping).
pub async fn wait_for_token_requests(zoho: &FakeControl, n: u64) {
    let mut rx = zoho.subscribe_token_requests();
    tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|count| *count >= n))
        .await
        .expect("timed out waiting for token requests")
        .expect("fake stopped");
}

/// Waits until the fake Desk has received at least `n` requests (their heads).
pub async fn wait_for_desk_requests(zoho: &FakeControl, n: u64) {
    let mut rx = zoho.subscribe_desk_requests();
    tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|count| *count >= n))
        .await
        .expect("timed out waiting for Desk requests")
        .expect("fake stopped");
}

/// The text of a `/_proxy/metrics` at `url` (empty when it cannot be read).
pub async fn metrics_text(url: impl reqwest::IntoUrl) -> String {
    fetch(url).await.text().await.unwrap_or_default()
}

/// Waits until `/_proxy/metrics` has `line` (a series and its value); the proxy tells of
/// its state only there, so the test reads it until it says so.
pub async fn wait_for_metric(proxy: &TestProxy, line: &str) {
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let text = metrics_text(proxy.url("/_proxy/metrics")).await;
            if text.lines().any(|l| l == line) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(found.is_ok(), "/_proxy/metrics never showed {line:?}");
}

/// Polls until `f` holds, at most 20 s: for conditions with no event to wait on.
pub async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts `run_with_reload` on 127.0.0.1:0; every config sent on the returned channel is
/// taken as the binary takes one on SIGHUP.
pub async fn start_proxy_with_reload(
    mut config: Config,
) -> (TestProxy, tokio::sync::mpsc::Sender<Config>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    config.listen = addr;
    let (tx, rx) = oneshot::channel::<()>();
    let (reload, reloads) = tokio::sync::mpsc::channel(1);
    let task = tokio::spawn(zoho_desk_proxy::run_with_reload(
        config,
        listener,
        async {
            let _ = rx.await;
        },
        Some(reloads),
    ));
    (
        TestProxy {
            addr,
            shutdown: Some(tx),
            task: Some(task),
        },
        reload,
    )
}
