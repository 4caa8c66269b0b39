//! The shared token store of README "Running several proxies", on Redis: one access token for a whole fleet of
//! proxies that share a refresh token.
//!
//! - Each replica keeps the token in its local [`TokenCache`] (the request path never
//!   touches Redis) and learns of new ones by pub/sub, with a periodic re-read as a net.
//! - A refresh first looks in Redis for a token newer than the one that failed (the
//!   fleet-wide generation check); only if there is none does it take a lock with an
//!   expiry (`SET NX PX`), look again, count the call in a fleet-wide guard, call
//!   Accounts, store and publish the token, and release the lock if it still owns it.
//! - A token obtained from Accounts is never thrown away: when Redis fails after the
//!   call, the replica uses the token alone (one call, one token) and reports the store
//!   as degraded.
//! - When Redis is unreachable before any call, the replica keeps its token, reports the
//!   store as degraded, and refreshes on its own (local single flight and guard), unless
//!   a usable token arrived meanwhile; it rejoins when Redis is back. A replica that
//!   cannot get the fleet's lock in time never calls Accounts without it.
//!
//! Keys live under `zoho-desk-proxy:<hash>:`, the hash of client id and refresh token, so
//! one Redis serves several portals. The access token is stored; the refresh token and the
//! client secret never are.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

use super::cache::TokenCache;
use super::source::{AccountsError, FetchFuture, Fetched, Grant, Refresh, Token, TokenSource};
use crate::metrics::Metrics;
use crate::secret::Secret;

/// Zoho's window for refresh limits.
const GUARD_WINDOW: Duration = Duration::from_secs(600);
/// How long a waiting replica sleeps between looks when no message arrives.
const WAIT_STEP: Duration = Duration::from_millis(50);
/// A stored token is adopted only with at least this much life left.
const MIN_ADOPT_REMAINING: Duration = Duration::from_millis(500);
/// Re-read of the stored token in case a pub/sub message was missed.
const RESYNC_EVERY: Duration = Duration::from_secs(15);
/// Timeout of a single Redis command.
const COMMAND_TIMEOUT: Duration = crate::client::REDIS_COMMAND_TIMEOUT;
/// How long the fleet's refresh lock lives unless its holder renews it (every third of
/// it, while its refresh runs): a replica that dies while it refreshes holds the others
/// up this long at most. Three Redis command timeouts, so that one slow renewal does not
/// let the lock go.
const LOCK_LEASE: Duration = COMMAND_TIMEOUT.saturating_mul(3);

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis failed or could not be reached.
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// A stored value is not what the proxy writes.
    #[error("Redis holds an unreadable token: {0}")]
    Corrupt(String),
    /// Redis stopped answering, or a lock was never released.
    #[error("Redis: {0}")]
    Unavailable(&'static str),
}

/// The health of the store, shown by `/_proxy/ready` and the metrics.
#[derive(Debug, Default)]
pub struct StoreStatus {
    degraded: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl StoreStatus {
    /// `None` while Redis answers; else the last error.
    pub fn degraded(&self) -> Option<String> {
        if !self.degraded.load(Ordering::Acquire) {
            return None;
        }
        let error = self.last_error.lock().ok().and_then(|e| e.clone());
        Some(error.unwrap_or_else(|| "Redis is unreachable".into()))
    }

    fn ok(&self) {
        if self.degraded.swap(false, Ordering::AcqRel) {
            tracing::info!("token store: Redis is reachable again; rejoined the fleet");
        }
    }

    fn failed(&self, err: &StoreError, metrics: &Metrics) {
        metrics.record_store_error();
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(err.to_string());
        }
        if !self.degraded.swap(true, Ordering::AcqRel) {
            tracing::warn!(error = %err, "token store degraded: serving with the local token and refreshing locally until Redis is back");
        }
    }
}

/// The token as stored in Redis.
#[derive(Debug, Serialize, Deserialize)]
struct StoredToken {
    access_token: String,
    /// Unix milliseconds.
    expires_at_ms: u64,
    /// When Accounts issued it, Unix milliseconds (absent from an earlier version's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    issued_at_ms: Option<u64>,
}

impl StoredToken {
    fn remaining(&self) -> Option<Duration> {
        let now = unix_ms(SystemTime::now());
        self.expires_at_ms
            .checked_sub(now)
            .map(Duration::from_millis)
    }

    /// Whether this token should replace `local`: a different token that lives longer,
    /// or that was issued later (one that lives less long is no older: Accounts may
    /// shorten its tokens' life); with some life left. A local token's issue time is
    /// known only as when it was installed (a token taken from the store or the token
    /// file was issued before), so an issue time is never the only evidence.
    fn replaces(&self, local: Option<&Token>) -> bool {
        let Some(remaining) = self.remaining() else {
            return false;
        };
        if remaining < MIN_ADOPT_REMAINING {
            return false;
        }
        match local {
            None => true,
            Some(local) => {
                local.access_token.expose() != &self.access_token
                    && (self.expires_at_ms > unix_ms(local.expires_at_wall)
                        || self
                            .issued_at_ms
                            .is_some_and(|issued| issued > issued_ms(local)))
            }
        }
    }

    fn grant(self) -> Option<Grant> {
        let expires_in = self.remaining()?;
        Some(Grant {
            access_token: Secret::new(self.access_token),
            expires_in,
            refresh_token: None,
            api_domain: None,
        })
    }
}

/// When `token` was issued, Unix milliseconds, as far as this replica knows: for one
/// taken from the store or the token file, when it was taken (later than its issue).
fn issued_ms(token: &Token) -> u64 {
    token
        .expires_at_wall
        .checked_sub(token.lifetime)
        .map_or(0, unix_ms)
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The keys of one portal (client id + refresh token).
#[derive(Debug, Clone)]
struct Keys {
    token: String,
    lock: String,
    refreshes: String,
    channel: String,
}

impl Keys {
    fn new(client_id: &str, refresh_token: &Secret<String>) -> Self {
        let mut hash = Sha256::new();
        hash.update(client_id.as_bytes());
        hash.update(b"\n");
        hash.update(refresh_token.expose().as_bytes());
        let digest = hash.finalize();
        let ns: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
        let prefix = format!("zoho-desk-proxy:{ns}");
        Self {
            token: format!("{prefix}:token"),
            lock: format!("{prefix}:lock"),
            refreshes: format!("{prefix}:refreshes"),
            channel: format!("{prefix}:events"),
        }
    }
}

/// Extends the lock's life only if this replica still owns it.
const RENEW_LOCK: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0";
static RENEW_LOCK_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(RENEW_LOCK));

/// Deletes the lock only if this replica still owns it.
const RELEASE_LOCK: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";
static RELEASE_LOCK_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(RELEASE_LOCK));

/// Takes the lock for ARGV[2] ms unless it is held; a lock held without expiry gets one.
const TRY_LOCK: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
if redis.call('PTTL', KEYS[1]) == -1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0";
static TRY_LOCK_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(TRY_LOCK));

/// The fleet-wide guard: counts a refresh unless `max` were counted in the window.
/// Returns {1, 0} when counted, {0, ms until the oldest leaves the window} when refused.
const GUARD: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, tonumber(oldest[2]) + window - now}
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], window)
return {1, 0}";
static GUARD_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(GUARD));

/// A connection to the shared store for one portal.
pub struct SharedStore {
    client: redis::Client,
    conn: ConnectionManager,
    keys: Keys,
    /// Identifies this replica as a lock owner.
    owner: String,
    /// How long a replica waits for another's refresh before it gives up.
    wait_limit: Duration,
    max_per_10min: u32,
    status: Arc<StoreStatus>,
    metrics: Arc<Metrics>,
    /// Woken by the subscriber on every published token.
    published: Notify,
}

impl SharedStore {
    /// Connects lazily (a Redis that is down at start only degrades the store).
    /// `wait_limit` (how long a replica waits for another's refresh) must exceed the
    /// slowest Accounts call.
    pub fn new(
        client: redis::Client,
        client_id: &str,
        refresh_token: &Secret<String>,
        wait_limit: Duration,
        max_per_10min: u32,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, StoreError> {
        let conn = crate::client::redis_connection(&client)?;
        Ok(Arc::new(Self {
            client,
            conn,
            keys: Keys::new(client_id, refresh_token),
            owner: format!("{:016x}", fastrand::u64(..)),
            wait_limit,
            max_per_10min,
            status: Arc::default(),
            metrics,
            published: Notify::new(),
        }))
    }

    /// The store's health.
    pub fn status(&self) -> Arc<StoreStatus> {
        Arc::clone(&self.status)
    }

    async fn read(&self) -> Result<Option<StoredToken>, StoreError> {
        let mut conn = self.conn.clone();
        let text: Option<String> = conn.get(&self.keys.token).await?;
        text.map(|t| serde_json::from_str(&t).map_err(|e| StoreError::Corrupt(e.to_string())))
            .transpose()
    }

    async fn write(&self, token: &Secret<String>, expires_in: Duration) -> Result<(), StoreError> {
        let now = SystemTime::now();
        let stored = StoredToken {
            access_token: token.expose().clone(),
            expires_at_ms: unix_ms(now + expires_in),
            issued_at_ms: Some(unix_ms(now)),
        };
        let json =
            serde_json::to_string(&stored).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut conn = self.conn.clone();
        let ttl_ms = expires_in.as_millis().max(1) as u64;
        let () = conn.pset_ex(&self.keys.token, json, ttl_ms).await?;
        let _: i64 = conn.publish(&self.keys.channel, "token").await?;
        Ok(())
    }

    /// Stores `token` only when Redis holds none (`SET NX`): never over another
    /// replica's newer token.
    async fn offer(&self, token: &Secret<String>, expires_in: Duration) -> Result<(), StoreError> {
        let stored = StoredToken {
            access_token: token.expose().clone(),
            expires_at_ms: unix_ms(SystemTime::now() + expires_in),
            // Not known here (it may have been taken from the store): compared by expiry.
            issued_at_ms: None,
        };
        let json =
            serde_json::to_string(&stored).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut conn = self.conn.clone();
        let set: Option<String> = redis::cmd("SET")
            .arg(&self.keys.token)
            .arg(json)
            .arg("NX")
            .arg("PX")
            .arg(expires_in.as_millis().max(1) as u64)
            .query_async(&mut conn)
            .await?;
        if set.is_some() {
            let _: i64 = conn.publish(&self.keys.channel, "token").await?;
        }
        Ok(())
    }

    /// Takes the fleet's refresh lock for a lease, if no one holds it. A lock held with no
    /// expiry (no replica sets one: written by hand, or garbage) is given one, so that it
    /// cannot stop the fleet's refreshes for ever.
    async fn try_lock(&self) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let taken: i64 = TRY_LOCK_SCRIPT
            .key(&self.keys.lock)
            .arg(&self.owner)
            .arg(LOCK_LEASE.as_millis() as u64)
            .invoke_async(&mut conn)
            .await?;
        Ok(taken == 1)
    }

    /// Runs `work` while holding the lock, renewing it every third of its lease.
    async fn holding_lock<T>(&self, work: impl Future<Output = T>) -> T {
        tokio::pin!(work);
        let every = LOCK_LEASE / 3;
        let mut renew = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                out = &mut work => return out,
                _ = renew.tick() => self.renew_lock().await,
            }
        }
    }

    async fn renew_lock(&self) {
        let mut conn = self.conn.clone();
        let renewed: Result<i64, _> = RENEW_LOCK_SCRIPT
            .key(&self.keys.lock)
            .arg(&self.owner)
            .arg(LOCK_LEASE.as_millis() as u64)
            .invoke_async(&mut conn)
            .await;
        match renewed {
            Ok(1) => {}
            Ok(_) => tracing::warn!(
                "token store: the refresh lock expired while this replica held it; another replica may refresh too"
            ),
            Err(err) => tracing::debug!(error = %err, "token store: lock renewal failed"),
        }
    }

    async fn unlock(&self) {
        let mut conn = self.conn.clone();
        let released: Result<i64, _> = RELEASE_LOCK_SCRIPT
            .key(&self.keys.lock)
            .arg(&self.owner)
            .invoke_async(&mut conn)
            .await;
        if let Err(err) = released {
            // The lock expires by itself.
            tracing::debug!(error = %err, "token store: lock release failed");
        }
    }

    /// Counts a refresh in the fleet-wide guard (its entry, to take back should the call
    /// surely issue nothing), or says how long to wait.
    async fn count_refresh(&self) -> Result<Result<String, Duration>, StoreError> {
        let mut conn = self.conn.clone();
        let entry = format!("{}-{:016x}", self.owner, fastrand::u64(..));
        let (counted, wait_ms): (i64, i64) = GUARD_SCRIPT
            .key(&self.keys.refreshes)
            .arg(GUARD_WINDOW.as_millis() as u64)
            .arg(self.max_per_10min)
            .arg(&entry)
            .invoke_async(&mut conn)
            .await?;
        Ok(if counted == 1 {
            Ok(entry)
        } else {
            Err(Duration::from_millis(wait_ms.max(1) as u64))
        })
    }

    /// Takes a refresh back out of the fleet-wide guard: Accounts surely issued no token
    /// for it (it throttled, refused or failed with an error), as the local guard counts.
    async fn uncount_refresh(&self, entry: &str) {
        let mut conn = self.conn.clone();
        let removed: Result<i64, _> = redis::cmd("ZREM")
            .arg(&self.keys.refreshes)
            .arg(entry)
            .query_async(&mut conn)
            .await;
        if let Err(err) = removed {
            // The entry leaves the window by itself.
            tracing::debug!(error = %err, "token store: a refresh that issued nothing could not be taken out of the guard");
        }
    }

    /// A token to replace `refresh.stale`: the stored one when it is newer, else a
    /// refresh by this replica under the lock, else the one another replica stores
    /// meanwhile. `Err` only when Redis failed before Accounts was called (the caller
    /// may then refresh alone); after the call, a store failure never loses the token.
    async fn fetch_shared(
        &self,
        refresh: &Refresh<'_>,
        accounts: &dyn TokenSource,
    ) -> Result<Result<Fetched, AccountsError>, StoreError> {
        let stale = refresh.stale.as_deref();
        let deadline = tokio::time::Instant::now() + self.wait_limit + COMMAND_TIMEOUT;
        loop {
            if let Some(grant) = self.newer_than(stale).await? {
                return Ok(Ok(Fetched::Shared(grant)));
            }
            if self.try_lock().await? {
                let result = self
                    .holding_lock(self.refresh_locked(refresh, accounts))
                    .await;
                self.unlock().await;
                return result;
            }
            if tokio::time::Instant::now() >= deadline {
                // Calling Accounts without the lock or the fleet's guard could break the
                // fleet's limits: the request waits for the next try instead.
                tracing::warn!(
                    "token store: another replica held the refresh lock past its expiry; no call made"
                );
                return Ok(Err(AccountsError::FleetBusy));
            }
            if refresh.arrived() {
                return Ok(Ok(Fetched::Arrived));
            }
            // Another replica is refreshing: wait for its token.
            let _ = tokio::time::timeout(WAIT_STEP, self.published.notified()).await;
        }
    }

    async fn refresh_locked(
        &self,
        refresh: &Refresh<'_>,
        accounts: &dyn TokenSource,
    ) -> Result<Result<Fetched, AccountsError>, StoreError> {
        // Another replica may have finished between our look and our lock.
        if let Some(grant) = self.newer_than(refresh.stale.as_deref()).await? {
            return Ok(Ok(Fetched::Shared(grant)));
        }
        let entry = match self.count_refresh().await? {
            Ok(entry) => entry,
            Err(retry_after) => return Ok(Err(AccountsError::GuardRefused { retry_after })),
        };
        let result = accounts.fetch(refresh).await;
        if let Err(err) = &result
            && !err.may_have_issued()
        {
            self.uncount_refresh(&entry).await;
        }
        if let Ok(Fetched::Issued(grant)) = &result {
            match self.write(&grant.access_token, grant.expires_in).await {
                Ok(()) => self.status.ok(),
                Err(err) => {
                    // The token is Zoho's now, and counted: keep it, and let the fleet pick
                    // it up once Redis is back (the follower offers it then).
                    self.status.failed(&err, &self.metrics);
                    tracing::warn!(error = %err, "token store: the new token could not be stored; using it alone");
                }
            }
        }
        Ok(result)
    }

    async fn newer_than(&self, stale: Option<&Token>) -> Result<Option<Grant>, StoreError> {
        Ok(self
            .read()
            .await?
            .filter(|s| s.replaces(stale))
            .and_then(StoredToken::grant))
    }

    /// Adopts the stored token when it is newer than the local one (the cache refuses it
    /// if a newer one arrived while Redis answered, or if Desk rejected it); offers the
    /// local one to the fleet when Redis has none (after Redis was down), unless Desk
    /// rejected it, and never over a token another replica stored meanwhile.
    async fn sync(&self, cache: &TokenCache) -> Result<(), StoreError> {
        let local = cache.current();
        let stored = self.read().await?;
        match stored {
            Some(stored) if stored.replaces(local.as_deref()) => {
                if let Some(remaining) = stored.remaining()
                    && cache
                        .install(Secret::new(stored.access_token), remaining)
                        .is_some()
                {
                    tracing::info!(
                        expires_in_secs = remaining.as_secs(),
                        "token store: adopted the fleet's token"
                    );
                }
            }
            Some(_) => {}
            None => {
                let now = tokio::time::Instant::now();
                if let Some(local) = local.filter(|t| cache.is_usable(t, now)) {
                    self.offer(&local.access_token, local.expires_at - now)
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// Follows the fleet's tokens until `stop` resolves: subscribes to the store's
    /// channel (reconnecting with backoff while Redis is down), adopts every newer token,
    /// and re-reads now and then in case a message was lost.
    pub async fn follow(self: Arc<Self>, cache: Arc<TokenCache>, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        let mut backoff = Duration::from_millis(250);
        loop {
            tokio::select! {
                () = &mut stop => return,
                result = self.follow_once(&cache) => {
                    if let Err(err) = result {
                        self.status.failed(&err, &self.metrics);
                    }
                }
            }
            tokio::select! {
                () = &mut stop => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn follow_once(&self, cache: &TokenCache) -> Result<(), StoreError> {
        let mut pubsub = tokio::time::timeout(COMMAND_TIMEOUT, self.client.get_async_pubsub())
            .await
            .map_err(|_| StoreError::Unavailable("connection timed out"))??;
        pubsub.subscribe(&self.keys.channel).await?;
        self.sync(cache).await?;
        self.status.ok();
        let mut messages = pubsub.on_message();
        let mut resync = tokio::time::interval(RESYNC_EVERY);
        loop {
            tokio::select! {
                message = messages.next() => {
                    if message.is_none() {
                        return Err(StoreError::Unavailable("the subscription ended (Redis went away)"));
                    }
                    self.published.notify_waiters();
                    self.sync(cache).await?;
                }
                _ = resync.tick() => self.sync(cache).await?,
            }
            // Redis answers: a failure another path saw (a refresh that timed out while
            // Redis hung) is over.
            self.status.ok();
        }
    }
}

/// A [`TokenSource`] that goes through the shared store, and straight to Accounts when
/// Redis fails.
pub struct SharedSource<S> {
    /// The store.
    pub store: Arc<SharedStore>,
    /// The Accounts source.
    pub accounts: S,
}

impl<S: TokenSource> TokenSource for SharedSource<S> {
    fn fetch<'a>(&'a self, refresh: &'a Refresh<'a>) -> FetchFuture<'a> {
        Box::pin(async move {
            match self.store.fetch_shared(refresh, &self.accounts).await {
                Ok(result) => {
                    if !matches!(result, Ok(Fetched::Issued(_))) {
                        self.store.status.ok();
                    }
                    result
                }
                Err(err) => {
                    // Redis failed before any call: refresh alone (the Accounts source
                    // first checks whether a usable token arrived meanwhile).
                    self.store.status.failed(&err, &self.store.metrics);
                    self.accounts.fetch(refresh).await
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_namespaced_by_a_hash_that_reveals_no_secret() {
        let a = Keys::new("1000.A", &Secret::new("1000.refresh.secret".into()));
        let b = Keys::new("1000.A", &Secret::new("1000.other".into()));
        assert_ne!(a.token, b.token);
        assert!(a.token.starts_with("zoho-desk-proxy:") && a.token.ends_with(":token"));
        for key in [&a.token, &a.lock, &a.refreshes, &a.channel] {
            assert!(
                !key.contains("1000.refresh.secret") && !key.contains("1000.A"),
                "{key}"
            );
        }
    }

    #[test]
    fn a_stored_token_issued_later_replaces_one_that_lives_longer() {
        // Desk rejected a token of an hour; Accounts now issues tokens of 10 minutes: the
        // fleet's new one is newer, not older (each replica had called Accounts; audit).
        let long_lived =
            Token::new(Secret::new("1000.old".into()), Duration::from_secs(3600), 1).unwrap();
        let now = SystemTime::now();
        let shorter = StoredToken {
            access_token: "1000.new".into(),
            expires_at_ms: unix_ms(now + Duration::from_secs(600)),
            issued_at_ms: Some(unix_ms(now) + 1),
        };
        assert!(shorter.replaces(Some(&long_lived)));
        // One issued before the local one, and dying before it, is not.
        let earlier = StoredToken {
            access_token: "1000.earlier".into(),
            expires_at_ms: unix_ms(now + Duration::from_secs(1800)),
            issued_at_ms: Some(issued_ms(&long_lived) - 1000),
        };
        assert!(!earlier.replaces(Some(&long_lived)));
        // A restarted replica's token from the token file (installed now, issued long
        // ago) is replaced by the fleet's that lives longer, issued before it was
        // installed (the issue time alone had refused it: a call to Accounts more).
        let from_file =
            Token::new(Secret::new("1000.file".into()), Duration::from_secs(240), 1).unwrap();
        let fleet_s = StoredToken {
            access_token: "1000.fleet".into(),
            expires_at_ms: unix_ms(now + Duration::from_secs(3540)),
            issued_at_ms: Some(unix_ms(now) - 60_000),
        };
        assert!(fleet_s.replaces(Some(&from_file)));
    }

    #[test]
    fn a_stored_token_replaces_only_an_older_different_one() {
        let later = StoredToken {
            access_token: "1000.new".into(),
            expires_at_ms: unix_ms(SystemTime::now() + Duration::from_secs(3600)),
            issued_at_ms: None,
        };
        assert!(later.replaces(None));
        let old = Token::new(Secret::new("1000.old".into()), Duration::from_secs(60), 1).unwrap();
        assert!(later.replaces(Some(&old)));
        let same = Token::new(Secret::new("1000.new".into()), Duration::from_secs(60), 1).unwrap();
        assert!(!later.replaces(Some(&same)));
        let expired = StoredToken {
            access_token: "1000.x".into(),
            expires_at_ms: 1,
            issued_at_ms: Some(0),
        };
        assert!(!expired.replaces(None));
    }
}
