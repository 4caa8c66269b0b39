//! The validated configuration: every field ready to use, rules compiled.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::{HeaderValue, Method};
use ipnet::IpNet;
use rustls::pki_types::CertificateDer;

use crate::paths::PathRule;
use crate::secret::Secret;
use crate::url::BaseUrl;

/// Zoho's limit: access tokens per refresh token in any 10 minutes (then it blocks the
/// refresh token for the rest of the window).
pub const ZOHO_REFRESHES_PER_10MIN: u32 = 10;

/// The default listen address: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// The default token file, relative to the working directory.
pub const DEFAULT_TOKEN_FILE: &str = ".zoho-desk-proxy/token.json";
/// The default directory of transparent mode's local CA, relative to the working
/// directory.
pub const DEFAULT_CA_DIR: &str = ".zoho-desk-proxy/ca";

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
    /// The shared token store URL (README "Running several proxies").
    pub token_store: Option<String>,
    /// Access rules, compiled (README "Security model").
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
    /// Transparent mode (README "Clients that cannot change their URL").
    pub intercept: InterceptConfig,
    /// Desk's own limits (README "Desk's limits").
    pub desk: DeskConfig,
    /// Record and replay (README "Testing against recorded Desk traffic").
    pub record: RecordConfig,
    /// Where the configuration came from, in words (`check` prints it).
    pub source: String,
}

/// Zoho Desk's editions and the API calls each lets a portal have in flight at once.
pub const EDITIONS: [(&str, usize); 5] = [
    ("free", 5),
    ("express", 10),
    ("standard", 10),
    ("professional", 15),
    ("enterprise", 25),
];

/// The most `record.max_body_bytes` may be: an entry holds two bodies, and the recorder's
/// queue of entries waiting for the disk holds 64 MiB (a larger entry would be dropped,
/// after the request path had held it).
pub const MAX_RECORD_BODY_BYTES: usize = 16 << 20;

/// Record and replay: `record.max_body_bytes` from the file; the rest from the command
/// line (`serve --record`, `--replay`, `--replay-strict`).
#[derive(Debug, Clone)]
pub struct RecordConfig {
    /// Bytes of each body kept in a recording; longer bodies are marked truncated.
    pub max_body_bytes: usize,
    /// Where to record, when recording.
    pub file: Option<PathBuf>,
    /// What to replay, when replaying.
    pub replay: Option<PathBuf>,
    /// Whether a replay that missed makes the process exit non-zero.
    pub replay_strict: bool,
}

impl Default for RecordConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
            file: None,
            replay: None,
            replay_strict: false,
        }
    }
}

/// Desk's limits: how many calls the portal may have in flight at once.
#[derive(Debug, Clone)]
pub struct DeskConfig {
    /// The portal's edition (`desk.edition`), as written in [`EDITIONS`].
    pub edition: &'static str,
    /// Calls at Desk at once (`desk.max_concurrent`, else the edition's); with a
    /// `token_store`, for the whole fleet.
    pub max_concurrent: usize,
    /// How long a replica's hold on one of the fleet's slots lasts without renewal
    /// (`desk.fleet_lease_secs`): the longest a dead replica's slots stay taken.
    pub fleet_lease: Duration,
}

impl Default for DeskConfig {
    fn default() -> Self {
        Self {
            edition: "standard",
            max_concurrent: 10,
            fleet_lease: Duration::from_secs(10),
        }
    }
}

/// Transparent mode: the listener is also an HTTPS proxy for Zoho's hosts.
#[derive(Debug, Clone)]
pub struct InterceptConfig {
    /// Whether `CONNECT` to Zoho's hosts is accepted.
    pub enabled: bool,
    /// Where the local CA lives (`intercept.ca_dir`).
    pub ca_dir: PathBuf,
    /// Host names answered as Zoho Desk: the data centre's, and those of
    /// `intercept.hosts` that are not Accounts'.
    pub desk_hosts: Vec<String>,
    /// Host names answered as Zoho Accounts (locally): the data centre's, and those of
    /// `intercept.hosts` whose first label is `accounts`.
    pub accounts_hosts: Vec<String>,
    /// The `api_domain` the local Accounts answers carry (the data centre's).
    pub api_domain: String,
}

impl InterceptConfig {
    /// Every intercepted host name.
    pub fn hosts(&self) -> Vec<String> {
        self.desk_hosts
            .iter()
            .chain(&self.accounts_hosts)
            .cloned()
            .collect()
    }
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

/// Access rules, compiled (enforced by the request path's access policy).
#[derive(Debug, Clone, Default)]
pub struct AccessConfig {
    /// Keys a client must present; empty means none needed.
    pub api_keys: Vec<Secret<String>>,
    /// Methods accepted; `None` means all that Desk has.
    pub allow_methods: Option<Vec<Method>>,
    /// Path rules accepted (exact letter case); empty means all.
    pub allow_paths: Vec<PathRule>,
    /// Path rules refused (any letter case).
    pub deny_paths: Vec<PathRule>,
    /// Accepted `Host` names, lower case; `None` means loopback names plus the listen
    /// host; `*` accepts any.
    pub allow_hosts: Option<Vec<String>>,
    /// Accepted browser `Origin` values, lower case, without a trailing `/`.
    pub allow_origins: Vec<String>,
    /// Accepted client IP ranges; empty means all.
    pub allow_cidrs: Vec<IpNet>,
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

/// Zoho's `api_domain` per data centre.
pub const API_DOMAINS: &[(&str, &str)] = &[
    ("com", "https://www.zohoapis.com"),
    ("eu", "https://www.zohoapis.eu"),
    ("in", "https://www.zohoapis.in"),
    ("com.au", "https://www.zohoapis.com.au"),
    ("jp", "https://www.zohoapis.jp"),
    ("ca", "https://www.zohoapis.ca"),
    ("sa", "https://www.zohoapis.sa"),
    ("com.cn", "https://www.zohoapis.com.cn"),
];

/// The methods Desk's API has: what `access.allow_methods` may list.
pub const DESK_METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

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

    /// The secrets of the configuration (client secret, refresh token, proxy keys): what
    /// must never be written anywhere, a recording included.
    pub fn secrets(&self) -> Vec<Secret<String>> {
        let mut secrets = vec![self.oauth.client_secret.clone()];
        secrets.extend(self.oauth.refresh_token.clone());
        secrets.extend(self.access.api_keys.iter().cloned());
        secrets
    }

    /// Whether other machines can reach the listener with neither a key nor a CIDR rule
    /// in the way (refused unless `access.allow_unauthenticated_remote`). Rules that
    /// together admit every IPv4 or every IPv6 address (`0.0.0.0/0`, or `0.0.0.0/1` and
    /// `128.0.0.0/1`) protect nothing.
    pub fn is_open_remote(&self) -> bool {
        self.access.leaves_open(self.listen)
    }
}

impl AccessConfig {
    /// Whether these rules leave a listener on `listen` open to other machines: see
    /// [`Config::is_open_remote`].
    pub fn leaves_open(&self, listen: SocketAddr) -> bool {
        !listen.ip().is_loopback()
            && self.api_keys.is_empty()
            && (self.allow_cidrs.is_empty() || covers_a_whole_family(&self.allow_cidrs))
    }

    /// Whether serving on `listen` must be refused: open to other machines, and not
    /// explicitly allowed (`access.allow_unauthenticated_remote`).
    pub fn refuses(&self, listen: SocketAddr) -> bool {
        self.leaves_open(listen) && !self.allow_unauthenticated_remote
    }
}

/// Whether the ranges together hold every IPv4 address, or every IPv6 address: merged,
/// they make a range of prefix length 0.
fn covers_a_whole_family(cidrs: &[IpNet]) -> bool {
    IpNet::aggregate(&cidrs.to_vec())
        .iter()
        .any(|net| net.prefix_len() == 0)
}
