//! One refresh at a time: the guard's admission, the flight that asks the source in a task
//! of its own, and what is made of its answer (a new token, or a failure and its backoff),
//! handed to every waiter when it lands.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::state::{Flight, FlightResult, GUARD_WINDOW, RefreshState, THROTTLE_BACKOFF};
use super::{TokenCache, TokenError};
use crate::metrics::RefreshResult;
use crate::token::source::{AccountsError, Fetched, Grant, Refresh, Token};

impl TokenCache {
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
    pub(super) fn start_flight(
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

/// Where a refresh's token came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Taken {
    /// Accounts issued it to this proxy: a refresh.
    Issued,
    /// Another replica's, from the shared store.
    Shared,
}
