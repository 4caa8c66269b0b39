//! An in-process fake of Zoho Accounts and a small slice of the Zoho Desk API.
//!
//! The fake is deliberately independent of the rest of the crate: it writes
//! Zoho's JSON by hand (quirks included) so that the proxy is tested against
//! "Zoho as it is on the wire", not against the proxy's own types.
//!
//! Two listeners are started: one for Accounts (`/oauth/v2/token`) and one for
//! Desk (`/api/v1/...`). Both speak HTTP/1.1 (keep-alive) and h2c with prior
//! knowledge. Use [`FakeZoho::control`] to inspect and steer the fake.

mod accounts;
mod body;
mod desk;
mod store;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// The id of the first seeded ticket (the demo shows it in its examples).
pub const FIRST_TICKET_ID: &str = "189200000000100003";

/// Maximum number of live access tokens Zoho keeps per refresh token.
const MAX_LIVE_TOKENS: usize = 15;
/// Maximum number of tokens per refresh token within [`RATE_WINDOW`].
const RATE_LIMIT: usize = 10;
/// Window of Zoho's token rate limit.
const RATE_WINDOW: Duration = Duration::from_secs(600);
/// The fake portal's API credits per day (one per request here).
const DAILY_CREDITS: u64 = 5000;

/// Response body type used by both fake servers.
type RespBody = BoxBody<Bytes, io::Error>;

/// Options for [`FakeZoho::start_with`].
#[derive(Clone, Debug)]
pub struct FakeOptions {
    /// OAuth client id the fake accepts.
    pub client_id: String,
    /// OAuth client secret the fake accepts.
    pub client_secret: String,
    /// The one refresh token the fake accepts (and hands out on code exchange).
    pub refresh_token: String,
    /// Single-use grant codes accepted by `grant_type=authorization_code`.
    pub grant_codes: Vec<String>,
    /// Lifetime of issued access tokens; sent as `expires_in` (whole seconds, min 1).
    pub token_lifetime: Duration,
    /// When true, token responses carry `"expires_in_sec": S` and `"expires_in": S*1000`.
    pub expires_in_ms_quirk: bool,
    /// When true, the 11th token per refresh token within 10 minutes is throttled.
    pub enforce_rate_limit: bool,
    /// Address of the Accounts listener (port 0 picks a free port).
    pub accounts_listen: SocketAddr,
    /// Address of the Desk listener (port 0 picks a free port).
    pub desk_listen: SocketAddr,
}

impl Default for FakeOptions {
    fn default() -> Self {
        FakeOptions {
            client_id: "1000.FAKECLIENTID".into(),
            client_secret: "fake-client-secret-0123456789".into(),
            refresh_token: "1000.fakerefresh.0123456789abcdef".into(),
            grant_codes: vec!["1000.fakegrant.0001".into()],
            token_lifetime: Duration::from_secs(3600),
            expires_in_ms_quirk: false,
            enforce_rate_limit: false,
            accounts_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            desk_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        }
    }
}

/// How the Accounts token endpoint answers (after the configured delay).
#[derive(Clone, Debug)]
pub enum AccountsBehavior {
    /// Behave like Zoho normally does.
    Normal,
    /// Zoho's throttle answer (`"error":"Access Denied"`) with the given HTTP status.
    Throttle {
        /// HTTP status to use (Zoho uses 200 or 400).
        status: u16,
    },
    /// Answer exactly this status and body, with `content-type: application/json`.
    Error {
        /// HTTP status.
        status: u16,
        /// Raw response body.
        body: String,
    },
    /// 503 with an HTML body.
    Unavailable,
    /// Drop the connection without answering (on h2 the stream is reset instead).
    CloseConnection,
}

/// One request as received by the fake Desk server.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// Request method, e.g. `"GET"`.
    pub method: String,
    /// Path and query exactly as received on the wire, without decoding.
    pub path_and_query: String,
    /// HTTP version of the request.
    pub version: http::Version,
    /// Request headers as received.
    pub headers: http::HeaderMap,
    /// Number of body bytes read (counted for streamed endpoints).
    pub body_len: u64,
    /// Whether the whole body arrived (false while it is read, and for one that broke
    /// off).
    pub body_complete: bool,
    /// When its head arrived.
    pub received_at: Instant,
    /// Whether its token was accepted (decided after the Desk delay, when Desk answers);
    /// `None` until then, and for forced 401s.
    pub token_accepted: Option<bool>,
}

/// One access token ever issued by the fake.
struct IssuedToken {
    token: String,
    issued_at: Instant,
    lifetime: Duration,
    revoked: bool,
    evicted: bool,
}

impl IssuedToken {
    fn is_live(&self, now: Instant) -> bool {
        !self.revoked && !self.evicted && now.duration_since(self.issued_at) < self.lifetime
    }
}

/// Mutable state shared by both servers and [`FakeControl`].
struct State {
    token_requests: u64,
    exchange_requests: u64,
    unused_grant_codes: Vec<String>,
    tokens: Vec<IssuedToken>,
    token_index: HashMap<String, usize>,
    refresh_issue_times: VecDeque<Instant>,
    enforce_rate_limit: bool,
    last_token_form: Option<Vec<(String, String)>>,
    token_lifetime: Duration,
    expires_in_ms_quirk: bool,
    accounts_behavior: AccountsBehavior,
    accounts_delay: Duration,
    forced_401_remaining: u32,
    forced_401_code: Option<String>,
    /// Forced 401s send half their body, then nothing more.
    forced_401_stalls: bool,
    /// `/api/v1/echo` echoes `Authorization` whole, as a careless API would.
    echo_credentials: bool,
    desk_delay: Duration,
    /// Requests inside the Desk delay now, and the most seen at once.
    /// Desk requests between their arrival and their answer's head.
    desk_in_flight: usize,
    desk_max_in_flight: usize,
    /// Desk's concurrency limit: requests beyond it are answered 429 at once.
    desk_concurrency_cap: Option<usize>,
    /// Requests answered 429 for the cap, or forced.
    desk_429s: u64,
    /// The next requests answered 429, with this `Retry-After` (seconds).
    forced_429_remaining: u32,
    /// Requests admitted before the forced 429s begin.
    forced_429_skip: u32,
    forced_429_retry_after: Option<u64>,
    /// API credits left today, sent in `X-Rate-Limit-Remaining-v3`.
    credits_remaining: u64,
    desk_requests: Vec<RecordedRequest>,
    store: store::Store,
}

impl State {
    /// Records a refresh-token issuance for the rate limit; false when throttled.
    fn admit_refresh(&mut self, now: Instant) -> bool {
        while let Some(first) = self.refresh_issue_times.front() {
            if now.duration_since(*first) >= RATE_WINDOW {
                self.refresh_issue_times.pop_front();
            } else {
                break;
            }
        }
        if self.enforce_rate_limit && self.refresh_issue_times.len() >= RATE_LIMIT {
            return false;
        }
        self.refresh_issue_times.push_back(now);
        true
    }

    /// Issues a new access token, evicting the oldest live one beyond 15.
    fn issue_token(&mut self, now: Instant) -> String {
        let live = self.live_token_count(now);
        if live >= MAX_LIVE_TOKENS {
            let excess = live + 1 - MAX_LIVE_TOKENS;
            let mut evicted = 0;
            for t in self.tokens.iter_mut() {
                if evicted == excess {
                    break;
                }
                if t.is_live(now) {
                    t.evicted = true;
                    evicted += 1;
                }
            }
        }
        let token = format!("1000.{}.{}", random_hex32(), random_hex32());
        self.token_index.insert(token.clone(), self.tokens.len());
        self.tokens.push(IssuedToken {
            token: token.clone(),
            issued_at: now,
            lifetime: self.token_lifetime,
            revoked: false,
            evicted: false,
        });
        token
    }

    /// Whether `token` was issued by the fake and is still live.
    fn token_is_valid(&self, token: &str, now: Instant) -> bool {
        self.token_index
            .get(token)
            .and_then(|i| self.tokens.get(*i))
            .is_some_and(|t| t.is_live(now))
    }

    fn live_token_count(&self, now: Instant) -> usize {
        self.tokens.iter().filter(|t| t.is_live(now)).count()
    }
}

fn random_hex32() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

/// State shared by the servers and the control handle.
struct Shared {
    client_id: String,
    client_secret: String,
    refresh_token: String,
    state: Mutex<State>,
    token_requests_tx: watch::Sender<u64>,
    /// The number of Desk requests received, for waiting on it.
    desk_requests_tx: watch::Sender<u64>,
}

impl Shared {
    /// Locks the state, ignoring poisoning (the state stays usable).
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Handle to steer and inspect a running [`FakeZoho`]; cheap to clone.
#[derive(Clone)]
pub struct FakeControl {
    shared: Arc<Shared>,
}

impl fmt::Debug for FakeControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeControl").finish_non_exhaustive()
    }
}

impl FakeControl {
    /// Number of token-endpoint POSTs with `grant_type=refresh_token`, whatever the outcome.
    pub fn token_requests(&self) -> u64 {
        self.shared.lock().token_requests
    }

    /// Number of token-endpoint POSTs with `grant_type=authorization_code`.
    pub fn exchange_requests(&self) -> u64 {
        self.shared.lock().exchange_requests
    }

    /// Watches [`FakeControl::token_requests`]; updated on every refresh-token call.
    pub fn subscribe_token_requests(&self) -> watch::Receiver<u64> {
        self.shared.token_requests_tx.subscribe()
    }

    /// Watches the number of Desk requests received (counted when their head arrives).
    pub fn subscribe_desk_requests(&self) -> watch::Receiver<u64> {
        self.shared.desk_requests_tx.subscribe()
    }

    /// Every access token ever issued, oldest first.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.shared
            .lock()
            .tokens
            .iter()
            .map(|t| t.token.clone())
            .collect()
    }

    /// Form fields (body, then query string) of the last token-endpoint call.
    pub fn last_token_form(&self) -> Option<Vec<(String, String)>> {
        self.shared.lock().last_token_form.clone()
    }

    /// Sets the lifetime of tokens issued from now on.
    pub fn set_token_lifetime(&self, d: Duration) {
        self.shared.lock().token_lifetime = d;
    }

    /// Turns the `expires_in` in milliseconds quirk on or off.
    pub fn set_expires_in_ms_quirk(&self, on: bool) {
        self.shared.lock().expires_in_ms_quirk = on;
    }

    /// Sets how the token endpoint answers.
    pub fn set_accounts_behavior(&self, b: AccountsBehavior) {
        self.shared.lock().accounts_behavior = b;
    }

    /// Sleeps this long before the token endpoint answers.
    pub fn set_accounts_delay(&self, d: Duration) {
        self.shared.lock().accounts_delay = d;
    }

    /// Invalidates every token issued so far (Desk answers 401 `INVALID_OAUTH`).
    pub fn revoke_all_tokens(&self) {
        for t in self.shared.lock().tokens.iter_mut() {
            t.revoked = true;
        }
    }

    /// The next `n` Desk requests answer 401 with `{"errorCode":code,...}`, or an
    /// empty body when `error_code` is `None`. Replaces any pending failures.
    pub fn fail_next_desk_requests(&self, n: u32, error_code: Option<&str>) {
        let mut st = self.shared.lock();
        st.forced_401_remaining = n;
        st.forced_401_code = error_code.map(str::to_owned);
    }

    /// Forced 401s (see [`FakeControl::fail_next_desk_requests`]) send their head and half
    /// their body, then stall.
    pub fn stall_forced_401_bodies(&self, on: bool) {
        self.shared.lock().forced_401_stalls = on;
    }

    /// `/api/v1/echo` echoes the `Authorization` it got whole (the token), as a careless
    /// API would; by default only its last 4 characters.
    pub fn echo_credentials(&self, on: bool) {
        self.shared.lock().echo_credentials = on;
    }

    /// Sleeps this long (after the auth check) before Desk sends response headers.
    pub fn set_desk_delay(&self, d: Duration) {
        self.shared.lock().desk_delay = d;
    }

    /// The most Desk requests that were in flight at the same time (from their arrival
    /// to their answer's head; requests refused for the concurrency cap not counted).
    pub fn desk_max_concurrent(&self) -> usize {
        self.shared.lock().desk_max_in_flight
    }

    /// Desk requests in flight now.
    pub fn desk_in_flight(&self) -> usize {
        self.shared.lock().desk_in_flight
    }

    /// Caps the Desk requests in flight at once, as a Desk edition does: a request
    /// beyond it is answered 429 at once. `None` lifts the cap.
    pub fn set_desk_concurrency_cap(&self, cap: Option<usize>) {
        self.shared.lock().desk_concurrency_cap = cap;
    }

    /// The next `n` Desk requests are answered 429, with `Retry-After: secs` when given.
    pub fn throttle_next_desk_requests(&self, n: u32, retry_after_secs: Option<u64>) {
        self.throttle_desk_requests_after(0, n, retry_after_secs);
    }

    /// As [`FakeControl::throttle_next_desk_requests`], once `skip` more requests were
    /// admitted.
    pub fn throttle_desk_requests_after(&self, skip: u32, n: u32, retry_after_secs: Option<u64>) {
        let mut st = self.shared.lock();
        st.forced_429_skip = skip;
        st.forced_429_remaining = n;
        st.forced_429_retry_after = retry_after_secs;
    }

    /// Desk answers 429 so far (for the cap, or forced).
    pub fn desk_429s(&self) -> u64 {
        self.shared.lock().desk_429s
    }

    /// Every request Desk received, in order, including rejected ones.
    pub fn desk_requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().desk_requests.clone()
    }

    /// Number of requests Desk received, including rejected ones.
    pub fn desk_request_count(&self) -> u64 {
        self.shared.lock().desk_requests.len() as u64
    }

    /// Number of tokens currently valid (not expired, revoked or evicted).
    pub fn live_token_count(&self) -> usize {
        self.shared.lock().live_token_count(Instant::now())
    }
}

/// A running fake Zoho (Accounts + Desk). Dropping it or calling
/// [`FakeZoho::shutdown`] stops both servers.
pub struct FakeZoho {
    accounts_addr: SocketAddr,
    desk_addr: SocketAddr,
    control: FakeControl,
    stop_tx: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl fmt::Debug for FakeZoho {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeZoho")
            .field("accounts_addr", &self.accounts_addr)
            .field("desk_addr", &self.desk_addr)
            .finish_non_exhaustive()
    }
}

impl FakeZoho {
    /// Starts the fake with [`FakeOptions::default`].
    pub async fn start() -> io::Result<FakeZoho> {
        Self::start_with(FakeOptions::default()).await
    }

    /// Starts the fake with the given options. Must run inside a Tokio runtime.
    pub async fn start_with(options: FakeOptions) -> io::Result<FakeZoho> {
        let accounts_listener = TcpListener::bind(options.accounts_listen).await?;
        let desk_listener = TcpListener::bind(options.desk_listen).await?;
        let accounts_addr = accounts_listener.local_addr()?;
        let desk_addr = desk_listener.local_addr()?;
        let state = State {
            token_requests: 0,
            exchange_requests: 0,
            unused_grant_codes: options.grant_codes.clone(),
            tokens: Vec::new(),
            token_index: HashMap::new(),
            refresh_issue_times: VecDeque::new(),
            enforce_rate_limit: options.enforce_rate_limit,
            last_token_form: None,
            token_lifetime: options.token_lifetime,
            expires_in_ms_quirk: options.expires_in_ms_quirk,
            accounts_behavior: AccountsBehavior::Normal,
            accounts_delay: Duration::ZERO,
            forced_401_remaining: 0,
            forced_401_code: None,
            forced_401_stalls: false,
            echo_credentials: false,
            desk_delay: Duration::ZERO,
            desk_in_flight: 0,
            desk_max_in_flight: 0,
            desk_concurrency_cap: None,
            desk_429s: 0,
            forced_429_remaining: 0,
            forced_429_skip: 0,
            forced_429_retry_after: None,
            credits_remaining: DAILY_CREDITS,
            desk_requests: Vec::new(),
            store: store::Store::seeded(),
        };
        let shared = Arc::new(Shared {
            client_id: options.client_id,
            client_secret: options.client_secret,
            refresh_token: options.refresh_token,
            state: Mutex::new(state),
            token_requests_tx: watch::Sender::new(0),
            desk_requests_tx: watch::Sender::new(0),
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let tasks = vec![
            tokio::spawn(serve(
                "accounts",
                accounts_listener,
                shared.clone(),
                accounts::handle,
                stop_rx.clone(),
            )),
            tokio::spawn(serve(
                "desk",
                desk_listener,
                shared.clone(),
                desk::handle,
                stop_rx,
            )),
        ];
        tracing::debug!(%accounts_addr, %desk_addr, "fake zoho started");
        Ok(FakeZoho {
            accounts_addr,
            desk_addr,
            control: FakeControl { shared },
            stop_tx,
            tasks,
        })
    }

    /// Base URL of the Accounts server, e.g. `http://127.0.0.1:PORT` (no trailing slash).
    pub fn accounts_url(&self) -> String {
        format!("http://{}", self.accounts_addr)
    }

    /// Base URL of the Desk server, e.g. `http://127.0.0.1:PORT` (no trailing slash).
    pub fn desk_url(&self) -> String {
        format!("http://{}", self.desk_addr)
    }

    /// A control handle (shares state with the running fake).
    pub fn control(&self) -> FakeControl {
        self.control.clone()
    }

    /// Stops both servers, closes their listeners and ends all connections.
    pub async fn shutdown(mut self) {
        self.stop_tx.send_replace(true);
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
        tracing::debug!("fake zoho stopped");
    }
}

impl Drop for FakeZoho {
    fn drop(&mut self) {
        self.stop_tx.send_replace(true);
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Accept loop: one task per connection, all ended when `stop` fires.
async fn serve<F, Fut>(
    name: &'static str,
    listener: TcpListener,
    shared: Arc<Shared>,
    handler: F,
    mut stop: watch::Receiver<bool>,
) where
    F: Fn(Arc<Shared>, Request<Incoming>) -> Fut + Copy + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<RespBody>, io::Error>> + Send + 'static,
{
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            () = stopped(&mut stop) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let (shared, conn_stop) = (shared.clone(), stop.clone());
                    conns.spawn(async move {
                        tracing::debug!(server = name, %peer, "fake zoho connection");
                        let svc = service_fn(move |req| {
                            // In-flight handlers (h2 streams run detached) end on shutdown too.
                            let (shared, mut stop) = (shared.clone(), conn_stop.clone());
                            async move {
                                tokio::select! {
                                    answer = handler(shared, req) => answer,
                                    () = stopped(&mut stop) => Err(io::Error::other("fake zoho stopped")),
                                }
                            }
                        });
                        let builder = auto::Builder::new(TokioExecutor::new());
                        let conn = builder.serve_connection(TokioIo::new(stream), svc);
                        if let Err(e) = conn.await {
                            tracing::debug!(server = name, %peer, error = %e, "fake zoho connection ended");
                        }
                    });
                }
                Err(e) => {
                    tracing::debug!(server = name, error = %e, "fake zoho accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.shutdown().await;
}

/// Resolves once the stop flag is set or its sender is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}
