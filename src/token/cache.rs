//! The current access token, read without locks, and its renewal: single flight,
//! generation check, background refresh before expiry, backoff, and the refresh guard.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use http::HeaderValue;
use tokio::sync::watch;

use super::accounts::{AccountsError, Grant};
use crate::metrics::{Metrics, RefreshResult};
use crate::secret::Secret;

/// Zoho counts refreshes in windows of 10 minutes.
const GUARD_WINDOW: Duration = Duration::from_secs(600);
/// Zoho blocks for the rest of its window when throttling; never come back sooner.
const THROTTLE_BACKOFF: Duration = Duration::from_secs(60);

/// An access token ready for the request path.
#[derive(Debug)]
pub struct Token {
    /// `Zoho-oauthtoken <token>`, precomputed and marked sensitive.
    pub header: HeaderValue,
    /// The bare token, for the token file.
    pub access_token: Secret<String>,
    /// When Zoho stops accepting it.
    pub expires_at: Instant,
    /// The same moment on the wall clock, for the token file.
    pub expires_at_wall: SystemTime,
    /// Its whole lifetime, to cap the refresh margin.
    pub lifetime: Duration,
    /// Increases with every new token; a 401 on generation `g` refreshes only while the
    /// current token is still `g`.
    pub generation: u64,
}

impl Token {
    /// Whether Zoho still accepts it at `now`.
    pub fn is_valid_at(&self, now: Instant) -> bool {
        now < self.expires_at
    }

    /// When the background task renews it: `margin` before expiry, at most half its life.
    pub fn refresh_at(&self, margin: Duration) -> Instant {
        self.expires_at - margin.min(self.lifetime / 2)
    }

    /// Builds a token; `None` when Zoho sent bytes that cannot be a header value.
    pub fn new(access_token: Secret<String>, lifetime: Duration, generation: u64) -> Option<Self> {
        let header = authorization(&access_token)?;
        Some(Self {
            header,
            access_token,
            expires_at: Instant::now() + lifetime,
            expires_at_wall: SystemTime::now() + lifetime,
            lifetime,
            generation,
        })
    }
}

/// `Zoho-oauthtoken <token>` as a header value marked sensitive; `None` when Zoho sent
/// bytes that cannot be a header value.
pub fn authorization(access_token: &Secret<String>) -> Option<HeaderValue> {
    let mut header =
        HeaderValue::from_str(&format!("Zoho-oauthtoken {}", access_token.expose())).ok()?;
    header.set_sensitive(true);
    Some(header)
}

/// Why no token can be had now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Accounts is unreachable, failing or throttling, or the guard is closed; try later.
    #[error("{reason}")]
    Unavailable {
        /// In plain words.
        reason: String,
        /// When a new attempt may succeed.
        retry_after: Duration,
    },
    /// Accounts refused the credentials; only an operator can fix it.
    #[error("{0}")]
    Rejected(String),
}

/// Where new tokens come from: Zoho Accounts in production, anything in unit tests.
pub trait TokenSource: Send + Sync + 'static {
    /// Obtains an access token to replace `stale` (the token held when the refresh began;
    /// `None` at start).
    fn fetch(
        &self,
        stale: Option<Arc<Token>>,
    ) -> Pin<Box<dyn Future<Output = Result<Grant, AccountsError>> + Send + '_>>;
}

impl<T: TokenSource + ?Sized> TokenSource for Box<T> {
    fn fetch(
        &self,
        stale: Option<Arc<Token>>,
    ) -> Pin<Box<dyn Future<Output = Result<Grant, AccountsError>> + Send + '_>> {
        (**self).fetch(stale)
    }
}

/// How tokens are renewed.
#[derive(Debug, Clone, Copy)]
pub struct RefreshPolicy {
    /// Refresh this long before expiry (capped at half the token's lifetime).
    pub margin: Duration,
    /// At most this many Accounts calls that may issue a token in any 10 minutes.
    pub max_per_10min: u32,
    /// First retry delay after a failure; doubles per failure.
    pub backoff_min: Duration,
    /// Largest retry delay.
    pub backoff_max: Duration,
}

impl RefreshPolicy {
    /// The policy of a config: margin and guard from `oauth.*`, backoff 1 s to 60 s.
    pub fn new(margin: Duration, max_per_10min: u32) -> Self {
        Self {
            margin,
            max_per_10min,
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
        }
    }
}

type FlightResult = Option<Result<Arc<Token>, TokenError>>;

/// Refresh bookkeeping; only the refresh path takes this lock, never a request that has a
/// valid token.
#[derive(Default)]
struct RefreshState {
    /// The refresh in flight, if any: every caller waits on the same one.
    flight: Option<watch::Receiver<FlightResult>>,
    consecutive_failures: u32,
    backoff_until: Option<Instant>,
    last_error: Option<TokenError>,
    rejected: Option<String>,
    /// Accounts calls that may have issued a token, in the last 10 minutes.
    issued: VecDeque<Instant>,
    next_generation: u64,
}

/// Holds the current token and renews it.
pub struct TokenCache {
    current: ArcSwapOption<Token>,
    /// Swapped whole when the operator reloads the credentials (SIGHUP).
    source: ArcSwap<Box<dyn TokenSource>>,
    policy: RefreshPolicy,
    state: Mutex<RefreshState>,
    /// The generation of the current token; the background task and the token file
    /// wait on it.
    changed: watch::Sender<u64>,
    /// The newest generation Desk rejected (401 `INVALID_OAUTH`): tokens up to it are
    /// no longer handed out, so requests wait for the refresh instead of failing.
    rejected: AtomicU64,
    metrics: Arc<Metrics>,
}

/// What `/_proxy/ready` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// A valid token is held, valid for this long.
    Ready(Duration),
    /// No valid token; the reason in plain words.
    NotReady(String),
}

impl TokenCache {
    /// A cache with no token yet.
    pub fn new(
        source: impl TokenSource,
        policy: RefreshPolicy,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            current: ArcSwapOption::empty(),
            source: ArcSwap::from_pointee(Box::new(source)),
            policy,
            state: Mutex::new(RefreshState {
                next_generation: 1,
                ..Default::default()
            }),
            changed: watch::channel(0).0,
            rejected: AtomicU64::new(0),
            metrics,
        })
    }

    /// Installs a token obtained elsewhere (the token file), if it is still valid.
    pub fn install(&self, access_token: Secret<String>, remaining: Duration) -> Option<Arc<Token>> {
        let mut state = self.lock();
        let token = Arc::new(Token::new(access_token, remaining, state.next_generation)?);
        state.next_generation += 1;
        self.current.store(Some(token.clone()));
        self.changed.send_replace(token.generation);
        Some(token)
    }

    /// The current token, valid or not; lock-free.
    pub fn current(&self) -> Option<Arc<Token>> {
        self.current.load_full()
    }

    /// Notified with the new generation whenever the token changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// A valid token: the current one when it is valid (lock-free), else a refresh.
    pub async fn usable(self: &Arc<Self>) -> Result<Arc<Token>, TokenError> {
        let current = self.current.load();
        match &*current {
            Some(token)
                if token.is_valid_at(Instant::now())
                    && token.generation > self.rejected.load(Ordering::Acquire) =>
            {
                Ok(token.clone())
            }
            Some(token) => {
                let generation = token.generation;
                drop(current);
                self.refresh_after(generation).await
            }
            None => {
                drop(current);
                self.refresh_after(0).await
            }
        }
    }

    /// Records that Desk rejected the token of `generation`: from now on requests wait
    /// for a newer one (see [`Self::refresh_after`]) rather than use it.
    pub fn mark_rejected(&self, generation: u64) {
        self.rejected.fetch_max(generation, Ordering::AcqRel);
    }

    /// A token newer than `failed_generation`: the current one if someone already
    /// replaced the failed token, else the result of the single refresh in flight,
    /// started here if none is.
    pub async fn refresh_after(
        self: &Arc<Self>,
        failed_generation: u64,
    ) -> Result<Arc<Token>, TokenError> {
        let mut flight = {
            let mut state = self.lock();
            if let Some(token) = self.current.load_full()
                && token.generation > failed_generation
                && token.is_valid_at(Instant::now())
            {
                return Ok(token);
            }
            match &state.flight {
                Some(flight) => flight.clone(),
                None => self.start_flight(&mut state)?,
            }
        };
        let result = flight.wait_for(Option::is_some).await.map(|r| r.clone());
        match result {
            Ok(Some(result)) => result,
            // The flight's task ended without a word: only a panic does that.
            _ => Err(TokenError::Unavailable {
                reason: "the token refresh failed unexpectedly".into(),
                retry_after: self.policy.backoff_min,
            }),
        }
    }

    /// Starts a refresh unless backoff, rejection or the guard forbids it. The refresh runs
    /// in its own task, so that a client hanging up cannot cancel it.
    fn start_flight(
        self: &Arc<Self>,
        state: &mut RefreshState,
    ) -> Result<watch::Receiver<FlightResult>, TokenError> {
        let now = Instant::now();
        if let Some(reason) = &state.rejected {
            return Err(TokenError::Rejected(reason.clone()));
        }
        if let Some(until) = state.backoff_until.filter(|until| *until > now) {
            let reason = match &state.last_error {
                Some(err) => err.to_string(),
                None => "backing off after a failed refresh".into(),
            };
            return Err(TokenError::Unavailable {
                reason,
                retry_after: until - now,
            });
        }
        while state
            .issued
            .front()
            .is_some_and(|t| now.duration_since(*t) >= GUARD_WINDOW)
        {
            state.issued.pop_front();
        }
        if state.issued.len() >= self.policy.max_per_10min as usize {
            let retry_after = state.issued.front().map_or(GUARD_WINDOW, |oldest| {
                GUARD_WINDOW.saturating_sub(now - *oldest)
            });
            self.metrics.record_refresh(RefreshResult::GuardRefused);
            tracing::warn!(
                limit = self.policy.max_per_10min,
                retry_after_secs = retry_after.as_secs(),
                "refresh guard: refresh refused, the limit of refreshes per 10 minutes is reached"
            );
            return Err(TokenError::Unavailable {
                reason: format!(
                    "refresh guard: {} token refreshes in the last 10 minutes (oauth.max_refreshes_per_10min)",
                    state.issued.len()
                ),
                retry_after,
            });
        }

        let (tx, rx) = watch::channel(None);
        state.flight = Some(rx.clone());
        let cache = Arc::clone(self);
        tokio::spawn(async move {
            let started = Instant::now();
            let source = cache.source.load_full();
            let result = source.fetch(cache.current()).await;
            let outcome = cache.finish_flight(result, started);
            tx.send_replace(Some(outcome));
        });
        Ok(rx)
    }

    /// Records a refresh's result; runs in the flight's task.
    fn finish_flight(
        &self,
        result: Result<Grant, AccountsError>,
        started: Instant,
    ) -> Result<Arc<Token>, TokenError> {
        let now = Instant::now();
        let latency_ms = now.duration_since(started).as_millis() as u64;
        let mut state = self.lock();
        state.flight = None;
        // Calls whose outcome Zoho may have counted as an issued token.
        if matches!(&result, Ok(grant) if grant.issued_here)
            || matches!(result, Err(AccountsError::Timeout(_)))
        {
            state.issued.push_back(now);
        }
        let outcome = match result {
            Ok(grant) => {
                match Token::new(grant.access_token, grant.expires_in, state.next_generation) {
                    Some(token) => {
                        state.next_generation += 1;
                        state.consecutive_failures = 0;
                        state.backoff_until = None;
                        state.last_error = None;
                        state.rejected = None;
                        let token = Arc::new(token);
                        self.current.store(Some(token.clone()));
                        self.metrics.record_refresh(RefreshResult::Ok);
                        tracing::info!(
                            result = "ok",
                            latency_ms,
                            expires_in_secs = grant.expires_in.as_secs(),
                            generation = token.generation,
                            "token refreshed"
                        );
                        Ok(token)
                    }
                    None => self.fail(
                        &mut state,
                        now,
                        AccountsError::Failed {
                            status: 200,
                            code: None,
                        },
                        latency_ms,
                    ),
                }
            }
            Err(err) => self.fail(&mut state, now, err, latency_ms),
        };
        drop(state);
        if let Ok(token) = &outcome {
            self.changed.send_replace(token.generation);
        } else {
            // Wake the background task so it re-plans around the backoff.
            self.changed.send_modify(|_| {});
        }
        outcome
    }

    fn fail(
        &self,
        state: &mut RefreshState,
        now: Instant,
        err: AccountsError,
        latency_ms: u64,
    ) -> Result<Arc<Token>, TokenError> {
        let error = match &err {
            AccountsError::Rejected(_) => {
                let reason = format!("{err}; fix: {}", err.advice());
                state.rejected = Some(reason.clone());
                self.metrics.record_refresh(RefreshResult::Rejected);
                tracing::error!(result = "rejected", latency_ms, error = %err, fix = err.advice(), "token refresh rejected");
                TokenError::Rejected(reason)
            }
            _ => {
                state.consecutive_failures = state.consecutive_failures.saturating_add(1);
                let mut delay = backoff(&self.policy, state.consecutive_failures);
                if let AccountsError::GuardRefused { retry_after } = err {
                    delay = retry_after;
                }
                let result = if matches!(err, AccountsError::Throttled(_)) {
                    delay = delay.max(THROTTLE_BACKOFF);
                    self.metrics.record_refresh(RefreshResult::Throttled);
                    "throttled"
                } else {
                    self.metrics.record_refresh(RefreshResult::Error);
                    "error"
                };
                state.backoff_until = Some(now + delay);
                tracing::warn!(
                    result,
                    latency_ms,
                    error = %err,
                    retry_in_ms = delay.as_millis() as u64,
                    "token refresh failed"
                );
                TokenError::Unavailable {
                    reason: err.to_string(),
                    retry_after: delay,
                }
            }
        };
        state.last_error = Some(error.clone());
        Err(error)
    }

    /// What `/_proxy/ready` says.
    pub fn readiness(&self) -> Readiness {
        let state = self.lock();
        if let Some(reason) = &state.rejected {
            return Readiness::NotReady(reason.clone());
        }
        let now = Instant::now();
        match self.current.load_full() {
            Some(token) if token.is_valid_at(now) => Readiness::Ready(token.expires_at - now),
            _ => Readiness::NotReady(match &state.last_error {
                Some(err) => format!("no valid access token: {err}"),
                None => "no valid access token yet: the first refresh is in progress".into(),
            }),
        }
    }

    /// Takes new credentials (after the operator fixed them) and forgets a rejection and
    /// any backoff, so that the next request or the background task tries at once. The
    /// current token stays in use while it is valid.
    pub fn replace_source(&self, source: impl TokenSource) {
        self.source.store(Arc::new(Box::new(source)));
        self.clear_rejection();
    }

    /// Forgets a rejection and any backoff, so that the next request or the background
    /// task tries again.
    pub fn clear_rejection(&self) {
        let mut state = self.lock();
        state.rejected = None;
        state.backoff_until = None;
        state.consecutive_failures = 0;
        drop(state);
        self.changed.send_modify(|_| {});
    }

    /// Keeps a valid token at all times: refreshes `margin` before expiry, retries after
    /// failures once their backoff ends, and stops when `shutdown` resolves.
    pub async fn run_background(self: Arc<Self>, shutdown: impl Future<Output = ()>) {
        let mut changed = self.subscribe();
        tokio::pin!(shutdown);
        loop {
            let wake_at = self.next_wake();
            tokio::select! {
                () = &mut shutdown => return,
                res = changed.changed() => if res.is_err() { return },
                () = sleep_until(wake_at) => {
                    let generation = self.current().map_or(0, |t| t.generation);
                    // Errors are logged and recorded by the flight; the loop re-plans.
                    let _ = self.refresh_after(generation).await;
                }
            }
        }
    }

    /// When the background task should act next; `None` while rejected.
    fn next_wake(&self) -> Option<Instant> {
        let state = self.lock();
        if state.rejected.is_some() {
            return None;
        }
        let now = Instant::now();
        let due = match self.current.load_full() {
            Some(token) => token.refresh_at(self.policy.margin),
            None => now,
        };
        let due = match state.backoff_until {
            Some(until) => due.max(until),
            None => due,
        };
        // The guard can refuse too; never spin on it.
        let due = match state.issued.front() {
            Some(oldest) if state.issued.len() >= self.policy.max_per_10min as usize => {
                due.max(*oldest + GUARD_WINDOW)
            }
            _ => due,
        };
        Some(due)
    }

    fn lock(&self) -> MutexGuard<'_, RefreshState> {
        // The state stays consistent even if a holder panicked: every update is a
        // plain assignment.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Exponential backoff with ±25 % jitter, from `backoff_min` doubling to `backoff_max`.
fn backoff(policy: &RefreshPolicy, failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    let base = policy
        .backoff_min
        .saturating_mul(1 << exp)
        .min(policy.backoff_max);
    let jitter = 0.75 + fastrand::f64() * 0.5;
    base.mul_f64(jitter).min(policy.backoff_max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    struct Counting {
        calls: Arc<AtomicU32>,
        answer: fn(u32) -> Result<Grant, AccountsError>,
        delay: Duration,
    }

    impl TokenSource for Counting {
        fn fetch(
            &self,
            _stale: Option<Arc<Token>>,
        ) -> Pin<Box<dyn Future<Output = Result<Grant, AccountsError>> + Send + '_>> {
            Box::pin(async move {
                let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(self.delay).await;
                (self.answer)(n)
            })
        }
    }

    fn grant(n: u32) -> Result<Grant, AccountsError> {
        Ok(Grant {
            access_token: Secret::new(format!("1000.token.{n}")),
            expires_in: Duration::from_secs(3600),
            refresh_token: None,
            api_domain: None,
            issued_here: true,
        })
    }

    fn cache(
        answer: fn(u32) -> Result<Grant, AccountsError>,
        max: u32,
    ) -> (Arc<TokenCache>, Arc<AtomicU32>) {
        let calls = Arc::new(AtomicU32::new(0));
        let source = Counting {
            calls: calls.clone(),
            answer,
            delay: Duration::from_millis(20),
        };
        (
            TokenCache::new(
                source,
                RefreshPolicy::new(Duration::from_secs(300), max),
                Arc::default(),
            ),
            calls,
        )
    }

    #[tokio::test]
    async fn concurrent_refreshes_of_one_generation_make_one_call() {
        let (cache, calls) = cache(grant, 10);
        let first = cache.usable().await.unwrap();
        let tasks: Vec<_> = (0..500)
            .map(|_| {
                let cache = cache.clone();
                let generation = first.generation;
                tokio::spawn(async move { cache.refresh_after(generation).await })
            })
            .collect();
        for task in tasks {
            let token = task.await.unwrap().unwrap();
            assert!(token.generation > first.generation);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_token_desk_rejected_is_not_handed_out_again() {
        let (cache, calls) = cache(grant, 10);
        let first = cache.usable().await.unwrap();
        assert_eq!(cache.usable().await.unwrap().generation, first.generation);
        cache.mark_rejected(first.generation);
        let next = cache.usable().await.unwrap();
        assert!(next.generation > first.generation);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "one refresh for the rejection"
        );
    }

    #[tokio::test]
    async fn throttling_backs_off_at_least_a_minute() {
        let (cache, calls) = cache(
            |_| Err(AccountsError::Throttled("Access Denied".into())),
            10,
        );
        let err = cache.usable().await.unwrap_err();
        assert!(
            matches!(err, TokenError::Unavailable { retry_after, .. } if retry_after >= THROTTLE_BACKOFF)
        );
        let err = cache.usable().await.unwrap_err();
        assert!(
            matches!(err, TokenError::Unavailable { retry_after, .. } if retry_after > Duration::from_secs(55))
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn rejection_is_not_retried() {
        let (cache, calls) = cache(|_| Err(AccountsError::Rejected("invalid_code".into())), 10);
        assert!(matches!(cache.usable().await, Err(TokenError::Rejected(_))));
        assert!(matches!(cache.usable().await, Err(TokenError::Rejected(_))));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(matches!(cache.readiness(), Readiness::NotReady(r) if r.contains("exchange")));
    }

    #[tokio::test]
    async fn the_guard_caps_refreshes() {
        let (cache, calls) = cache(grant, 3);
        for _ in 0..3 {
            let g = cache.current().map_or(0, |t| t.generation);
            cache.refresh_after(g).await.unwrap();
        }
        let g = cache.current().unwrap().generation;
        let err = cache.refresh_after(g).await.unwrap_err();
        assert!(
            matches!(err, TokenError::Unavailable { retry_after, .. } if retry_after > Duration::from_secs(590))
        );
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let policy = RefreshPolicy::new(Duration::from_secs(300), 5);
        for (failures, lo, hi) in [
            (1, 0.75, 1.25),
            (2, 1.5, 2.5),
            (3, 3.0, 5.0),
            (10, 45.0, 60.0),
        ] {
            let d = backoff(&policy, failures).as_secs_f64();
            assert!(d >= lo && d <= hi, "{failures}: {d}");
        }
    }

    #[test]
    fn margin_is_capped_at_half_the_lifetime() {
        let token = Token::new(Secret::new("t".into()), Duration::from_secs(60), 1).unwrap();
        assert_eq!(
            token.refresh_at(Duration::from_secs(300)),
            token.expires_at - Duration::from_secs(30)
        );
        assert_eq!(
            token.refresh_at(Duration::from_secs(10)),
            token.expires_at - Duration::from_secs(10)
        );
    }
}
