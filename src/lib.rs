//! zoho-desk-proxy: a local reverse proxy for the Zoho Desk API that injects a fresh
//! `Authorization: Zoho-oauthtoken …` into every request and renews the token atomically.
//!
//! The whole proxy is [`run`]: it takes its configuration, a bound listener and a shutdown
//! signal, so that tests and the `demo` command drive it in-process.

pub mod access;
pub mod admin;
pub mod body;
pub mod budget;
pub mod cli;
pub mod client;
pub mod config;
pub mod connection;
pub mod demo;
pub mod detect;
pub mod error;
pub mod fake_zoho;
pub mod headers;
pub mod metrics;
pub mod observe;
pub mod ops;
pub mod paths;
pub mod proxy;
pub mod secret;
pub mod server;
pub mod target;
pub mod token;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::access::AccessPolicy;
use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::token::shared::{SharedSource, SharedStore};
use crate::token::store::{StoredTokens, TokenFile, TokenSaver};
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
}

/// Checks what `serve` needs beyond a parseable config: a refresh token, valid access
/// rules, and no unauthenticated listener on a non-loopback address.
pub fn check_startup(config: &Config) -> Result<(), ConfigError> {
    if config.oauth.refresh_token.is_none() {
        return Err(ConfigError::Invalid {
            key: "oauth.refresh_token",
            reason: "no refresh token: set ZOHO_REFRESH_TOKEN (or oauth.refresh_token), or run `zoho-desk-proxy exchange --code <grant token>` to create one".into(),
        });
    }
    AccessPolicy::validate(config)?;
    if config.is_open_remote() && !config.access.allow_unauthenticated_remote {
        return Err(ConfigError::Invalid {
            key: "listen",
            reason: format!(
                "{} is reachable from other machines, and anyone who reaches the proxy acts as your Zoho user. Set access.api_keys or access.allow_cidrs, or, in a private CI network, access.allow_unauthenticated_remote = true",
                config.listen
            ),
        });
    }
    Ok(())
}

/// The token source of a config: Zoho Accounts with the refresh token.
pub fn token_source(config: &Config) -> Result<RefreshTokenSource, ConfigError> {
    let refresh_token = config
        .oauth
        .refresh_token
        .clone()
        .ok_or(ConfigError::Missing {
            key: "oauth.refresh_token",
            env: "ZOHO_REFRESH_TOKEN",
        })?;
    let client = AccountsClient::from_config(config);
    Ok(RefreshTokenSource {
        client,
        refresh_token,
    })
}

/// The shared token store of a config (`token_store`), if any.
pub fn shared_store(
    config: &Config,
    metrics: &Arc<Metrics>,
) -> Result<Option<Arc<SharedStore>>, ConfigError> {
    let (Some(url), Some(refresh_token)) = (&config.token_store, &config.oauth.refresh_token)
    else {
        return Ok(None);
    };
    // The lock outlives the slowest Accounts call, with room for the Redis commands
    // around it.
    let lock_ttl = AccountsClient::call_timeout(config) * 2 + std::time::Duration::from_secs(1);
    SharedStore::new(
        url,
        &config.oauth.client_id,
        refresh_token,
        lock_ttl,
        config.oauth.max_refreshes_per_10min,
        Arc::clone(metrics),
    )
    .map(Some)
    .map_err(|e| ConfigError::Invalid {
        key: "token_store",
        reason: e.to_string(),
    })
}

/// Where new tokens come from: Accounts, through the shared store when there is one.
pub fn source_for(
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
pub fn token_cache(
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
/// SIGHUP) replaces the OAuth credentials and ends a rejection, without a restart.
pub async fn run_with_reload(
    mut config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    reload: Option<tokio::sync::mpsc::Receiver<Config>>,
) -> Result<(), RunError> {
    let token_file = config.token_file.clone().map(TokenFile::new);
    let stored = token_file
        .as_ref()
        .and_then(load_token_file)
        .unwrap_or_default();
    if config.oauth.refresh_token.is_none() {
        config.oauth.refresh_token = stored.refresh_token.clone();
    }
    check_startup(&config)?;
    let metrics = Arc::new(Metrics::new());
    let store = shared_store(&config, &metrics)?;
    let tokens = token_cache(&config, store.as_ref(), Arc::clone(&metrics))?;
    if let Some((token, remaining)) =
        stored.valid_access_token(&config.oauth.client_id, REUSE_MIN_REMAINING)
        && tokens.install(token, remaining).is_some()
    {
        tracing::info!(
            expires_in_secs = remaining.as_secs(),
            "reusing the access token of the token file"
        );
    }
    if config.is_open_remote() {
        tracing::warn!(listen = %config.listen, "listening on a non-loopback address without api_keys or allow_cidrs (access.allow_unauthenticated_remote = true): anyone who reaches this address acts as your Zoho user");
    }

    let (stop_tasks, tasks_stopped) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let refresher =
        tokio::spawn(Arc::clone(&tokens).run_background(stopped(tasks_stopped.clone())));
    let persister = token_file.clone().map(|file| {
        let saver = TokenSaver::new(file, &config.oauth.client_id, stored.refresh_token.clone());
        tokio::spawn(saver.run(Arc::clone(&tokens), stopped(tasks_stopped.clone())))
    });

    let follower = store.as_ref().map(|store| {
        tokio::spawn(Arc::clone(store).follow(Arc::clone(&tokens), stopped(tasks_stopped.clone())))
    });
    let reloader = reload
        .map(|reload| tokio::spawn(apply_reloads(reload, Arc::clone(&tokens), store.clone())));
    let store_status = store.as_ref().map(|s| s.status());
    let proxy = Arc::new(Proxy::new(config, tokens, metrics).with_store_status(store_status));
    tracing::info!(
        listen = %listener.local_addr()?,
        upstream = %proxy.config.upstream,
        accounts = %proxy.config.accounts_url,
        "zoho-desk-proxy listening"
    );
    server::serve(Arc::clone(&proxy), listener, shutdown).await?;
    let _ = stop_tasks.send(true);
    if let Some(reloader) = reloader {
        reloader.abort();
    }
    let _ = refresher.await;
    if let Some(follower) = follower {
        let _ = follower.await;
    }
    if let Some(persister) = persister {
        let _ = persister.await;
    }
    tracing::info!("zoho-desk-proxy stopped");
    Ok(())
}

/// Applies reloaded configs to the token source.
async fn apply_reloads(
    mut reload: tokio::sync::mpsc::Receiver<Config>,
    tokens: Arc<TokenCache>,
    store: Option<Arc<SharedStore>>,
) {
    while let Some(config) = reload.recv().await {
        match source_for(&config, store.as_ref()) {
            Ok(source) => {
                tokens.replace_source(source);
                tracing::info!("credentials reloaded; refreshing with them as needed");
            }
            Err(err) => tracing::error!(error = %err, "reload ignored"),
        }
    }
}

/// The config with the token file's refresh token when it has none of its own.
pub fn with_stored_refresh_token(mut config: Config) -> Config {
    if config.oauth.refresh_token.is_none()
        && let Some(stored) = config
            .token_file
            .clone()
            .map(TokenFile::new)
            .as_ref()
            .and_then(load_token_file)
    {
        config.oauth.refresh_token = stored.refresh_token;
    }
    config
}

/// A persisted token is reused only when it has at least this long to live.
const REUSE_MIN_REMAINING: std::time::Duration = std::time::Duration::from_secs(30);

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
