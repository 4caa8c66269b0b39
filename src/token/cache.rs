//! The current access token, read without locks, and its renewal.
//!
//! A token's state is checked when a request is about to be sent, never when it was
//! queued: a token is *usable* while it is valid and Desk has not rejected its generation
//! (a 401 `INVALID_OAUTH` marks it, [`TokenCache::mark_rejected`]); a newer token
//! supersedes it. Renewal is one refresh at a time (single flight), tagged with the
//! credentials it used: a refresh started before a reload (SIGHUP) never decides the
//! state of the new credentials, and one whose credentials were replaced while it failed
//! tries again with the new ones. Every answer of a source is accounted for once: the
//! refresh guard counts each call that may have issued a token, the metrics count each
//! refresh by its result. See docs/ARCHITECTURE.md ("The token's life").

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::sync::watch;
// tokio's clock, so that tests can pause and advance it.
use tokio::time::Instant;

use super::source::{AccountsError, Fetched, Grant, Refresh, Token, TokenSource};
use crate::metrics::{Metrics, RefreshResult};
use crate::secret::Secret;

/// Zoho counts refreshes in windows of 10 minutes.
const GUARD_WINDOW: Duration = Duration::from_secs(600);
/// Zoho blocks for the rest of its window when throttling; never come back sooner.
const THROTTLE_BACKOFF: Duration = Duration::from_secs(60);
/// Access tokens Desk rejected, remembered so that none is installed again (the shared
/// store may still hold one).
const REMEMBERED_REJECTIONS: usize = 4;

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

/// The credentials in use: a source and the generation of the reload that brought it.
struct Credentials {
    generation: u64,
    source: Box<dyn TokenSource>,
}

type FlightResult = Option<Result<Arc<Token>, TokenError>>;

/// The refresh in flight: every caller that needs a new token waits on it.
struct Flight {
    id: u64,
    result: watch::Receiver<FlightResult>,
}

/// Refresh bookkeeping; only the refresh path takes this lock, never a request that has a
/// usable token.
#[derive(Default)]
struct RefreshState {
    flight: Option<Flight>,
    flights: u64,
    consecutive_failures: u32,
    backoff: Option<Backoff>,
    last_error: Option<TokenError>,
    /// Accounts refused the current credentials (cleared by a reload).
    rejected: Option<String>,
    /// Accounts calls that may have issued a token, in the last 10 minutes.
    issued: VecDeque<Instant>,
    next_generation: u64,
    /// The last access tokens Desk rejected.
    rejected_tokens: VecDeque<Secret<String>>,
}

/// No call to Accounts until `until`, and why.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    until: Instant,
    /// `Throttled`: Accounts asked for the wait, which a reload does not end.
    cause: RefreshResult,
}

impl RefreshState {
    /// Backs off until `until` for `cause`, refusing with `error` meanwhile.
    fn back_off(&mut self, until: Instant, cause: RefreshResult, error: &TokenError) {
        self.backoff = Some(Backoff { until, cause });
        self.last_error = Some(error.clone());
    }

    /// The last failure in words, a refusal of the guard with its wait as it is `now`.
    fn failure_now(&self, now: Instant) -> Option<String> {
        let err = self.last_error.as_ref()?;
        Some(match self.backoff {
            Some(Backoff {
                until,
                cause: RefreshResult::GuardRefused,
            }) if until > now => guard_wait(err, until - now),
            _ => err.to_string(),
        })
    }

    /// The refusal of a call while the backoff runs, as it stands `now`.
    fn refusal(&self, now: Instant) -> Option<TokenError> {
        let until = self.backoff.map(|b| b.until).filter(|until| *until > now)?;
        let reason = self
            .failure_now(now)
            .unwrap_or_else(|| "backing off after a failed refresh".into());
        Some(TokenError::Unavailable {
            reason,
            retry_after: until - now,
        })
    }

    /// One more failure in a row: the backoff it earns.
    fn next_delay(&mut self, policy: &RefreshPolicy) -> Duration {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        backoff(policy, self.consecutive_failures)
    }
}

/// A refusal of the refresh guard, and when the next refresh is allowed (in the seconds of
/// the answer's `Retry-After`).
fn guard_wait(refusal: &TokenError, wait: Duration) -> String {
    format!(
        "{refusal}; the next is allowed in {} s",
        crate::error::retry_after_secs(wait)
    )
}

/// Holds the current token and renews it.
pub struct TokenCache {
    current: ArcSwapOption<Token>,
    /// Replaced whole when the operator reloads the credentials (SIGHUP).
    credentials: ArcSwap<Credentials>,
    policy: RefreshPolicy,
    state: Mutex<RefreshState>,
    /// The generation of the current token; the background task, the token file and
    /// the shared store wait on it.
    changed: watch::Sender<u64>,
    /// The newest generation Desk rejected: tokens up to it are never handed out again.
    rejected: AtomicU64,
    metrics: Arc<Metrics>,
}

/// What `/_proxy/ready` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// A usable token is held, valid for this long.
    Ready(Duration),
    /// No usable token; the reason in plain words.
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
            credentials: ArcSwap::from_pointee(Credentials {
                generation: 0,
                source: Box::new(source),
            }),
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

    /// Installs a token obtained elsewhere (the token file, the fleet's store) when it is
    /// still valid, outlives the current one, and is not one Desk rejected. A token read
    /// before a newer one arrived never replaces it.
    pub fn install(&self, access_token: Secret<String>, remaining: Duration) -> Option<Arc<Token>> {
        let mut state = self.lock();
        if state
            .rejected_tokens
            .iter()
            .any(|t| t.expose() == access_token.expose())
        {
            return None;
        }
        let token = Token::new(access_token, remaining, state.next_generation)?;
        if let Some(current) = self.current.load_full()
            && self.is_usable(&current, Instant::now())
            && (current.access_token.expose() == token.access_token.expose()
                || current.expires_at >= token.expires_at)
        {
            return None;
        }
        state.next_generation += 1;
        let token = Arc::new(token);
        self.current.store(Some(token.clone()));
        drop(state);
        self.changed.send_replace(token.generation);
        Some(token)
    }

    /// The current token, usable or not; lock-free.
    pub fn current(&self) -> Option<Arc<Token>> {
        self.current.load_full()
    }

    /// Notified with the new generation whenever the token changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Whether `token` may be sent at `now`: valid, and not rejected by Desk.
    pub fn is_usable(&self, token: &Token, now: Instant) -> bool {
        token.is_valid_at(now) && token.generation > self.rejected.load(Ordering::Acquire)
    }

    /// The current token if it is usable at `now` (lock-free; no refresh is started).
    pub fn usable_at(&self, now: Instant) -> Option<Arc<Token>> {
        self.current
            .load()
            .as_ref()
            .filter(|token| self.is_usable(token, now))
            .cloned()
    }

    /// A usable token: the current one (lock-free), else the result of a refresh.
    pub async fn usable(self: &Arc<Self>) -> Result<Arc<Token>, TokenError> {
        let current = self.current.load();
        match &*current {
            Some(token) if self.is_usable(token, Instant::now()) => Ok(token.clone()),
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

    /// Records that Desk rejected `token` (401 `INVALID_OAUTH`): it is never handed out
    /// again, and requests wait for a newer one.
    /// The background task starts the refresh at once.
    pub fn mark_rejected(&self, token: &Token) {
        let before = self.rejected.fetch_max(token.generation, Ordering::AcqRel);
        if before < token.generation {
            let mut state = self.lock();
            if state.rejected_tokens.len() == REMEMBERED_REJECTIONS {
                state.rejected_tokens.pop_front();
            }
            state.rejected_tokens.push_back(token.access_token.clone());
            drop(state);
            self.changed.send_modify(|_| {});
        }
    }

    /// A usable token newer than `failed_generation`: the current one if it is, else the
    /// result of the single refresh in flight, started here if none is.
    pub async fn refresh_after(
        self: &Arc<Self>,
        failed_generation: u64,
    ) -> Result<Arc<Token>, TokenError> {
        let mut flight = {
            let mut state = self.lock();
            if let Some(token) = self.newer_than(failed_generation) {
                return Ok(token);
            }
            match &state.flight {
                Some(flight) => flight.result.clone(),
                None => self.start_flight(&mut state)?,
            }
        };
        let result = flight.wait_for(Option::is_some).await.map(|r| r.clone());
        match result {
            Ok(Some(result)) => result,
            // The flight always sends a result, even when its task panics.
            _ => Err(TokenError::Unavailable {
                reason: "the token refresh failed unexpectedly".into(),
                retry_after: self.policy.backoff_min,
            }),
        }
    }

    /// The current token when it is usable and newer than `generation`.
    fn newer_than(&self, generation: u64) -> Option<Arc<Token>> {
        self.current
            .load_full()
            .filter(|t| t.generation > generation && self.is_usable(t, Instant::now()))
    }

    /// Whether a call to a source may be made now: not rejected, not backing off, and
    /// under the refresh guard.
    fn admit(&self, state: &mut RefreshState) -> Result<(), TokenError> {
        let now = Instant::now();
        if let Some(reason) = &state.rejected {
            return Err(TokenError::Rejected(reason.clone()));
        }
        if let Some(refusal) = state.refusal(now) {
            return Err(refusal);
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
                retry_after_secs = crate::error::retry_after_secs(retry_after),
                "refresh guard: refresh refused, the limit of refreshes per 10 minutes is reached"
            );
            let refreshes = state.issued.len();
            let error = TokenError::Unavailable {
                reason: format!(
                    "refresh guard: {refreshes} token refresh{} in the last 10 minutes (oauth.max_refreshes_per_10min)",
                    if refreshes == 1 { "" } else { "es" },
                ),
                retry_after,
            };
            // Until the guard opens, every request is refused by the backoff above: one
            // refusal counted and logged, and `/_proxy/ready` says why.
            state.back_off(now + retry_after, RefreshResult::GuardRefused, &error);
            return Err(state.refusal(now).unwrap_or(error));
        }
        Ok(())
    }

    /// Starts a refresh unless rejection, backoff or the guard forbids it. The refresh
    /// runs in its own task, so that a client hanging up cannot cancel it.
    fn start_flight(
        self: &Arc<Self>,
        state: &mut RefreshState,
    ) -> Result<watch::Receiver<FlightResult>, TokenError> {
        self.admit(state)?;
        let (tx, rx) = watch::channel(None);
        state.flights += 1;
        let id = state.flights;
        state.flight = Some(Flight {
            id,
            result: rx.clone(),
        });
        let stale = self.current.load_full();
        let landing = Landing {
            cache: Arc::clone(self),
            id,
            result: tx,
        };
        tokio::spawn(async move {
            let outcome = landing.cache.fly(stale).await;
            landing.land(outcome);
        });
        Ok(rx)
    }

    /// The refresh itself: asks the source for a token to replace `stale`, again with
    /// new credentials when they were reloaded while it failed.
    async fn fly(&self, stale: Option<Arc<Token>>) -> Result<Arc<Token>, TokenError> {
        let stale_generation = stale.as_ref().map_or(0, |t| t.generation);
        let arrived = || self.newer_than(stale_generation).is_some();
        let mut first = true;
        loop {
            if !first {
                self.admit(&mut self.lock())?;
            }
            first = false;
            let credentials = self.credentials.load_full();
            if let Some(token) = self.newer_than(stale_generation) {
                return Ok(token);
            }
            let started = Instant::now();
            let refresh = Refresh::new(stale.clone(), &arrived);
            let result = credentials.source.fetch(&refresh).await;
            let reloaded = self.credentials.load().generation != credentials.generation;
            // Throttling is Zoho's answer to the client, whatever its credentials: it is
            // recorded, and its wait kept.
            if let Err(err) = &result
                && reloaded
                && !matches!(err, AccountsError::Throttled(_))
            {
                // Counted, but it decides nothing about the new credentials.
                self.count_call(&result);
                tracing::info!(error = %err, "a refresh with the replaced credentials failed; trying the reloaded ones");
                continue;
            }
            return self.record(result, started);
        }
    }

    /// Counts a call in the refresh guard when it may have issued a token.
    fn count_call(&self, result: &Result<Fetched, AccountsError>) {
        let counted = match result {
            Ok(Fetched::Issued(_)) => true,
            Ok(_) => false,
            Err(err) => err.may_have_issued(),
        };
        if counted {
            self.lock().issued.push_back(Instant::now());
        }
    }

    /// Records a source's answer: the guard, the metrics, the log, and the new token or
    /// the failure.
    fn record(
        &self,
        result: Result<Fetched, AccountsError>,
        started: Instant,
    ) -> Result<Arc<Token>, TokenError> {
        self.count_call(&result);
        let latency_ms = started.elapsed().as_millis() as u64;
        let outcome = match result {
            Ok(Fetched::Issued(grant)) => self.take(grant, latency_ms, Taken::Issued),
            Ok(Fetched::Shared(grant)) => self.take(grant, latency_ms, Taken::Shared),
            Ok(Fetched::Arrived) => self
                .current
                .load_full()
                .filter(|t| self.is_usable(t, Instant::now()))
                .ok_or_else(|| TokenError::Unavailable {
                    reason: "the token that arrived during the refresh is no longer usable".into(),
                    retry_after: self.policy.backoff_min,
                }),
            Err(err) => Err(self.fail(err, latency_ms)),
        };
        if outcome.is_err() {
            // Wake the background task so it re-plans around the backoff.
            self.changed.send_modify(|_| {});
        }
        outcome
    }

    /// Installs a granted token as the next generation (or keeps the current one when it
    /// is the same token: the fleet's follower may have installed the token this refresh
    /// stored). A token Accounts issued is logged and counted as a refresh either way; the
    /// fleet's, taken from the store, is not (another replica's refresh was counted there).
    fn take(&self, grant: Grant, latency_ms: u64, how: Taken) -> Result<Arc<Token>, TokenError> {
        let mut state = self.lock();
        if let Some(current) = self.current.load_full()
            && current.access_token.expose() == grant.access_token.expose()
            && self.is_usable(&current, Instant::now())
        {
            drop(state);
            if how == Taken::Issued {
                self.announce(how, &current, grant.expires_in, latency_ms);
            }
            return Ok(current);
        }
        let Some(token) = Token::new(grant.access_token, grant.expires_in, state.next_generation)
        else {
            drop(state);
            return Err(self.fail(
                AccountsError::Failed {
                    status: 200,
                    code: None,
                },
                latency_ms,
            ));
        };
        state.next_generation += 1;
        state.consecutive_failures = 0;
        state.backoff = None;
        state.last_error = None;
        let token = Arc::new(token);
        self.current.store(Some(token.clone()));
        drop(state);
        self.announce(how, &token, grant.expires_in, latency_ms);
        self.changed.send_replace(token.generation);
        Ok(token)
    }

    /// Logs a token taken, and counts it as a refresh when Accounts issued it.
    fn announce(&self, how: Taken, token: &Token, expires_in: Duration, latency_ms: u64) {
        match how {
            Taken::Issued => {
                self.metrics.record_refresh(RefreshResult::Ok);
                tracing::info!(
                    result = RefreshResult::Ok.label(),
                    latency_ms,
                    expires_in_secs = expires_in.as_secs(),
                    generation = token.generation,
                    "token refreshed"
                );
            }
            Taken::Shared => tracing::info!(
                latency_ms,
                expires_in_secs = expires_in.as_secs(),
                generation = token.generation,
                "token store: took the fleet's token"
            ),
        }
    }

    fn fail(&self, err: AccountsError, latency_ms: u64) -> TokenError {
        let mut state = self.lock();
        if let AccountsError::Rejected(_) = &err {
            let reason = format!("{err}; fix: {}", err.advice());
            state.rejected = Some(reason.clone());
            self.metrics.record_refresh(RefreshResult::Rejected);
            tracing::error!(result = RefreshResult::Rejected.label(), latency_ms, error = %err, fix = err.advice(), "token refresh rejected");
            let error = TokenError::Rejected(reason);
            state.last_error = Some(error.clone());
            return error;
        }
        let (result, delay) = match err {
            // The fleet's guard: its wait, and no failure of Accounts.
            AccountsError::GuardRefused { retry_after } => {
                (RefreshResult::GuardRefused, retry_after)
            }
            AccountsError::Throttled(_) => (
                RefreshResult::Throttled,
                state.next_delay(&self.policy).max(THROTTLE_BACKOFF),
            ),
            _ => (RefreshResult::Error, state.next_delay(&self.policy)),
        };
        self.metrics.record_refresh(result);
        tracing::warn!(
            result = result.label(),
            latency_ms,
            error = %err,
            retry_in_ms = delay.as_millis() as u64,
            "token refresh failed"
        );
        let error = TokenError::Unavailable {
            reason: err.to_string(),
            retry_after: delay,
        };
        let now = Instant::now();
        state.back_off(now + delay, result, &error);
        // As every later refusal tells it (the guard's wait included).
        state.refusal(now).unwrap_or(error)
    }

    /// A refresh whose task ended without a result (a panic): a failure like any other,
    /// with its backoff, so that a bug cannot make the proxy call Accounts in a loop.
    fn failed_unexpectedly(&self) -> TokenError {
        let mut state = self.lock();
        // The panic may have come after Accounts issued a token: the guard counts it.
        state.issued.push_back(Instant::now());
        let delay = state.next_delay(&self.policy);
        let error = TokenError::Unavailable {
            reason: "the token refresh failed unexpectedly".into(),
            retry_after: delay,
        };
        state.back_off(Instant::now() + delay, RefreshResult::Error, &error);
        drop(state);
        self.metrics.record_refresh(RefreshResult::Error);
        self.changed.send_modify(|_| {});
        error
    }

    /// What `/_proxy/ready` says.
    pub fn readiness(&self) -> Readiness {
        let state = self.lock();
        if let Some(reason) = &state.rejected {
            return Readiness::NotReady(reason.clone());
        }
        let now = Instant::now();
        let current = self.current.load_full();
        match (current, state.failure_now(now)) {
            (Some(token), _) if self.is_usable(&token, now) => {
                Readiness::Ready(token.expires_at - now)
            }
            (_, Some(failure)) => Readiness::NotReady(format!("no valid access token: {failure}")),
            (Some(token), None) if token.is_valid_at(now) => Readiness::NotReady(
                "Zoho Desk rejected the access token; a new one is being requested".into(),
            ),
            (Some(_), None) => {
                Readiness::NotReady("the access token expired; a new one is being requested".into())
            }
            (None, None) => Readiness::NotReady(
                "no valid access token yet: the first refresh is in progress".into(),
            ),
        }
    }

    /// Takes new credentials (after the operator fixed them) and forgets a rejection and
    /// any backoff but Accounts' throttling, so that the next request or the background
    /// task tries at once. A refresh still running with the old credentials decides
    /// nothing about the new ones. The current token stays in use while it is usable.
    pub fn replace_source(&self, source: impl TokenSource) {
        let generation = self.credentials.load().generation + 1;
        self.credentials.store(Arc::new(Credentials {
            generation,
            source: Box::new(source),
        }));
        self.clear_rejection();
    }

    /// Forgets a rejection and any backoff, so that the next request or the background
    /// task tries again; but a backoff after Accounts' throttling runs its course (Zoho
    /// asked for it, whatever the credentials, and a routine reload must not hammer it).
    pub fn clear_rejection(&self) {
        let mut state = self.lock();
        state.rejected = None;
        let now = Instant::now();
        let throttled = state
            .backoff
            .is_some_and(|b| b.cause == RefreshResult::Throttled && b.until > now);
        if !throttled {
            state.backoff = None;
            state.consecutive_failures = 0;
            state.last_error = None;
        }
        drop(state);
        self.changed.send_modify(|_| {});
    }

    /// Keeps a usable token at all times: refreshes `margin` before expiry (at once when
    /// Desk rejected the current one), retries after failures once their backoff ends,
    /// and stops when `shutdown` resolves.
    pub async fn run_background(self: Arc<Self>, shutdown: impl Future<Output = ()>) {
        let mut changed = self.subscribe();
        tokio::pin!(shutdown);
        loop {
            let (wake_at, due) = self.next_wake();
            tokio::select! {
                () = &mut shutdown => return,
                res = changed.changed() => if res.is_err() { return },
                () = sleep_until(wake_at) => {
                    // A refresh of the token that was due: if another refresh replaced it
                    // meanwhile, that token is taken and no call is made.
                    // Errors are logged and recorded by the flight; the loop re-plans.
                    // A stop does not wait for Accounts (the flight is a task of its own,
                    // whose waiters are told if it ends unanswered).
                    tokio::select! {
                        () = &mut shutdown => return,
                        _ = self.refresh_after(due) => {}
                    }
                }
            }
        }
    }

    /// When the background task should act next (`None` while rejected), and the
    /// generation it should replace then.
    fn next_wake(&self) -> (Option<Instant>, u64) {
        let state = self.lock();
        let current = self.current.load_full();
        let generation = current.as_ref().map_or(0, |t| t.generation);
        if state.rejected.is_some() {
            return (None, generation);
        }
        let now = Instant::now();
        let due = match current {
            Some(token) if self.is_usable(&token, now) => token.refresh_at(self.policy.margin),
            _ => now,
        };
        let due = match state.backoff {
            Some(backoff) => due.max(backoff.until),
            None => due,
        };
        // The guard can refuse too; never spin on it.
        let due = match state.issued.front() {
            Some(oldest) if state.issued.len() >= self.policy.max_per_10min as usize => {
                due.max(*oldest + GUARD_WINDOW)
            }
            _ => due,
        };
        (Some(due), generation)
    }

    fn lock(&self) -> MutexGuard<'_, RefreshState> {
        // The state stays consistent even if a holder panicked: every update is a
        // plain assignment.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Ends a flight: clears it, and hands its result to every waiter. Dropped without
/// landing (the flight's task panicked), it ends the flight with an error, so that a
/// later refresh can start.
struct Landing {
    cache: Arc<TokenCache>,
    id: u64,
    result: watch::Sender<FlightResult>,
}

impl Landing {
    fn land(self, outcome: Result<Arc<Token>, TokenError>) {
        self.clear();
        self.result.send_replace(Some(outcome));
        // `Drop` finds the flight cleared and the result sent.
    }

    fn clear(&self) {
        let mut state = self.cache.lock();
        if state.flight.as_ref().is_some_and(|f| f.id == self.id) {
            state.flight = None;
        }
    }
}

impl Drop for Landing {
    fn drop(&mut self) {
        if self.result.borrow().is_none() {
            self.clear();
            let error = if std::thread::panicking() {
                tracing::error!(
                    "the token refresh task ended without a result (a panic); the next refresh follows the backoff"
                );
                self.cache.failed_unexpectedly()
            } else {
                // Dropped unfinished: the runtime is shutting down.
                TokenError::Unavailable {
                    reason: "the proxy is shutting down".into(),
                    retry_after: self.cache.policy.backoff_min,
                }
            };
            self.result.send_replace(Some(Err(error)));
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
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

/// Where a refresh's token came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Taken {
    /// Accounts issued it to this proxy: a refresh.
    Issued,
    /// Another replica's, from the shared store.
    Shared,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::source::{FetchFuture, Grant};
    use std::sync::atomic::AtomicU32;

    /// A source answering call `n` with `answer(n)` after `delay`.
    struct Counting {
        calls: Arc<AtomicU32>,
        answer: fn(u32) -> Result<Fetched, AccountsError>,
        delay: Duration,
    }

    impl TokenSource for Counting {
        fn fetch<'a>(&'a self, _refresh: &'a Refresh<'a>) -> FetchFuture<'a> {
            Box::pin(async move {
                let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(self.delay).await;
                (self.answer)(n)
            })
        }
    }

    fn grant(n: u32) -> Result<Fetched, AccountsError> {
        Ok(Fetched::Issued(Grant {
            access_token: Secret::new(format!("1000.token.{n}")),
            expires_in: Duration::from_secs(3600),
            refresh_token: None,
            api_domain: None,
        }))
    }

    fn counting(
        answer: fn(u32) -> Result<Fetched, AccountsError>,
        delay: Duration,
    ) -> (Counting, Arc<AtomicU32>) {
        let calls = Arc::new(AtomicU32::new(0));
        (
            Counting {
                calls: calls.clone(),
                answer,
                delay,
            },
            calls,
        )
    }

    fn cache(
        answer: fn(u32) -> Result<Fetched, AccountsError>,
        max: u32,
    ) -> (Arc<TokenCache>, Arc<AtomicU32>) {
        let (source, calls) = counting(answer, Duration::from_millis(20));
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
        cache.mark_rejected(&first);
        let next = cache.usable().await.unwrap();
        assert!(next.generation > first.generation);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "one refresh for the rejection"
        );
    }

    #[tokio::test]
    async fn a_refresh_after_an_old_failure_never_returns_a_rejected_token() {
        let (cache, calls) = cache(grant, 10);
        let a = cache.usable().await.unwrap();
        cache.mark_rejected(&a);
        let b = cache.refresh_after(a.generation).await.unwrap();
        // Desk rejects the new token too, while requests that failed on `a` still ask.
        cache.mark_rejected(&b);
        let c = cache.refresh_after(a.generation).await.unwrap();
        assert!(c.generation > b.generation, "b was rejected: a newer one");
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert!(!cache.is_usable(&b, Instant::now()));
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

    #[tokio::test(start_paused = true)]
    async fn the_guard_s_wait_is_told_as_it_stands() {
        let (cache, _) = cache(grant, 1);
        cache.refresh_after(0).await.unwrap();
        let g = cache.current().unwrap().generation;
        let said = |err: TokenError| match err {
            TokenError::Unavailable { reason, .. } => reason,
            other => panic!("{other:?}"),
        };
        let first = said(cache.refresh_after(g).await.unwrap_err());
        assert!(first.ends_with("the next is allowed in 600 s"), "{first}");
        tokio::time::advance(Duration::from_secs(100)).await;
        let later = said(cache.refresh_after(g).await.unwrap_err());
        assert!(later.ends_with("the next is allowed in 500 s"), "{later}");
        assert_eq!(later.matches("allowed in").count(), 1, "{later}");
        // ready says the same (the token itself is still valid here: made unusable).
        cache.mark_rejected(&cache.current().unwrap());
        assert!(
            matches!(cache.readiness(), Readiness::NotReady(r) if r.ends_with("allowed in 500 s")),
            "{:?}",
            cache.readiness()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn calls_whose_answer_was_lost_count_in_the_guard() {
        let (cache, calls) = cache(
            |n| match n % 2 {
                1 => Err(AccountsError::Interrupted("connection reset".into())),
                _ => Err(AccountsError::Unreachable("connection refused".into())),
            },
            2,
        );
        // Interrupted (counted), unreachable (not counted), interrupted (counted): then
        // the guard of 2 is closed.
        for _ in 0..3 {
            assert!(cache.usable().await.is_err());
            tokio::time::advance(Duration::from_secs(120)).await;
        }
        let err = cache.usable().await.unwrap_err();
        assert!(err.to_string().contains("refresh guard"), "{err}");
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    /// A source whose call `n` answers after `delays[n]`, rejected while the cache's
    /// credentials are "old".
    struct Credentialed {
        name: &'static str,
        calls: Arc<AtomicU32>,
        delay: Duration,
    }

    impl TokenSource for Credentialed {
        fn fetch<'a>(&'a self, _refresh: &'a Refresh<'a>) -> FetchFuture<'a> {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(self.delay).await;
                match self.name {
                    "wrong" => Err(AccountsError::Rejected("invalid_client".into())),
                    _ => grant(1),
                }
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_during_a_refresh_is_not_undone_by_the_old_answer() {
        let calls = Arc::new(AtomicU32::new(0));
        let cache = TokenCache::new(
            Credentialed {
                name: "wrong",
                calls: calls.clone(),
                delay: Duration::from_secs(2),
            },
            RefreshPolicy::new(Duration::from_secs(300), 10),
            Arc::default(),
        );
        let waiting = tokio::spawn({
            let cache = cache.clone();
            async move { cache.usable().await }
        });
        // The wrong-secret call is in flight when the operator fixes it (SIGHUP).
        tokio::time::advance(Duration::from_millis(500)).await;
        cache.replace_source(Credentialed {
            name: "right",
            calls: calls.clone(),
            delay: Duration::from_secs(2),
        });
        let token = waiting
            .await
            .unwrap()
            .expect("the reloaded credentials answer");
        assert_eq!(token.access_token.expose(), "1000.token.1");
        assert!(matches!(cache.readiness(), Readiness::Ready(_)));
        assert_eq!(calls.load(Ordering::SeqCst), 2, "one call each");
    }

    /// A source that panics.
    struct Panicking;

    impl TokenSource for Panicking {
        fn fetch<'a>(&'a self, _refresh: &'a Refresh<'a>) -> FetchFuture<'a> {
            Box::pin(async move { panic!("a bug in a source") })
        }
    }

    #[tokio::test]
    async fn a_panic_in_a_refresh_does_not_leave_the_flight_stuck() {
        let cache = TokenCache::new(
            Panicking,
            RefreshPolicy::new(Duration::from_secs(300), 10),
            Arc::default(),
        );
        let err = cache.usable().await.unwrap_err();
        assert!(err.to_string().contains("unexpectedly"), "{err}");
        let (source, calls) = counting(grant, Duration::ZERO);
        cache.replace_source(source);
        cache.usable().await.expect("a later refresh runs");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    /// A source that counts its calls and panics.
    struct CountedPanic(Arc<AtomicU32>);

    impl TokenSource for CountedPanic {
        fn fetch<'a>(&'a self, _refresh: &'a Refresh<'a>) -> FetchFuture<'a> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move { panic!("a bug in a source (expected by this test)") })
        }
    }

    #[tokio::test]
    async fn a_panic_in_a_refresh_backs_off_like_a_failure() {
        let calls = Arc::new(AtomicU32::new(0));
        let metrics = Arc::new(Metrics::new());
        let cache = TokenCache::new(
            CountedPanic(calls.clone()),
            RefreshPolicy::new(Duration::from_secs(300), 10),
            metrics.clone(),
        );
        for _ in 0..5 {
            let err = cache.usable().await.unwrap_err();
            assert!(err.to_string().contains("unexpectedly"), "{err}");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1, "backing off, not calling");
        assert!(matches!(cache.readiness(), Readiness::NotReady(r) if r.contains("unexpectedly")));
        let (text, _) = metrics.encode(None, 0, false);
        assert!(
            text.contains("zoho_proxy_token_refreshes_total{result=\"error\"} 1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_closed_guard_is_counted_once_and_told_by_ready() {
        let (source, calls) = counting(grant, Duration::ZERO);
        let metrics = Arc::new(Metrics::new());
        let cache = TokenCache::new(
            source,
            RefreshPolicy::new(Duration::from_secs(300), 2),
            metrics.clone(),
        );
        for _ in 0..2 {
            let token = cache.usable().await.unwrap();
            cache.mark_rejected(&token);
        }
        for _ in 0..100 {
            let err = cache.usable().await.unwrap_err();
            assert!(err.to_string().contains("refresh guard"), "{err}");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert!(
            matches!(cache.readiness(), Readiness::NotReady(r) if r.contains("refresh guard")),
            "{:?}",
            cache.readiness()
        );
        let (text, _) = metrics.encode(None, 0, false);
        assert!(
            text.contains("zoho_proxy_token_refreshes_total{result=\"guard_refused\"} 1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn the_fleet_s_guard_refusal_is_counted_as_such_and_does_not_grow_the_backoff() {
        let metrics = Arc::new(Metrics::new());
        let (source, _) = counting(
            |_| {
                Err(AccountsError::GuardRefused {
                    retry_after: Duration::from_secs(7),
                })
            },
            Duration::ZERO,
        );
        let cache = TokenCache::new(
            source,
            RefreshPolicy::new(Duration::from_secs(300), 10),
            metrics.clone(),
        );
        let err = cache.usable().await.unwrap_err();
        assert!(
            matches!(err, TokenError::Unavailable { retry_after, .. } if retry_after <= Duration::from_secs(7)),
            "{err:?}"
        );
        assert_eq!(cache.lock().consecutive_failures, 0);
        let (text, _) = metrics.encode(None, 0, false);
        assert!(
            text.contains("zoho_proxy_token_refreshes_total{result=\"guard_refused\"} 1")
                && text.contains("zoho_proxy_token_refreshes_total{result=\"error\"} 0"),
            "{text}"
        );
    }

    /// Throttles once, after a reload arrives while it waits.
    struct ThrottledDuringReload {
        calls: Arc<AtomicU32>,
        reloaded: Arc<tokio::sync::Notify>,
    }

    impl TokenSource for ThrottledDuringReload {
        fn fetch<'a>(&'a self, _refresh: &'a Refresh<'a>) -> FetchFuture<'a> {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                self.reloaded.notified().await;
                Err(AccountsError::Throttled("Access Denied".into()))
            })
        }
    }

    #[tokio::test]
    async fn a_throttled_answer_for_replaced_credentials_still_backs_off() {
        let (calls, reloaded) = (
            Arc::new(AtomicU32::new(0)),
            Arc::new(tokio::sync::Notify::new()),
        );
        let cache = TokenCache::new(
            ThrottledDuringReload {
                calls: calls.clone(),
                reloaded: reloaded.clone(),
            },
            RefreshPolicy::new(Duration::from_secs(300), 10),
            Arc::default(),
        );
        let waiting = tokio::spawn({
            let cache = cache.clone();
            async move { cache.usable().await }
        });
        while calls.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let (source, reloaded_calls) = counting(grant, Duration::ZERO);
        cache.replace_source(source);
        reloaded.notify_one();
        let err = waiting.await.unwrap().unwrap_err();
        assert!(
            matches!(err, TokenError::Unavailable { retry_after, .. } if retry_after > Duration::from_secs(55)),
            "{err:?}"
        );
        assert_eq!(
            reloaded_calls.load(Ordering::SeqCst),
            0,
            "Zoho asked for a wait"
        );
    }

    #[tokio::test]
    async fn a_reload_does_not_end_a_throttling_backoff() {
        let throttled = |_| Err(AccountsError::Throttled("Access Denied".into()));
        let (cache, calls) = cache(throttled, 10);
        assert!(cache.usable().await.is_err());
        let (source, reloaded_calls) = counting(grant, Duration::ZERO);
        cache.replace_source(source);
        let err = cache.usable().await.unwrap_err();
        assert!(
            matches!(err, TokenError::Unavailable { retry_after, .. } if retry_after > Duration::from_secs(55)),
            "{err:?}"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(
            reloaded_calls.load(Ordering::SeqCst),
            0,
            "Zoho asked for a wait"
        );
    }

    /// A source that reports what arrived in the cache instead of calling when it can.
    struct Patient {
        calls: Arc<AtomicU32>,
        delay: Duration,
    }

    impl TokenSource for Patient {
        fn fetch<'a>(&'a self, refresh: &'a Refresh<'a>) -> FetchFuture<'a> {
            Box::pin(async move {
                // Waiting on something (Redis) before deciding to call.
                tokio::time::sleep(self.delay).await;
                if refresh.arrived() {
                    return Ok(Fetched::Arrived);
                }
                self.calls.fetch_add(1, Ordering::SeqCst);
                grant(9)
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_that_arrives_while_a_refresh_waits_costs_no_call() {
        let calls = Arc::new(AtomicU32::new(0));
        let cache = TokenCache::new(
            Patient {
                calls: calls.clone(),
                delay: Duration::from_secs(1),
            },
            RefreshPolicy::new(Duration::from_secs(300), 10),
            Arc::default(),
        );
        let waiting = tokio::spawn({
            let cache = cache.clone();
            async move { cache.usable().await }
        });
        tokio::time::advance(Duration::from_millis(100)).await;
        // The fleet's token arrives (the store's follower adopts it).
        let adopted = cache
            .install(Secret::new("1000.fleet".into()), Duration::from_secs(3000))
            .unwrap();
        let token = waiting.await.unwrap().unwrap();
        assert_eq!(token.generation, adopted.generation);
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn install_never_replaces_a_newer_token_nor_brings_back_a_rejected_one() {
        let (cache, _) = cache(grant, 10);
        let long = cache
            .install(Secret::new("1000.long".into()), Duration::from_secs(3000))
            .unwrap();
        assert!(
            cache
                .install(Secret::new("1000.short".into()), Duration::from_secs(100))
                .is_none(),
            "a token read before a newer one arrived"
        );
        assert!(
            cache
                .install(Secret::new("1000.long".into()), Duration::from_secs(3500))
                .is_none(),
            "the same token"
        );
        cache.mark_rejected(&long);
        assert!(
            cache
                .install(Secret::new("1000.long".into()), Duration::from_secs(3500))
                .is_none(),
            "a token Desk rejected"
        );
        let later = cache
            .install(Secret::new("1000.other".into()), Duration::from_secs(100))
            .expect("any usable token beats a rejected one");
        assert!(later.generation > long.generation);
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
