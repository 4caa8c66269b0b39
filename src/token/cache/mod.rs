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

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::sync::watch;
// tokio's clock, so that tests can pause and advance it.
use tokio::time::Instant;

use super::source::{Token, TokenSource};
use crate::metrics::{Metrics, RefreshResult};
use crate::secret::Secret;

mod flight;
mod state;
#[cfg(test)]
mod tests;

use state::{GUARD_WINDOW, RefreshState};

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

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
