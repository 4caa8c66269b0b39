//! The whole proxy assembled (docs/ARCHITECTURE.md "The parts"): a configuration made
//! ready to serve ([`ready_config`]), then the token cache, the shared store, the token
//! file, the request path and the server wired together and run until shutdown
//! ([`run_with_reload`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::client::RedisTrouble;
use crate::concurrency::{DeskSlots, FleetSlots};
use crate::config::{Config, ConfigError, ZOHO_REFRESHES_PER_10MIN};
use crate::intercept::Intercept;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::record::{RecordError, Recorder, Replay, ReplayError};
use crate::server;
use crate::token::file::{IssuedWith, StoredTokens, TokenFile, TokenSaver};
use crate::token::shared::{SharedSource, SharedStore};
use crate::token::source::{AccountsError, FetchFuture, Refresh};
use crate::token::{AccountsClient, RefreshPolicy, RefreshTokenSource, TokenCache, TokenSource};

/// Why the proxy could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration cannot be used (exit code 2).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A runtime failure (exit code 1).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The recording to replay cannot be used (exit code 2).
    #[error(transparent)]
    Replay(#[from] ReplayError),
    /// The file given to `--record` cannot be recorded to (exit code 2).
    #[error(transparent)]
    Record(#[from] RecordError),
    /// `--replay-strict`: requests found no recorded answer (exit code 1).
    #[error("replay: {count} request(s) found no recorded answer in {file}: {}", missed(*.count, .first))]
    ReplayMissed {
        /// The recording.
        file: String,
        /// How many missed.
        count: u64,
        /// The first of them.
        first: Vec<String>,
    },
}

impl RunError {
    /// Whether the run was refused for its configuration or usage (exit code 2), not
    /// failed while it ran (1).
    pub fn is_usage(&self) -> bool {
        matches!(self, Self::Config(_) | Self::Replay(_) | Self::Record(_))
    }
}

/// A persisted token is reused only when it has at least this long to live.
const REUSE_MIN_REMAINING: Duration = Duration::from_secs(30);

/// Makes a validated configuration ready to serve, as `serve`, `check` and SIGHUP do
/// before anything binds: the refresh token of the token file when the configuration has
/// none, and every condition serving needs — a refresh token, and no listener open to
/// other machines without a key or a CIDR rule (unless explicitly allowed). Every problem
/// is reported at once.
pub fn ready_config(mut config: Config) -> Result<Config, ConfigError> {
    if config.oauth.refresh_token.is_none() {
        config.oauth.refresh_token = config
            .token_file
            .clone()
            .map(TokenFile::new)
            .as_ref()
            .and_then(load_token_file)
            .and_then(|stored| stored.refresh_token);
    }
    let mut problems = Vec::new();
    // A replay answers from its file: it needs no credentials.
    if config.oauth.refresh_token.is_none() && config.record.replay.is_none() {
        problems.push(ConfigError::invalid(
            "oauth.refresh_token",
            "no refresh token: set ZOHO_REFRESH_TOKEN (or oauth.refresh_token), or run `zoho-desk-proxy exchange --code <grant token>` to create one; to try the proxy without credentials, run `zoho-desk-proxy demo`",
        ));
    }
    // Loading to serve reports it with the file's other problems; a config made in code
    // (the demo, tests) is checked here.
    if config.access.refuses(config.listen) {
        problems.push(ConfigError::open_listener(config.listen, None));
    }
    if config.intercept.enabled
        && let Err(err) = crate::intercept::LocalCa::load(&config.intercept.ca_dir, Vec::new())
    {
        problems.push(ConfigError::invalid("intercept.enabled", err.to_string()));
    }
    match ConfigError::all(problems) {
        Some(err) => Err(err),
        None => Ok(config),
    }
}

/// Desk's concurrent calls: counted for the fleet when there is a `token_store`, else
/// for this process.
fn desk_slots(
    config: &Config,
    redis: Option<&redis::Client>,
    metrics: &Arc<Metrics>,
) -> Result<Arc<DeskSlots>, RunError> {
    let limit = config.desk.max_concurrent;
    let Some(redis) = redis else {
        return Ok(Arc::new(DeskSlots::local(
            limit,
            config.max_upstream_requests,
            metrics,
        )));
    };
    // The portal: every replica in front of it counts in the same place.
    let portal = format!(
        "{}\n{}",
        config.upstream,
        config
            .org_id
            .as_ref()
            .and_then(|o| o.to_str().ok())
            .unwrap_or(&config.oauth.client_id)
    );
    let fleet = FleetSlots::new(
        redis.clone(),
        &portal,
        limit,
        config.desk.fleet_lease,
        Arc::clone(metrics),
    )
    .map_err(|e| ConfigError::invalid("token_store", e.to_string()))?;
    fleet.start();
    tracing::info!(
        limit,
        edition = config.desk.edition,
        "Desk concurrency: counted for the fleet in the token store"
    );
    Ok(Arc::new(DeskSlots::fleet(limit, fleet, metrics)))
}

/// Logs what a configuration allows that its operator should know of: `serve` says it at
/// start (`demo`, whose Zoho is a fake, has nothing to warn of).
pub fn warn_about(config: &Config) {
    if config.is_open_remote() {
        tracing::warn!(listen = %config.listen, "listening on a non-loopback address without api_keys or allow_cidrs (access.allow_unauthenticated_remote = true): anyone who reaches this address acts as your Zoho user");
    }
    // Allowed (a test suite against a fake Zoho may need more), but said.
    if config.oauth.max_refreshes_per_10min > ZOHO_REFRESHES_PER_10MIN {
        tracing::warn!(
            max_refreshes_per_10min = config.oauth.max_refreshes_per_10min,
            "oauth.max_refreshes_per_10min is above {ZOHO_REFRESHES_PER_10MIN}: Zoho allows {ZOHO_REFRESHES_PER_10MIN} refreshes per 10 minutes per refresh token, and the refresh guard no longer keeps the proxy under it (past it, Zoho blocks the refresh token for the rest of the window)"
        );
    }
}

/// Runs the proxy on `listener` until `shutdown` resolves, then drains, saves the token
/// file and returns.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    run_with_reload(config, listener, shutdown, None).await
}

/// [`run`], plus reloads: every config received on `reload` (the binary sends one on
/// SIGHUP, made ready by [`ready_config`]) replaces the OAuth credentials and ends a
/// rejection, without a restart.
pub async fn run_with_reload(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    reload: Option<tokio::sync::mpsc::Receiver<Config>>,
) -> Result<(), RunError> {
    let config = ready_config(config)?;
    if config.record.replay.is_some() {
        return run_replay(config, listener, shutdown).await;
    }
    let token_file = config.token_file.clone().map(TokenFile::new);
    let issued_with = IssuedWith::new(config.oauth.refresh_token.as_ref());
    let stored = token_file
        .as_ref()
        .and_then(load_token_file)
        .unwrap_or_default();
    let redis = match &config.token_store {
        Some(url) => Some(redis_at_start(url).await?),
        None => None,
    };
    let metrics = Arc::new(Metrics::new());
    let store = shared_store(&config, redis.as_ref(), &metrics)?;
    let tokens = token_cache(&config, store.as_ref(), Arc::clone(&metrics))?;
    reuse_stored_token(&config, &stored, &tokens);

    let (stop_tasks, tasks_stopped) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let mut tasks: Vec<(&str, JoinHandle<()>)> = vec![(
        "token refresher",
        tokio::spawn(Arc::clone(&tokens).run_background(stopped(tasks_stopped.clone()))),
    )];
    if let Some(file) = token_file {
        let saver = TokenSaver::new(
            file,
            &config.oauth.client_id,
            stored.refresh_token.clone(),
            issued_with.clone(),
        );
        tasks.push((
            "token file",
            tokio::spawn(saver.run(Arc::clone(&tokens), stopped(tasks_stopped.clone()))),
        ));
    }
    if let Some(store) = &store {
        tasks.push((
            "token store follower",
            tokio::spawn(
                Arc::clone(store).follow(Arc::clone(&tokens), stopped(tasks_stopped.clone())),
            ),
        ));
    }
    let store_status = store.as_ref().map(|s| s.status());
    let intercept = intercept_for(&config)?;
    let desk = desk_slots(&config, redis.as_ref(), &metrics)?;
    let recorder = match &config.record.file {
        Some(file) => Some(Recorder::open(
            file,
            config.record.max_body_bytes,
            config.secrets(),
            Arc::clone(&metrics),
        )?),
        None => None,
    };
    let reloader = reload.map(|reload| {
        tokio::spawn(apply_reloads(
            reload,
            Arc::clone(&tokens),
            store.clone(),
            recorder.clone(),
            issued_with,
        ))
    });
    let proxy = Arc::new(
        Proxy::new(config, tokens, metrics)
            .with_store_status(store_status)
            .with_intercept(intercept)
            .with_desk_slots(desk)
            .with_recorder(recorder.clone()),
    );
    tracing::info!(
        listen = %listener.local_addr()?,
        upstream = %proxy.config.upstream,
        accounts = %proxy.config.accounts_url,
        "zoho-desk-proxy listening"
    );
    let served = server::serve(Arc::clone(&proxy), listener, shutdown).await;
    let _ = stop_tasks.send(true);
    if let Some(reloader) = reloader {
        reloader.abort();
    }
    for (name, task) in tasks {
        // A task that panicked is said so, not silently dropped.
        if let Err(err) = task.await
            && err.is_panic()
        {
            tracing::error!(task = name, "a background task panicked during the run");
        }
    }
    if let Some(recorder) = recorder {
        recorder.finish().await;
    }
    served?;
    tracing::info!("zoho-desk-proxy stopped");
    Ok(())
}

/// Transparent mode's CA and hosts, when it is on.
fn intercept_for(config: &Config) -> Result<Option<Arc<Intercept>>, ConfigError> {
    if !config.intercept.enabled {
        return Ok(None);
    }
    let intercept = Intercept::load(&config.intercept)
        .map_err(|e| ConfigError::invalid("intercept.enabled", e.to_string()))?;
    tracing::info!(hosts = ?config.intercept.hosts(), "transparent mode: CONNECT to these hosts is tunnelled");
    Ok(Some(Arc::new(intercept)))
}

/// Serves from a recording: the same request path, answered from the file; no token,
/// no Accounts, no Desk. Lists the requests that missed at the end, and fails when
/// `--replay-strict` was given and any did.
async fn run_replay(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    let Some(path) = config.record.replay.clone() else {
        return Ok(());
    };
    let mut desk_hosts = config.intercept.desk_hosts.clone();
    desk_hosts.push(config.upstream.host());
    let prefix = config.upstream.prefix.clone();
    let secrets = config.secrets();
    let replay = Arc::new(Replay::load(&path, &desk_hosts, &prefix)?.masking(&secrets));
    let metrics = Arc::new(Metrics::new());
    // Never asked for a token: every answer comes from the file.
    let tokens = TokenCache::new(
        NoTokens,
        RefreshPolicy::new(Duration::ZERO, 1),
        Arc::clone(&metrics),
    );
    let intercept = intercept_for(&config)?;
    let strict = config.record.replay_strict;
    // Nothing goes to Desk: the proxy's own local Desk slots are never taken.
    let proxy = Arc::new(
        Proxy::new(config, tokens, metrics)
            .with_intercept(intercept)
            .with_replay(Some(Arc::clone(&replay))),
    );
    tracing::info!(
        listen = %listener.local_addr()?,
        recording = %path.display(),
        "zoho-desk-proxy listening, replaying"
    );
    server::serve(Arc::clone(&proxy), listener, shutdown).await?;
    let (count, first) = replay.misses();
    if count > 0 {
        tracing::warn!(count, missed = %missed(count, &first), "replay: requests with no recorded answer");
        if strict {
            return Err(RunError::ReplayMissed {
                file: path.display().to_string(),
                count,
                first,
            });
        }
    }
    tracing::info!("zoho-desk-proxy stopped");
    Ok(())
}

/// The `first` of `count` misses, and how many more there were.
fn missed(count: u64, first: &[String]) -> String {
    let listed = first.join("; ");
    match count.saturating_sub(first.len() as u64) {
        0 => listed,
        left => format!("{listed}; and {left} more"),
    }
}

/// The token source of a replay: there is none to ask.
struct NoTokens;

impl TokenSource for NoTokens {
    fn fetch<'a>(&'a self, _refresh: &'a Refresh<'a>) -> FetchFuture<'a> {
        Box::pin(async {
            Err(AccountsError::Unreachable(
                "replaying a recording: no tokens".into(),
            ))
        })
    }
}

/// Installs the token file's access token when it belongs to these credentials and has
/// life left, so that a restart costs no Accounts call.
fn reuse_stored_token(config: &Config, stored: &StoredTokens, tokens: &TokenCache) {
    if let Some(refresh_token) = &config.oauth.refresh_token
        && let Some((token, remaining)) =
            stored.valid_access_token(&config.oauth.client_id, refresh_token, REUSE_MIN_REMAINING)
        && let Some(installed) = tokens.install(token, remaining)
    {
        tracing::info!(
            expires_in_secs = installed.lifetime.as_secs(),
            "reusing the access token of the token file"
        );
    }
}

/// The token source of a config: Zoho Accounts with the refresh token.
fn token_source(config: &Config) -> Result<RefreshTokenSource, ConfigError> {
    let refresh_token = config
        .oauth
        .refresh_token
        .clone()
        .ok_or_else(|| ConfigError::Missing {
            key: "oauth.refresh_token",
            file: "the configuration file".into(),
            env: "ZOHO_REFRESH_TOKEN",
            hint: ", or store one in the token file with `zoho-desk-proxy exchange --code <grant token>`",
        })?;
    Ok(RefreshTokenSource {
        client: AccountsClient::from_config(config),
        refresh_token,
    })
}

/// The Redis of `token_store`, opened once for the store and the fleet's count, after one
/// `PING`: at start, a URL that is no Redis's or a Redis that refuses this proxy is the
/// configuration's fault; one that cannot be reached is an outage, ridden out.
async fn redis_at_start(url: &str) -> Result<redis::Client, ConfigError> {
    let refused = |trouble: RedisTrouble| ConfigError::invalid("token_store", trouble.to_string());
    let client = crate::client::redis_client(url).map_err(refused)?;
    match crate::client::redis_ping(&client).await {
        Ok(()) | Err(RedisTrouble::Unreachable(_)) => Ok(client),
        Err(trouble) => Err(refused(trouble)),
    }
}

/// The shared token store of a config (`token_store`), if any.
fn shared_store(
    config: &Config,
    redis: Option<&redis::Client>,
    metrics: &Arc<Metrics>,
) -> Result<Option<Arc<SharedStore>>, ConfigError> {
    let (Some(redis), Some(refresh_token)) = (redis, &config.oauth.refresh_token) else {
        return Ok(None);
    };
    // A replica waits for another's refresh longer than the slowest Accounts call, with
    // room for the Redis commands around it.
    let wait_limit = AccountsClient::call_timeout(config) * 2 + Duration::from_secs(1);
    SharedStore::new(
        redis.clone(),
        &config.oauth.client_id,
        refresh_token,
        wait_limit,
        config.oauth.max_refreshes_per_10min,
        Arc::clone(metrics),
    )
    .map(Some)
    .map_err(|e| ConfigError::invalid("token_store", e.to_string()))
}

/// Where new tokens come from: Accounts, through the shared store when there is one.
fn source_for(
    config: &Config,
    store: Option<&Arc<SharedStore>>,
) -> Result<Box<dyn TokenSource>, ConfigError> {
    let accounts = token_source(config)?;
    Ok(match store {
        Some(store) => Box::new(SharedSource {
            store: Arc::clone(store),
            accounts,
        }),
        None => Box::new(accounts),
    })
}

/// Builds the token cache of a config.
fn token_cache(
    config: &Config,
    store: Option<&Arc<SharedStore>>,
    metrics: Arc<Metrics>,
) -> Result<Arc<TokenCache>, ConfigError> {
    let policy = RefreshPolicy::new(
        config.oauth.refresh_margin,
        config.oauth.max_refreshes_per_10min,
    );
    Ok(TokenCache::new(source_for(config, store)?, policy, metrics))
}

/// Applies reloaded configs to the token source; has the recording, if any, mask their
/// secrets too, and the token file name their refresh token.
async fn apply_reloads(
    mut reload: tokio::sync::mpsc::Receiver<Config>,
    tokens: Arc<TokenCache>,
    store: Option<Arc<SharedStore>>,
    recorder: Option<Arc<Recorder>>,
    issued_with: IssuedWith,
) {
    while let Some(config) = reload.recv().await {
        let ready = ready_config(config).and_then(|config| {
            let source = source_for(&config, store.as_ref())?;
            Ok((source, config))
        });
        match ready {
            Ok((source, config)) => {
                if let Some(recorder) = &recorder {
                    recorder.mask_also(config.secrets());
                }
                issued_with.set(config.oauth.refresh_token.as_ref());
                tokens.replace_source(source);
                tracing::info!("credentials reloaded; refreshing with them as needed");
            }
            Err(err) => tracing::error!(error = %err, "reload ignored"),
        }
    }
}

/// Reads the token file; a missing file is normal, a broken one is logged and ignored
/// (the proxy refreshes instead).
fn load_token_file(file: &TokenFile) -> Option<StoredTokens> {
    match file.load() {
        Ok(stored) => stored,
        Err(err) => {
            tracing::warn!(error = %err, "ignoring the token file; a new access token will be requested");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_misses_listed_say_how_many_were_left_out() {
        let err = RunError::ReplayMissed {
            file: "r.har".into(),
            count: 303,
            first: vec!["GET /a".into(), "GET /b".into()],
        };
        assert_eq!(
            err.to_string(),
            "replay: 303 request(s) found no recorded answer in r.har: GET /a; GET /b; and 301 more"
        );
        assert_eq!(
            missed(2, &["GET /a".into(), "GET /b".into()]),
            "GET /a; GET /b"
        );
    }
}
