//! Configuration: `proxy.toml` and environment variables, parsed into raw serde structs
//! and validated into a [`Config`] whose every field is ready to use.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::uri::PathAndQuery;
use http::{HeaderValue, Method, Uri};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::Deserialize;

use crate::secret::Secret;

/// The default listen address: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// The default token file, relative to the working directory.
pub const DEFAULT_TOKEN_FILE: &str = ".zoho-desk-proxy/token.json";

/// A configuration that cannot be used; the message names the key and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has an unknown key (toml's message names it).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// toml's message, which names the key.
        message: String,
    },
    /// A key has a value that cannot be used.
    #[error("`{key}`: {reason}")]
    Invalid {
        /// The key, as written in proxy.toml.
        key: &'static str,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// A required key is missing.
    #[error("`{key}` is required: set it in proxy.toml or with the environment variable {env}")]
    Missing {
        /// The key, as written in proxy.toml.
        key: &'static str,
        /// Its environment variable.
        env: &'static str,
    },
}

// ---------------------------------------------------------------------------------------
// Raw, as written by the user.

/// `proxy.toml` as written. Every table refuses unknown keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    listen: Option<String>,
    dc: Option<String>,
    upstream: Option<String>,
    accounts_url: Option<String>,
    org_id: Option<String>,
    token_file: Option<String>,
    token_store: Option<String>,
    #[serde(default)]
    oauth: RawOAuth,
    #[serde(default)]
    access: RawAccess,
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    tls: RawTls,
    /// `ZOHO_PROXY_API_KEYS` as set in the environment, split when validated.
    #[serde(skip)]
    api_keys_env: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOAuth {
    client_id: Option<String>,
    client_id_file: Option<PathBuf>,
    client_secret: Option<String>,
    client_secret_file: Option<PathBuf>,
    refresh_token: Option<String>,
    refresh_token_file: Option<PathBuf>,
    refresh_margin_secs: Option<u64>,
    max_refreshes_per_10min: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccess {
    api_keys: Option<Vec<String>>,
    api_keys_file: Option<PathBuf>,
    allow_methods: Option<Vec<String>>,
    allow_paths: Option<Vec<String>>,
    deny_paths: Option<Vec<String>>,
    allow_hosts: Option<Vec<String>>,
    allow_origins: Option<Vec<String>>,
    allow_cidrs: Option<Vec<String>>,
    allow_unauthenticated_remote: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    connect_secs: Option<f64>,
    response_secs: Option<f64>,
    idle_secs: Option<f64>,
    header_read_secs: Option<f64>,
    body_read_secs: Option<f64>,
    shutdown_grace_secs: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    replay_body_bytes: Option<u64>,
    buffered_body_bytes: Option<u64>,
    max_connections: Option<usize>,
    max_upstream_requests: Option<usize>,
    workers: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<String>,
}

impl RawConfig {
    /// Parses TOML text; `origin` names the source in error messages.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.message().to_owned(),
        })
    }

    /// Reads and parses a file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Applies the environment variables of SPEC §3, which override the file.
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) {
        let set = |slot: &mut Option<String>, name: &str| {
            if let Some(v) = env(name) {
                *slot = Some(v);
            }
        };
        set(&mut self.listen, "ZOHO_PROXY_LISTEN");
        set(&mut self.dc, "ZOHO_DC");
        set(&mut self.upstream, "ZOHO_DESK_URL");
        set(&mut self.accounts_url, "ZOHO_ACCOUNTS_URL");
        set(&mut self.org_id, "ZOHO_ORG_ID");
        set(&mut self.token_file, "ZOHO_TOKEN_FILE");
        set(&mut self.token_store, "ZOHO_TOKEN_STORE");
        set(&mut self.oauth.client_id, "ZOHO_CLIENT_ID");
        set(&mut self.oauth.client_secret, "ZOHO_CLIENT_SECRET");
        set(&mut self.oauth.refresh_token, "ZOHO_REFRESH_TOKEN");
        set(&mut self.log.format, "ZOHO_PROXY_LOG_FORMAT");
        if let Some(v) = env("ZOHO_CLIENT_SECRET_FILE") {
            self.oauth.client_secret_file = Some(v.into());
        }
        if let Some(v) = env("ZOHO_REFRESH_TOKEN_FILE") {
            self.oauth.refresh_token_file = Some(v.into());
        }
        if let Some(v) = env("ZOHO_PROXY_API_KEYS") {
            self.api_keys_env = Some(v);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Validated.

/// The validated configuration of one proxy.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen.
    pub listen: SocketAddr,
    /// The Desk API base URL.
    pub upstream: BaseUrl,
    /// The Zoho Accounts base URL.
    pub accounts_url: BaseUrl,
    /// Sent as `orgId` when the client sent none.
    pub org_id: Option<HeaderValue>,
    /// Credentials and refresh policy.
    pub oauth: OAuthConfig,
    /// The token file; `None` when disabled.
    pub token_file: Option<PathBuf>,
    /// The shared token store URL (SPEC §10).
    pub token_store: Option<String>,
    /// Access rules (SPEC §7).
    pub access: AccessConfig,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Largest request body kept for a retry after a 401.
    pub replay_body_bytes: u64,
    /// Request-body bytes held for 401 retries across the whole process.
    pub buffered_body_bytes: u64,
    /// Most client connections open at once; more are closed at accept.
    pub max_connections: usize,
    /// Requests sent to Desk at once (`limits.max_upstream_requests`); more wait.
    pub max_upstream_requests: usize,
    /// Serving threads (`limits.workers`); 0 means one per CPU.
    pub workers: usize,
    /// Log format; `None` picks by terminal.
    pub log_format: Option<LogFormat>,
    /// Certificates trusted besides Mozilla's roots (`tls.ca_file`), for Desk and Accounts.
    pub extra_roots: Vec<CertificateDer<'static>>,
}

/// OAuth credentials and the refresh policy.
#[derive(Debug, Clone)]
pub struct OAuthConfig {
    /// The Self Client's client id.
    pub client_id: String,
    /// The Self Client's client secret.
    pub client_secret: Secret<String>,
    /// The long-lived refresh token; `None` until `exchange` stores one.
    pub refresh_token: Option<Secret<String>>,
    /// Refresh this long before expiry (capped at half the token's lifetime).
    pub refresh_margin: Duration,
    /// The refresh guard: at most this many Accounts refreshes in any 10 minutes.
    pub max_refreshes_per_10min: u32,
}

/// Access rules, as configured (enforced by [`crate::access`]).
#[derive(Debug, Clone, Default)]
pub struct AccessConfig {
    /// Keys a client must present; empty means none needed.
    pub api_keys: Vec<Secret<String>>,
    /// Methods accepted; `None` means all.
    pub allow_methods: Option<Vec<Method>>,
    /// Path patterns accepted; empty means all.
    pub allow_paths: Vec<String>,
    /// Path patterns refused.
    pub deny_paths: Vec<String>,
    /// Accepted `Host` names; `None` means loopback names plus the listen host.
    pub allow_hosts: Option<Vec<String>>,
    /// Accepted browser `Origin` values.
    pub allow_origins: Vec<String>,
    /// Accepted client IP ranges; empty means all.
    pub allow_cidrs: Vec<String>,
    /// Allows a non-loopback listener with no key and no CIDR rule.
    pub allow_unauthenticated_remote: bool,
}

/// Timeouts of the upstream side and of the server.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Upstream TCP + TLS connect.
    pub connect: Duration,
    /// From sending the request to Desk's response headers.
    pub response: Duration,
    /// How long an idle pooled upstream connection is kept.
    pub idle: Duration,
    /// How long a client may take to send its request headers; also how long an idle
    /// connection is kept.
    pub header_read: Duration,
    /// The longest silence between two reads of a request body.
    pub body_read: Duration,
    /// How long in-flight requests may run after SIGTERM.
    pub shutdown_grace: Duration,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable, coloured.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// A base URL: scheme, host, port and an optional path prefix (no query).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    /// `http` or `https`.
    pub scheme: http::uri::Scheme,
    /// Host and port as written (`desk.zoho.com`, `127.0.0.1:9000`).
    pub authority: http::uri::Authority,
    /// Path prefix without a trailing slash (`""` for none).
    pub prefix: String,
}

impl BaseUrl {
    /// Parses an absolute `http(s)://host[:port][/prefix]` URL.
    pub fn parse(key: &'static str, text: &str) -> Result<Self, ConfigError> {
        let invalid = |reason: &str| ConfigError::Invalid {
            key,
            reason: format!("{reason} (got {text:?}; expected e.g. \"https://desk.zoho.com\")"),
        };
        let uri: Uri = text
            .trim()
            .parse()
            .map_err(|_| invalid("not a valid URL"))?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or_else(|| invalid("the URL needs a scheme"))?;
        if scheme != http::uri::Scheme::HTTP && scheme != http::uri::Scheme::HTTPS {
            return Err(invalid("the scheme must be http or https"));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| invalid("the URL needs a host"))?;
        if authority.as_str().contains('@') {
            return Err(invalid("the URL must not carry user information"));
        }
        if uri.query().is_some() {
            return Err(invalid("the URL must not have a query"));
        }
        let prefix = uri.path().trim_end_matches('/').to_owned();
        Ok(Self {
            scheme,
            authority,
            prefix,
        })
    }

    /// The host name, lower-cased, without brackets for IPv6.
    pub fn host(&self) -> String {
        self.authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase()
    }

    /// The port, explicit or the scheme's default.
    pub fn port(&self) -> u16 {
        self.authority
            .port_u16()
            .unwrap_or(if self.scheme == http::uri::Scheme::HTTPS {
                443
            } else {
                80
            })
    }

    /// The URL of `path_and_query` under this base, byte-for-byte.
    pub fn join(&self, path_and_query: &str) -> Result<Uri, http::Error> {
        self.join_pq(PathAndQuery::try_from(path_and_query)?)
    }

    /// The URL of a parsed `path_and_query` under this base; without a prefix it shares
    /// the request's bytes (no copy).
    pub fn join_pq(&self, path_and_query: PathAndQuery) -> Result<Uri, http::Error> {
        let path_and_query = if self.prefix.is_empty() {
            path_and_query
        } else {
            format!("{}{}", self.prefix, path_and_query.as_str()).try_into()?
        };
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(path_and_query);
        Ok(Uri::from_parts(parts)?)
    }
}

impl std::fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.prefix)
    }
}

/// Zoho's data centres and their Accounts and Desk hosts.
pub const DATA_CENTRES: &[(&str, &str, &str)] = &[
    ("com", "https://accounts.zoho.com", "https://desk.zoho.com"),
    ("eu", "https://accounts.zoho.eu", "https://desk.zoho.eu"),
    ("in", "https://accounts.zoho.in", "https://desk.zoho.in"),
    (
        "com.au",
        "https://accounts.zoho.com.au",
        "https://desk.zoho.com.au",
    ),
    ("jp", "https://accounts.zoho.jp", "https://desk.zoho.jp"),
    (
        "ca",
        "https://accounts.zohocloud.ca",
        "https://desk.zohocloud.ca",
    ),
    ("sa", "https://accounts.zoho.sa", "https://desk.zoho.sa"),
    (
        "com.cn",
        "https://accounts.zoho.com.cn",
        "https://desk.zoho.com.cn",
    ),
];

impl Config {
    /// How many serving threads to run: `limits.workers`, or one per CPU; never more than
    /// `limits.max_upstream_requests`, since each thread needs a slot of its own.
    pub fn worker_threads(&self) -> usize {
        let threads = match self.workers {
            0 => std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            n => n,
        };
        threads.min(self.max_upstream_requests)
    }

    /// Whether other machines can reach the listener with neither a key nor a CIDR rule
    /// in the way (refused unless `access.allow_unauthenticated_remote`).
    pub fn is_open_remote(&self) -> bool {
        !self.listen.ip().is_loopback()
            && self.access.api_keys.is_empty()
            && (self.access.allow_cidrs.is_empty()
                || self.access.allow_cidrs.iter().any(|c| admits_everyone(c)))
    }

    /// Loads the configuration as `serve` does: the file (when given, or `./proxy.toml`
    /// when it exists), then the process environment.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let default = Path::new("proxy.toml");
        let mut raw = match path {
            Some(p) => RawConfig::from_file(p)?,
            None if default.exists() => RawConfig::from_file(default)?,
            None => RawConfig::default(),
        };
        raw.apply_env(|name| std::env::var(name).ok());
        Self::try_from(raw)
    }

    /// Parses TOML text alone, without the environment (tests, embedded configs).
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::try_from(RawConfig::from_toml(text, "config")?)
    }
}

impl TryFrom<RawConfig> for Config {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Self, ConfigError> {
        let listen_text = raw.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen = listen_text
            .trim()
            .parse()
            .map_err(|_| ConfigError::Invalid {
                key: "listen",
                reason: format!(
                    "{listen_text:?} is not an address:port such as \"127.0.0.1:8080\""
                ),
            })?;

        let dc = raw
            .dc
            .as_deref()
            .unwrap_or("com")
            .trim()
            .to_ascii_lowercase();
        let (_, dc_accounts, dc_desk) = DATA_CENTRES
            .iter()
            .find(|(name, _, _)| *name == dc)
            .ok_or_else(|| {
                let names: Vec<&str> = DATA_CENTRES.iter().map(|d| d.0).collect();
                ConfigError::Invalid {
                    key: "dc",
                    reason: format!(
                        "unknown data centre {dc:?}; use one of {}",
                        names.join(", ")
                    ),
                }
            })?;
        let upstream = BaseUrl::parse("upstream", raw.upstream.as_deref().unwrap_or(dc_desk))?;
        let accounts_url = BaseUrl::parse(
            "accounts_url",
            raw.accounts_url.as_deref().unwrap_or(dc_accounts),
        )?;

        let org_id = match raw.org_id.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(v) => Some(HeaderValue::from_str(v).map_err(|_| ConfigError::Invalid {
                key: "org_id",
                reason: "must be a plain header value (the portal's numeric org id)".into(),
            })?),
        };

        let oauth = OAuthConfig {
            client_id: read_value(
                "oauth.client_id",
                raw.oauth.client_id,
                raw.oauth.client_id_file,
            )?
            .ok_or(ConfigError::Missing {
                key: "oauth.client_id",
                env: "ZOHO_CLIENT_ID",
            })?,
            client_secret: read_value(
                "oauth.client_secret",
                raw.oauth.client_secret,
                raw.oauth.client_secret_file,
            )?
            .map(Secret::new)
            .ok_or(ConfigError::Missing {
                key: "oauth.client_secret",
                env: "ZOHO_CLIENT_SECRET",
            })?,
            refresh_token: read_value(
                "oauth.refresh_token",
                raw.oauth.refresh_token,
                raw.oauth.refresh_token_file,
            )?
            .map(Secret::new),
            refresh_margin: Duration::from_secs(raw.oauth.refresh_margin_secs.unwrap_or(300)),
            max_refreshes_per_10min: at_least_one(
                "oauth.max_refreshes_per_10min",
                raw.oauth.max_refreshes_per_10min.unwrap_or(5),
                " (Zoho allows 10)",
            )?,
        };

        let token_file = match raw.token_file {
            None => Some(PathBuf::from(DEFAULT_TOKEN_FILE)),
            Some(p) if p.trim().is_empty() => None,
            Some(p) => Some(PathBuf::from(p)),
        };
        let token_store = raw.token_store.filter(|s| !s.trim().is_empty());
        if let Some(store) = &token_store
            && !(store.starts_with("redis://") || store.starts_with("rediss://"))
        {
            return Err(ConfigError::Invalid {
                key: "token_store",
                reason: "must be a redis:// or rediss:// URL".into(),
            });
        }

        let access = access_config(raw.access, raw.api_keys_env)?;
        let timeouts = Timeouts {
            connect: secs("timeouts.connect_secs", raw.timeouts.connect_secs, 10.0)?,
            response: secs("timeouts.response_secs", raw.timeouts.response_secs, 120.0)?,
            idle: secs("timeouts.idle_secs", raw.timeouts.idle_secs, 90.0)?,
            header_read: secs(
                "timeouts.header_read_secs",
                raw.timeouts.header_read_secs,
                10.0,
            )?,
            body_read: secs("timeouts.body_read_secs", raw.timeouts.body_read_secs, 30.0)?,
            shutdown_grace: secs(
                "timeouts.shutdown_grace_secs",
                raw.timeouts.shutdown_grace_secs,
                30.0,
            )?,
        };
        let log_format = match raw.log.format.as_deref().map(str::trim) {
            None | Some("") => None,
            Some("pretty") => Some(LogFormat::Pretty),
            Some("json") => Some(LogFormat::Json),
            Some(other) => {
                return Err(ConfigError::Invalid {
                    key: "log.format",
                    reason: format!("{other:?} is not a format; use \"pretty\" or \"json\""),
                });
            }
        };

        let extra_roots = match &raw.tls.ca_file {
            None => Vec::new(),
            Some(path) => read_certificates(path)?,
        };
        Ok(Self {
            extra_roots,
            listen,
            upstream,
            accounts_url,
            org_id,
            oauth,
            token_file,
            token_store,
            access,
            timeouts,
            replay_body_bytes: raw.limits.replay_body_bytes.unwrap_or(1 << 20),
            buffered_body_bytes: raw.limits.buffered_body_bytes.unwrap_or(64 << 20),
            max_connections: at_least_one(
                "limits.max_connections",
                raw.limits.max_connections.unwrap_or(4096),
                "",
            )?,
            max_upstream_requests: at_least_one(
                "limits.max_upstream_requests",
                raw.limits.max_upstream_requests.unwrap_or(64),
                "",
            )?,
            workers: raw.limits.workers.unwrap_or(0),
            log_format,
        })
    }
}

/// A count of which 0 makes no sense.
fn at_least_one<N: Default + PartialEq>(
    key: &'static str,
    value: N,
    note: &str,
) -> Result<N, ConfigError> {
    if value == N::default() {
        return Err(ConfigError::Invalid {
            key,
            reason: format!("must be at least 1{note}"),
        });
    }
    Ok(value)
}

/// Whether an `allow_cidrs` entry admits every address (`0.0.0.0/0`, `::/0`): it protects
/// nothing, so a listener guarded only by it counts as open.
fn admits_everyone(cidr: &str) -> bool {
    cidr.trim()
        .parse::<ipnet::IpNet>()
        .is_ok_and(|net| net.prefix_len() == 0)
}

fn access_config(raw: RawAccess, env_keys: Option<String>) -> Result<AccessConfig, ConfigError> {
    let keys = match env_keys {
        // The environment replaces the file's keys; a blank value (what a compose file
        // substitutes for an unset variable) must not mean "no keys".
        Some(text) => {
            let keys: Vec<String> = text
                .split(',')
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(str::to_owned)
                .collect();
            if keys.is_empty() {
                return Err(ConfigError::Invalid {
                    key: "ZOHO_PROXY_API_KEYS",
                    reason: "is set but holds no key (empty, or only commas and spaces): set it to one or more comma-separated keys, or unset it to use access.api_keys".into(),
                });
            }
            keys
        }
        None => raw.api_keys.unwrap_or_default(),
    };
    let mut api_keys: Vec<Secret<String>> = keys.into_iter().map(Secret::new).collect();
    if let Some(path) = raw.api_keys_file {
        let text = read_secret_file("access.api_keys_file", &path)?;
        api_keys.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(|l| Secret::new(l.to_owned())),
        );
    }
    if api_keys.iter().any(|k| k.expose().trim().is_empty()) {
        return Err(ConfigError::Invalid {
            key: "access.api_keys",
            reason: "a key is empty".into(),
        });
    }
    let allow_methods = match raw.allow_methods {
        None => None,
        Some(list) => Some(
            list.iter()
                .map(|m| {
                    Method::from_bytes(m.trim().to_ascii_uppercase().as_bytes()).map_err(|_| {
                        ConfigError::Invalid {
                            key: "access.allow_methods",
                            reason: format!("{m:?} is not an HTTP method"),
                        }
                    })
                })
                .collect::<Result<_, _>>()?,
        ),
    };
    Ok(AccessConfig {
        api_keys,
        allow_methods,
        allow_paths: raw.allow_paths.unwrap_or_default(),
        deny_paths: raw.deny_paths.unwrap_or_default(),
        allow_hosts: raw.allow_hosts,
        allow_origins: raw.allow_origins.unwrap_or_default(),
        allow_cidrs: raw.allow_cidrs.unwrap_or_default(),
        allow_unauthenticated_remote: raw.allow_unauthenticated_remote.unwrap_or(false),
    })
}

/// A value given inline or as `<key>_file` (container secrets); not both.
fn read_value(
    key: &'static str,
    inline: Option<String>,
    file: Option<PathBuf>,
) -> Result<Option<String>, ConfigError> {
    match (inline.filter(|v| !v.trim().is_empty()), file) {
        (Some(_), Some(_)) => Err(ConfigError::Invalid {
            key,
            reason: format!("give either `{key}` or `{key}_file`, not both"),
        }),
        (Some(v), None) => Ok(Some(v.trim().to_owned())),
        (None, Some(path)) => Ok(Some(read_secret_file(key, &path)?.trim().to_owned())),
        (None, None) => Ok(None),
    }
}

fn read_secret_file(key: &'static str, path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError::Invalid {
        key,
        reason: format!("cannot read the file {}: {e}", path.display()),
    })
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid {
        key: "tls.ca_file",
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            invalid(format!(
                "{} is not a PEM certificate file: {e}",
                path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(invalid(format!(
            "{} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

fn secs(key: &'static str, value: Option<f64>, default: f64) -> Result<Duration, ConfigError> {
    let v = value.unwrap_or(default);
    Duration::try_from_secs_f64(v)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| ConfigError::Invalid {
            key,
            reason: format!("{v} is not a positive number of seconds"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [oauth]
        client_id = "1000.ID"
        client_secret = "secret"
        refresh_token = "1000.refresh"
    "#;

    #[test]
    fn defaults_follow_the_spec() {
        let c = Config::from_toml(MINIMAL).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.upstream.to_string(), "https://desk.zoho.com");
        assert_eq!(c.accounts_url.to_string(), "https://accounts.zoho.com");
        assert_eq!(c.oauth.refresh_margin, Duration::from_secs(300));
        assert_eq!(c.oauth.max_refreshes_per_10min, 5);
        assert_eq!(c.replay_body_bytes, 1_048_576);
        assert_eq!(c.buffered_body_bytes, 64 * 1_048_576);
        assert_eq!(c.timeouts.body_read, Duration::from_secs(30));
        assert_eq!(c.timeouts.connect, Duration::from_secs(10));
        assert_eq!(c.timeouts.response, Duration::from_secs(120));
        assert_eq!(c.timeouts.idle, Duration::from_secs(90));
        assert_eq!(c.token_file.as_deref(), Some(Path::new(DEFAULT_TOKEN_FILE)));
    }

    #[test]
    fn data_centres_pick_their_hosts() {
        for (dc, accounts, desk) in [
            ("eu", "https://accounts.zoho.eu", "https://desk.zoho.eu"),
            (
                "ca",
                "https://accounts.zohocloud.ca",
                "https://desk.zohocloud.ca",
            ),
            (
                "com.au",
                "https://accounts.zoho.com.au",
                "https://desk.zoho.com.au",
            ),
        ] {
            let c = Config::from_toml(&format!("dc = \"{dc}\"\n{MINIMAL}")).unwrap();
            assert_eq!(c.accounts_url.to_string(), accounts);
            assert_eq!(c.upstream.to_string(), desk);
        }
        let err = Config::from_toml(&format!("dc = \"mars\"\n{MINIMAL}")).unwrap_err();
        assert!(err.to_string().contains("`dc`"), "{err}");
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::from_toml(&format!("lisen = \"x\"\n{MINIMAL}")).unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");
        let err = Config::from_toml(&format!("{MINIMAL}\nrefresh_margin = 3")).unwrap_err();
        assert!(err.to_string().contains("refresh_margin"), "{err}");
    }

    #[test]
    fn missing_credentials_name_key_and_env() {
        let err = Config::from_toml("").unwrap_err();
        assert_eq!(
            err.to_string(),
            "`oauth.client_id` is required: set it in proxy.toml or with the environment variable ZOHO_CLIENT_ID"
        );
    }

    #[test]
    fn environment_overrides_the_file() {
        let mut raw = RawConfig::from_toml(MINIMAL, "t").unwrap();
        raw.apply_env(|name| match name {
            "ZOHO_PROXY_LISTEN" => Some("0.0.0.0:9000".into()),
            "ZOHO_CLIENT_SECRET" => Some("from-env".into()),
            "ZOHO_PROXY_API_KEYS" => Some("a, b,,c".into()),
            "ZOHO_TOKEN_FILE" => Some(String::new()),
            _ => None,
        });
        let c = Config::try_from(raw).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:9000");
        assert_eq!(c.oauth.client_secret.expose(), "from-env");
        assert_eq!(c.access.api_keys.len(), 3);
        assert_eq!(c.token_file, None);
    }

    #[test]
    fn a_blank_api_keys_variable_is_an_error_never_no_keys() {
        for blank in ["", " ", ",", " , ,, "] {
            let mut raw = RawConfig::from_toml(
                &format!("{MINIMAL}\n[access]\napi_keys = [\"from-file\"]\n"),
                "t",
            )
            .unwrap();
            raw.apply_env(|name| (name == "ZOHO_PROXY_API_KEYS").then(|| blank.to_owned()));
            let err = Config::try_from(raw).unwrap_err();
            assert!(
                err.to_string().contains("ZOHO_PROXY_API_KEYS"),
                "{blank:?}: {err}"
            );
        }
    }

    #[test]
    fn an_everyone_cidr_protects_nothing() {
        for (cidrs, open) in [
            ("[\"0.0.0.0/0\"]", true),
            ("[\"::/0\"]", true),
            ("[\"0.0.0.0/0\", \"::/0\"]", true),
            ("[\"10.0.0.0/8\"]", false),
            ("[\"10.0.0.0/8\", \"0.0.0.0/0\"]", true),
            ("[]", true),
        ] {
            let c = Config::from_toml(&format!(
                "listen = \"0.0.0.0:8080\"\n{MINIMAL}\n[access]\nallow_cidrs = {cidrs}\n"
            ))
            .unwrap();
            assert_eq!(c.is_open_remote(), open, "{cidrs}");
        }
    }

    #[test]
    fn secrets_can_come_from_files() {
        let dir = std::env::temp_dir().join(format!("zdp-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("secret");
        std::fs::write(&file, "file-secret\n").unwrap();
        let toml = format!(
            "[oauth]\nclient_id = \"id\"\nclient_secret_file = \"{}\"\nrefresh_token = \"r\"\n",
            file.display()
        );
        let c = Config::from_toml(&toml).unwrap();
        assert_eq!(c.oauth.client_secret.expose(), "file-secret");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_example_proxy_toml_is_complete_and_matches_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.toml");
        let mut raw = RawConfig::from_file(&path).unwrap();
        raw.apply_env(|name| match name {
            "ZOHO_CLIENT_ID" => Some("id".into()),
            "ZOHO_CLIENT_SECRET" => Some("secret".into()),
            _ => None,
        });
        let example = Config::try_from(raw).unwrap();
        let defaults = Config::from_toml(MINIMAL).unwrap();
        assert_eq!(example.listen, defaults.listen);
        assert_eq!(example.upstream, defaults.upstream);
        assert_eq!(example.accounts_url, defaults.accounts_url);
        assert_eq!(example.token_file, defaults.token_file);
        assert_eq!(example.oauth.refresh_margin, defaults.oauth.refresh_margin);
        assert_eq!(
            example.oauth.max_refreshes_per_10min,
            defaults.oauth.max_refreshes_per_10min
        );
        assert_eq!(example.replay_body_bytes, defaults.replay_body_bytes);
        assert_eq!(example.buffered_body_bytes, defaults.buffered_body_bytes);
        assert_eq!(example.max_connections, defaults.max_connections);
        assert_eq!(
            example.max_upstream_requests,
            defaults.max_upstream_requests
        );
        assert_eq!(example.workers, defaults.workers);
        assert_eq!(
            format!("{:?}", example.timeouts),
            format!("{:?}", defaults.timeouts)
        );
        assert!(!example.access.allow_unauthenticated_remote);
    }

    #[test]
    fn counts_of_zero_are_refused_by_name() {
        // MINIMAL ends inside [oauth].
        for (extra, key) in [
            (
                "max_refreshes_per_10min = 0",
                "oauth.max_refreshes_per_10min",
            ),
            ("[limits]\nmax_connections = 0", "limits.max_connections"),
            (
                "[limits]\nmax_upstream_requests = 0",
                "limits.max_upstream_requests",
            ),
        ] {
            let err = Config::from_toml(&format!("{MINIMAL}\n{extra}\n")).unwrap_err();
            let text = err.to_string();
            assert!(text.contains(key) && text.contains("at least 1"), "{text}");
        }
        let c = Config::from_toml(&format!("{MINIMAL}\n[limits]\nworkers = 3\n")).unwrap();
        assert_eq!(c.worker_threads(), 3);
        let c = Config::from_toml(&format!(
            "{MINIMAL}\n[limits]\nworkers = 8\nmax_upstream_requests = 2\n"
        ))
        .unwrap();
        assert_eq!(c.worker_threads(), 2, "each thread has a slot of its own");
        let c = Config::from_toml(MINIMAL).unwrap();
        assert!(c.worker_threads() >= 1, "0 means one per CPU");
    }

    #[test]
    fn a_bad_ca_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate").unwrap();
        for file in [path.display().to_string(), "/nonexistent/ca.pem".into()] {
            let err =
                Config::from_toml(&format!("{MINIMAL}\n[tls]\nca_file = \"{file}\"")).unwrap_err();
            assert!(err.to_string().contains("tls.ca_file"), "{err}");
        }
    }

    #[test]
    fn upstream_keeps_its_prefix_and_joins_byte_for_byte() {
        let base = BaseUrl::parse("upstream", "http://127.0.0.1:9000/desk/").unwrap();
        assert_eq!(base.prefix, "/desk");
        assert_eq!(base.port(), 9000);
        let uri = base.join("/api/v1/tickets?q=a%2Fb+c%20d").unwrap();
        assert_eq!(
            uri.to_string(),
            "http://127.0.0.1:9000/desk/api/v1/tickets?q=a%2Fb+c%20d"
        );
        assert!(BaseUrl::parse("upstream", "ftp://x").is_err());
        assert!(BaseUrl::parse("upstream", "desk.zoho.com").is_err());
    }
}
