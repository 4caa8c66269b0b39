//! Desk's concurrency limit for a fleet of replicas (README "Desk's limits"): a counting
//! semaphore in Redis whose holds are leases.
//!
//! - A replica takes one of the fleet's calls with a script that first drops expired
//!   leases, so a replica that dies (SIGKILL, lost host) gives its calls back within one
//!   lease (`desk.fleet_lease_secs`). A live replica renews the leases it holds every third
//!   of a lease, and counts the replicas alive.
//! - Waiting is fair between replicas: each replica sends one waiter at a time to the
//!   fleet's line (its own requests wait behind it in arrival order), and the line is
//!   served in the order replicas joined it. A waiter that stops asking leaves the line
//!   after [`ALIVE`]; one whose client left is removed at once.
//! - A release publishes a message that wakes the waiters; they also look again every
//!   [`POLL`], so a lost message costs at most that.
//! - When Redis fails, the replica keeps to its share of the limit (the limit divided by
//!   the most replicas it saw alive over the last [`REPLICAS_REMEMBERED`] leases, so that
//!   the gap of a Redis restart, while replicas register again, does not shrink the count;
//!   a replica that never reached Redis keeps to one call), the calls it still holds
//!   through Redis counted in it; says so in the log, the metrics and `/_proxy/ready`. Its
//!   renewals (every third of a lease) try Redis again, and the first that works
//!   registers every call the replica holds, those taken alone included, and brings it
//!   back to the fleet's count.
//! - When Redis has lost calls from its count (a restart, a flush, a rollback, an
//!   eviction), the first replica to notice pauses the whole fleet's new calls for half
//!   a lease, longer than a renewal period, so that every replica's calls are counted
//!   again before anyone goes on. A replica notices its own calls missing whenever its
//!   waiter looks at the line and at every renewal, and a new life of the keys by the
//!   count's epoch (a key written once per life of the keys).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

use super::Held;
use crate::metrics::Metrics;

/// How often a waiter looks again when no release message arrives.
const POLL: Duration = Duration::from_millis(100);
/// How long a waiter keeps its place in the line without asking again.
const ALIVE: Duration = Duration::from_secs(2);
/// Timeout of a single Redis command.
const COMMAND_TIMEOUT: Duration = crate::client::REDIS_COMMAND_TIMEOUT;
/// Keys nobody touches for this long expire.
const KEY_TTL_MS: u64 = 3_600_000;
/// For how many leases the most replicas seen alive are remembered: a count that drops
/// for less (replicas registering again after a Redis restart) is not believed.
const REPLICAS_REMEMBERED: u32 = 6;
/// The end of the id of a call taken while Redis failed: Redis never counted it, so its
/// absence there is no sign that Redis lost anything.
const ON_SHARE: &str = ":alone";

/// Why the fleet's count cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// Redis failed or could not be reached.
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis did not answer in time.
    #[error("Redis did not answer within {} s", COMMAND_TIMEOUT.as_secs())]
    Timeout,
}

/// The count's epoch (KEYS[1] epoch, KEYS[2] recovering; the caller's ARGV[1] epoch seen,
/// or "", ARGV[2] a new epoch, ARGV[3] the pause ms, ARGV[4] key ttl ms): a caller that
/// knew another epoch, or one that is gone, learns that Redis lost the keys, and pauses
/// the taking of new calls while every replica registers its holds again.
const EPOCH: &str = r"
local function epoch(k_epoch, k_recovering, seen, fresh, pause, ttl)
  local current = redis.call('GET', k_epoch)
  if not current then
    current = fresh
    redis.call('SET', k_epoch, current)
  end
  redis.call('PEXPIRE', k_epoch, ttl)
  if seen ~= '' and current ~= seen then
    redis.call('SET', k_recovering, current, 'PX', pause, 'NX')
  end
  return current
end
";

/// Takes one of the fleet's calls for `id`, or puts `id` in line (KEYS: holders, line,
/// alive, tickets, epoch, recovering; ARGV: epoch seen, new epoch, pause ms, key ttl ms,
/// limit, lease ms, id, alive ms, the ids of the calls the replica holds…). Returns
/// {1 when taken else 0, the epoch, the calls the fleet holds, the held ids Redis does
/// not hold}: with any of those, nothing is taken (the count is short of them, and
/// perhaps of other replicas' too; see [`REGISTER`]).
const ACQUIRE: &str = r"
local current = epoch(KEYS[5], KEYS[6], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id = ARGV[7]
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do
  redis.call('ZREM', KEYS[2], gone)
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
if not redis.call('ZSCORE', KEYS[2], id) then
  redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[4]), id)
end
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[8]), id)
for i = 2, 4 do redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[4])) end
local missing = {}
for i = 9, #ARGV do
  if not redis.call('ZSCORE', KEYS[1], ARGV[i]) then table.insert(missing, ARGV[i]) end
end
if #missing > 0 or redis.call('EXISTS', KEYS[6]) == 1 then
  return {0, current, redis.call('ZCARD', KEYS[1]), missing}
end
local free = tonumber(ARGV[5]) - redis.call('ZCARD', KEYS[1])
if free > 0 and redis.call('ZRANK', KEYS[2], id) < free then
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZREM', KEYS[3], id)
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[6]), id)
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]))
  return {1, current, redis.call('ZCARD', KEYS[1]), missing}
end
return {0, current, redis.call('ZCARD', KEYS[1]), missing}";

/// Renews this replica's leases that Redis holds and says it is alive (KEYS: holders,
/// replicas, epoch, recovering; ARGV: epoch seen, new epoch, pause ms, key ttl ms, lease
/// ms, replica, replica ttl ms, ids…). Returns {replicas alive, the epoch, the calls the
/// fleet holds, the ids Redis did not hold}: a lease is not put back here, since its
/// call may have ended since the ids were listed ([`REGISTER`] puts back those that
/// have not).
const RENEW: &str = r"
local current = epoch(KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local missing = {}
for i = 8, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[5]), ARGV[i])
  else
    table.insert(missing, ARGV[i])
  end
end
if #ARGV >= 8 then redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4])) end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[7]), ARGV[6])
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[4]))
return {redis.call('ZCARD', KEYS[2]), current, redis.call('ZCARD', KEYS[1]), missing}";

/// Puts back calls this replica holds that Redis' count lacks (lost keys, a rollback, an
/// eviction, or calls taken while Redis failed), and, when calls Redis had counted are
/// among them, pauses the fleet's new calls, since other replicas' calls may be missing
/// too (KEYS: holders, recovering; ARGV: lease ms, pause ms or 0, key ttl ms, ids…).
/// Returns the calls the fleet holds.
const REGISTER: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 4, #ARGV do
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[2], 'registered', 'PX', tonumber(ARGV[2]), 'NX')
end
return redis.call('ZCARD', KEYS[1])";

static ACQUIRE_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(&format!("{EPOCH}{ACQUIRE}")));
static RENEW_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(&format!("{EPOCH}{RENEW}")));
static REGISTER_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(REGISTER));

/// The keys of one portal's count.
#[derive(Debug, Clone)]
struct Keys {
    holders: String,
    line: String,
    alive: String,
    tickets: String,
    replicas: String,
    epoch: String,
    recovering: String,
    channel: String,
}

impl Keys {
    /// Keys under `zoho-desk-proxy:{<hash of the portal>}:desk:` (one hash slot).
    fn new(portal: &str) -> Self {
        let digest = Sha256::digest(portal.as_bytes());
        let ns: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
        let prefix = format!("zoho-desk-proxy:{{{ns}}}:desk");
        Self {
            holders: format!("{prefix}:holders"),
            line: format!("{prefix}:line"),
            alive: format!("{prefix}:alive"),
            tickets: format!("{prefix}:tickets"),
            replicas: format!("{prefix}:replicas"),
            epoch: format!("{prefix}:epoch"),
            recovering: format!("{prefix}:recovering"),
            channel: format!("{prefix}:released"),
        }
    }
}

/// The fleet's state, for `/_proxy/ready`.
#[derive(Debug, Clone)]
pub struct FleetStatus {
    /// `None` while Redis answers; else why this replica keeps to its share.
    pub degraded: Option<String>,
    /// This replica's share of the limit while degraded.
    pub share: usize,
    /// Replicas alive when last counted (this one included).
    pub replicas: usize,
    /// The calls the whole fleet held when Redis last answered.
    pub fleet_held: usize,
}

/// The fleet's count of Desk's concurrent calls, as one replica sees it.
pub struct FleetSlots {
    client: redis::Client,
    conn: ConnectionManager,
    keys: Keys,
    /// This replica's name in Redis.
    replica: String,
    limit: usize,
    lease: Duration,
    next_id: AtomicU64,
    /// One waiter of this replica in the fleet's line at a time; the others wait here,
    /// in arrival order.
    door: tokio::sync::Mutex<()>,
    /// The calls this replica holds, through Redis or on its share while Redis fails;
    /// their leases are renewed by [`FleetSlots::start`]'s task.
    held: Mutex<HashSet<String>>,
    /// Woken when a call is released anywhere in the fleet, and when this replica goes
    /// back to the fleet's count.
    released: Notify,
    /// The count's epoch this replica last saw in Redis; empty before Redis first
    /// answered.
    epoch: Mutex<String>,
    /// The most replicas seen alive lately (see [`remembered`]), 0 before Redis first
    /// answered, and since when that count was last seen.
    replicas_memory: Mutex<(usize, Instant)>,
    /// The calls the fleet held when Redis last answered.
    fleet_held: AtomicUsize,
    degraded: AtomicBool,
    last_error: Mutex<Option<String>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for FleetSlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetSlots")
            .field("replica", &self.replica)
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl FleetSlots {
    /// The count of `limit` calls for `portal` (what names the portal: the same for every
    /// replica of it) in `client`'s Redis, with leases of `lease`; connects lazily.
    pub fn new(
        client: redis::Client,
        portal: &str,
        limit: usize,
        lease: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, FleetError> {
        let conn = crate::client::redis_connection(&client)?;
        Ok(Arc::new(Self {
            client,
            conn,
            keys: Keys::new(portal),
            replica: format!("{:016x}", fastrand::u64(..)),
            limit,
            lease,
            next_id: AtomicU64::new(0),
            door: tokio::sync::Mutex::new(()),
            held: Mutex::default(),
            released: Notify::new(),
            epoch: Mutex::default(),
            replicas_memory: Mutex::new((0, Instant::now())),
            fleet_held: AtomicUsize::new(0),
            degraded: AtomicBool::new(false),
            last_error: Mutex::new(None),
            metrics,
        }))
    }

    /// Starts the tasks that renew this replica's leases and listen for releases; they
    /// end when the count is dropped.
    pub fn start(self: &Arc<Self>) {
        tokio::spawn(renew_loop(Arc::downgrade(self)));
        tokio::spawn(listen_loop(Arc::downgrade(self)));
    }

    /// The fleet's state as this replica sees it.
    pub fn status(&self) -> FleetStatus {
        let degraded = self.degraded.load(Ordering::Acquire).then(|| {
            lock(&self.last_error)
                .clone()
                .unwrap_or_else(|| "Redis is unreachable".into())
        });
        FleetStatus {
            degraded,
            share: self.share_of_limit(),
            replicas: self.replicas_seen(),
            fleet_held: self.fleet_held.load(Ordering::Acquire),
        }
    }

    /// The most replicas seen alive lately; 0 before Redis first answered.
    fn replicas_seen(&self) -> usize {
        lock(&self.replicas_memory).0
    }

    /// Its part of the limit, at least one; only one before it ever saw the fleet (how
    /// many replicas share the limit is not known then, and Desk's limit must hold).
    fn share_of_limit(&self) -> usize {
        match self.replicas_seen() {
            0 => 1,
            replicas => (self.limit / replicas).max(1),
        }
    }

    /// Waits for one of the fleet's calls (or, while Redis fails, one of this replica's
    /// share).
    pub(super) async fn acquire(self: &Arc<Self>) -> Held {
        let _door = self.door.lock().await;
        loop {
            let held = if self.degraded.load(Ordering::Acquire) {
                self.on_share().await
            } else {
                self.through_redis().await
            };
            if let Some(held) = held {
                return held;
            }
        }
    }

    /// Waits in the fleet's line for a call; `None` when Redis fails meanwhile.
    async fn through_redis(self: &Arc<Self>) -> Option<Held> {
        let id = self.new_id();
        let mut line = InLine {
            fleet: self,
            id: Some(id.clone()),
        };
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            match self.try_acquire(&id).await {
                Ok(true) => {
                    line.id = None;
                    self.redis_ok();
                    return Some(self.hold(id));
                }
                Ok(false) => {}
                Err(err) => {
                    // Leaving (and giving back a call taken by an answer that was lost)
                    // is tried; else its place and any such call expire.
                    self.redis_failed(&err);
                    return None;
                }
            }
            tokio::select! {
                () = &mut released => {}
                () = tokio::time::sleep(POLL) => {}
            }
        }
    }

    /// Waits until this replica holds fewer calls than its share (those it took through
    /// Redis before it failed count too); `None` when Redis answers again meanwhile.
    async fn on_share(self: &Arc<Self>) -> Option<Held> {
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if !self.degraded.load(Ordering::Acquire) {
                return None;
            }
            let allowed = self.share_of_limit();
            let id = {
                let mut held = lock(&self.held);
                (held.len() < allowed).then(|| {
                    let id = format!("{}{ON_SHARE}", self.new_id());
                    held.insert(id.clone());
                    id
                })
            };
            if let Some(id) = id {
                return Some(self.permit(id));
            }
            released.await;
        }
    }

    fn new_id(&self) -> String {
        format!(
            "{}:{}",
            self.replica,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Counts `id`, taken through Redis, as held by this replica.
    fn hold(self: &Arc<Self>, id: String) -> Held {
        lock(&self.held).insert(id.clone());
        self.permit(id)
    }

    /// The permit of `id`, a call this replica counts as held.
    fn permit(self: &Arc<Self>, id: String) -> Held {
        Held::Fleet(FleetPermit {
            fleet: Arc::clone(self),
            id,
        })
    }

    async fn try_acquire(&self, id: &str) -> Result<bool, FleetError> {
        let mut conn = self.conn.clone();
        let mut invocation = ACQUIRE_SCRIPT.prepare_invoke();
        invocation
            .key(&self.keys.holders)
            .key(&self.keys.line)
            .key(&self.keys.alive)
            .key(&self.keys.tickets)
            .key(&self.keys.epoch)
            .key(&self.keys.recovering);
        self.epoch_args(&mut invocation);
        invocation
            .arg(self.limit)
            .arg(millis(self.lease))
            .arg(id)
            .arg(millis(ALIVE));
        // Each look checks that Redis still counts this replica's calls.
        for held in lock(&self.held).iter() {
            invocation.arg(held);
        }
        let invoke = invocation.invoke_async::<(i64, String, usize, Vec<String>)>(&mut conn);
        let (taken, epoch, fleet_held, missing) = tokio::time::timeout(COMMAND_TIMEOUT, invoke)
            .await
            .map_err(|_| FleetError::Timeout)??;
        self.saw_epoch(epoch);
        self.fleet_held.store(fleet_held, Ordering::Release);
        self.put_back(missing).await?;
        Ok(taken == 1)
    }

    /// The epoch's arguments of both scripts: the epoch seen, a new one, the pause and
    /// the keys' time to live.
    fn epoch_args(&self, invocation: &mut redis::ScriptInvocation<'_>) {
        invocation
            .arg(lock(&self.epoch).as_str())
            .arg(format!("{:016x}", fastrand::u64(..)))
            .arg(millis(self.lease / 2))
            .arg(KEY_TTL_MS);
    }

    /// Remembers the epoch Redis answered with; says so when it is not the one seen
    /// before (Redis lost the keys: the fleet takes no new call for half a lease).
    fn saw_epoch(&self, epoch: String) {
        let mut seen = lock(&self.epoch);
        if *seen != epoch {
            if !seen.is_empty() {
                tracing::warn!(
                    pause_ms = millis(self.lease / 2),
                    "Desk concurrency: Redis lost the fleet's count (restarted or flushed?); no new call to Desk until every replica has registered its calls again"
                );
            }
            *seen = epoch;
        }
    }

    fn redis_ok(&self) {
        if self.degraded.swap(false, Ordering::AcqRel) {
            tracing::info!(
                limit = self.limit,
                "Desk concurrency: Redis answers again; back to the fleet's count"
            );
            // A waiter on the share goes to the fleet's line.
            self.released.notify_waiters();
        }
    }

    fn redis_failed(&self, err: &FleetError) {
        *lock(&self.last_error) = Some(err.to_string());
        if !self.degraded.swap(true, Ordering::AcqRel) {
            self.metrics.record_desk_fleet_fallback();
            tracing::warn!(
                error = %err,
                held = lock(&self.held).len(),
                share = self.share_of_limit(),
                limit = self.limit,
                replicas = self.replicas_seen(),
                "Desk concurrency: Redis failed; keeping to this replica's share of desk.max_concurrent (the calls it holds counted) until it is back"
            );
        }
    }

    /// Gives a call back to the fleet (in a task: called from a drop).
    fn release(self: &Arc<Self>, id: String) {
        lock(&self.held).remove(&id);
        // A waiter on this replica's share goes on at once.
        self.released.notify_waiters();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // No runtime left: the lease expires by itself.
        };
        let fleet = Arc::clone(self);
        runtime.spawn(async move {
            if let Err(error) = fleet.give_back(&[id]).await {
                tracing::debug!(%error, "Desk concurrency: a release failed; its lease expires by itself");
            }
            fleet.released.notify_waiters();
        });
    }

    /// Takes `ids` out of the fleet's count and wakes the fleet's waiters.
    async fn give_back(&self, ids: &[String]) -> Result<(), FleetError> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.zrem(&self.keys.holders, ids)
            .ignore()
            .publish(&self.keys.channel, "released")
            .ignore();
        tokio::time::timeout(COMMAND_TIMEOUT, pipe.query_async::<()>(&mut conn))
            .await
            .map_err(|_| FleetError::Timeout)??;
        Ok(())
    }

    /// Leaves the line (a waiter whose client went away).
    fn leave(self: &Arc<Self>, id: String) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let fleet = Arc::clone(self);
        runtime.spawn(async move {
            let mut conn = fleet.conn.clone();
            let mut pipe = redis::pipe();
            // The script may have taken the call for it just before it left.
            pipe.zrem(&fleet.keys.line, &id)
                .ignore()
                .zrem(&fleet.keys.alive, &id)
                .ignore()
                .zrem(&fleet.keys.holders, &id)
                .ignore();
            let left = pipe.query_async::<()>(&mut conn);
            // On failure the place expires after ALIVE.
            let _ = tokio::time::timeout(COMMAND_TIMEOUT, left).await;
        });
    }

    /// Renews the leases held and counts the replicas alive; puts back the calls held
    /// that Redis' count lacks.
    async fn renew(&self) -> Result<(), FleetError> {
        let held: Vec<String> = lock(&self.held).iter().cloned().collect();
        let mut script = RENEW_SCRIPT.prepare_invoke();
        script
            .key(&self.keys.holders)
            .key(&self.keys.replicas)
            .key(&self.keys.epoch)
            .key(&self.keys.recovering);
        self.epoch_args(&mut script);
        script
            .arg(millis(self.lease))
            .arg(&self.replica)
            .arg(millis(self.lease));
        for id in &held {
            script.arg(id);
        }
        let mut conn = self.conn.clone();
        let (replicas, epoch, fleet_held, missing): (usize, String, usize, Vec<String>) =
            tokio::time::timeout(COMMAND_TIMEOUT, script.invoke_async(&mut conn))
                .await
                .map_err(|_| FleetError::Timeout)??;
        self.saw_epoch(epoch);
        self.fleet_held.store(fleet_held, Ordering::Release);
        let memory = self.lease * REPLICAS_REMEMBERED;
        {
            let mut seen = lock(&self.replicas_memory);
            *seen = remembered(*seen, replicas.max(1), Instant::now(), memory);
        }
        self.put_back(missing).await
    }

    /// Puts back the calls of `missing` (listed as held, and missing from Redis' count)
    /// that this replica still holds; when calls Redis had counted are among them, Redis
    /// lost some, and the fleet's new calls pause meanwhile.
    async fn put_back(&self, missing: Vec<String>) -> Result<(), FleetError> {
        if missing.is_empty() {
            return Ok(());
        }
        // Those still held: a call may have ended since the list was made.
        let (missing, held): (Vec<String>, usize) = {
            let held = lock(&self.held);
            let missing = missing.into_iter().filter(|id| held.contains(id)).collect();
            (missing, held.len())
        };
        if missing.is_empty() {
            return Ok(());
        }
        let lost = missing.iter().filter(|id| !id.ends_with(ON_SHARE)).count();
        let pause = if lost > 0 {
            self.lease / 2
        } else {
            Duration::ZERO
        };
        let mut register = REGISTER_SCRIPT.prepare_invoke();
        register
            .key(&self.keys.holders)
            .key(&self.keys.recovering)
            .arg(millis(self.lease))
            .arg(u64::try_from(pause.as_millis()).unwrap_or(u64::MAX))
            .arg(KEY_TTL_MS);
        for id in &missing {
            register.arg(id);
        }
        let mut conn = self.conn.clone();
        let fleet_held: usize =
            tokio::time::timeout(COMMAND_TIMEOUT, register.invoke_async(&mut conn))
                .await
                .map_err(|_| FleetError::Timeout)??;
        self.fleet_held.store(fleet_held, Ordering::Release);
        // A call that ended meanwhile (its release may have reached Redis first) is not
        // left counted.
        let ended: Vec<String> = {
            let held = lock(&self.held);
            missing
                .iter()
                .filter(|id| !held.contains(*id))
                .cloned()
                .collect()
        };
        if !ended.is_empty() {
            // On failure their leases expire.
            let _ = self.give_back(&ended).await;
        }
        if lost > 0 {
            tracing::warn!(
                missing = lost,
                held,
                pause_ms = millis(pause),
                "Desk concurrency: calls this replica holds were missing from the fleet's count (Redis restarted, flushed, rolled back or evicted keys); they are registered again, and the fleet takes no new call until every replica has done so"
            );
        } else {
            tracing::info!(
                registered = missing.len(),
                "Desk concurrency: the calls this replica took while Redis failed are counted in the fleet's count"
            );
        }
        Ok(())
    }
}

/// The replicas to count on after a renewal saw `alive`, given the most seen lately and
/// since when: a higher or equal count is taken at once, a lower one only once the higher
/// has not been seen for `memory`.
fn remembered(
    (most, since): (usize, Instant),
    alive: usize,
    now: Instant,
    memory: Duration,
) -> (usize, Instant) {
    if alive >= most || now.saturating_duration_since(since) > memory {
        (alive, now)
    } else {
        (most, since)
    }
}

/// A waiter's place in the fleet's line, left when the waiter goes away before its turn.
struct InLine<'a> {
    fleet: &'a Arc<FleetSlots>,
    id: Option<String>,
}

impl Drop for InLine<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.fleet.leave(id);
        }
    }
}

/// One of the fleet's calls; given back when dropped.
pub struct FleetPermit {
    fleet: Arc<FleetSlots>,
    id: String,
}

impl std::fmt::Debug for FleetPermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetPermit").field("id", &self.id).finish()
    }
}

impl Drop for FleetPermit {
    fn drop(&mut self) {
        self.fleet.release(std::mem::take(&mut self.id));
    }
}

/// Renews the leases every third of a lease, and notices Redis coming back.
async fn renew_loop(fleet: Weak<FleetSlots>) {
    loop {
        let every = match fleet.upgrade() {
            Some(fleet) => {
                match fleet.renew().await {
                    Ok(()) => fleet.redis_ok(),
                    Err(err) => fleet.redis_failed(&err),
                }
                fleet.lease / 3
            }
            None => return,
        };
        tokio::time::sleep(every).await;
    }
}

/// Wakes the waiters whenever a call is released anywhere in the fleet.
async fn listen_loop(fleet: Weak<FleetSlots>) {
    loop {
        let Some((client, channel)) = fleet
            .upgrade()
            .map(|f| (f.client.clone(), f.keys.channel.clone()))
        else {
            return;
        };
        if let Ok(Ok(mut pubsub)) =
            tokio::time::timeout(COMMAND_TIMEOUT, client.get_async_pubsub()).await
            && pubsub.subscribe(&channel).await.is_ok()
        {
            let mut messages = pubsub.on_message();
            while messages.next().await.is_some() {
                match fleet.upgrade() {
                    Some(fleet) => fleet.released.notify_waiters(),
                    None => return,
                }
            }
        }
        // Redis is away: waiters poll meanwhile.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_replicas_seen_are_remembered_for_a_while() {
        let memory = Duration::from_secs(60);
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        // A first count, then a higher one: taken at once.
        let seen = remembered((0, start), 1, at(1), memory);
        assert_eq!(seen, (1, at(1)));
        let seen = remembered(seen, 3, at(2), memory);
        assert_eq!(seen, (3, at(2)));
        // Fewer for a while (a Redis restart, replicas registering again): not believed.
        let seen = remembered(seen, 1, at(30), memory);
        assert_eq!(seen, (3, at(2)));
        let seen = remembered(seen, 3, at(40), memory);
        assert_eq!(seen, (3, at(40)));
        // Fewer for longer than the memory: a replica left.
        let seen = remembered(seen, 2, at(90), memory);
        assert_eq!(seen, (3, at(40)));
        let seen = remembered(seen, 2, at(101), memory);
        assert_eq!(seen, (2, at(101)));
    }
}
