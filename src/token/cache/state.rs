//! The refresh's bookkeeping: the refresh in flight, the backoff after a failure, and the
//! calls the refresh guard counts. Only the refresh path takes its lock, never a request
//! that has a usable token.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::{RefreshPolicy, TokenError};
use crate::metrics::RefreshResult;
use crate::secret::Secret;
use crate::token::source::Token;

/// Zoho counts refreshes in windows of 10 minutes.
pub(super) const GUARD_WINDOW: Duration = Duration::from_secs(600);
/// Zoho blocks for the rest of its window when throttling; never come back sooner.
pub(super) const THROTTLE_BACKOFF: Duration = Duration::from_secs(60);

pub(super) type FlightResult = Option<Result<Arc<Token>, TokenError>>;

/// The refresh in flight: every caller that needs a new token waits on it.
pub(super) struct Flight {
    pub(super) id: u64,
    pub(super) result: watch::Receiver<FlightResult>,
}

/// Refresh bookkeeping; only the refresh path takes this lock, never a request that has a
/// usable token.
#[derive(Default)]
pub(super) struct RefreshState {
    pub(super) flight: Option<Flight>,
    pub(super) flights: u64,
    pub(super) consecutive_failures: u32,
    pub(super) backoff: Option<Backoff>,
    pub(super) last_error: Option<TokenError>,
    /// Accounts refused the current credentials (cleared by a reload).
    pub(super) rejected: Option<String>,
    /// Accounts calls that may have issued a token, in the last 10 minutes.
    pub(super) issued: VecDeque<Instant>,
    pub(super) next_generation: u64,
    /// The last access tokens Desk rejected.
    pub(super) rejected_tokens: VecDeque<Secret<String>>,
}

/// No call to Accounts until `until`, and why.
#[derive(Debug, Clone, Copy)]
pub(super) struct Backoff {
    pub(super) until: Instant,
    /// `Throttled`: Accounts asked for the wait, which a reload does not end.
    pub(super) cause: RefreshResult,
}

impl RefreshState {
    /// Backs off until `until` for `cause`, refusing with `error` meanwhile.
    pub(super) fn back_off(&mut self, until: Instant, cause: RefreshResult, error: &TokenError) {
        self.backoff = Some(Backoff { until, cause });
        self.last_error = Some(error.clone());
    }

    /// The last failure in words, a refusal of the guard with its wait as it is `now`.
    pub(super) fn failure_now(&self, now: Instant) -> Option<String> {
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
    pub(super) fn refusal(&self, now: Instant) -> Option<TokenError> {
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
    pub(super) fn next_delay(&mut self, policy: &RefreshPolicy) -> Duration {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        backoff(policy, self.consecutive_failures)
    }
}

/// A refusal of the refresh guard, and when the next refresh is allowed (in the seconds of
/// the answer's `Retry-After`).
pub(super) fn guard_wait(refusal: &TokenError, wait: Duration) -> String {
    format!(
        "{refusal}; the next is allowed in {} s",
        crate::error::retry_after_secs(wait)
    )
}

/// Exponential backoff with ±25 % jitter, from `backoff_min` doubling to `backoff_max`.
pub(super) fn backoff(policy: &RefreshPolicy, failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    let base = policy
        .backoff_min
        .saturating_mul(1 << exp)
        .min(policy.backoff_max);
    let jitter = 0.75 + fastrand::f64() * 0.5;
    base.mul_f64(jitter).min(policy.backoff_max)
}
