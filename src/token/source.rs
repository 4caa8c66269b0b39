//! What the token module speaks in: a [`Token`] as the request path uses it, a [`Grant`]
//! as a source returns it, why a source gave none ([`AccountsError`]), and the
//! [`TokenSource`] trait that Zoho Accounts (and the shared store in front of it)
//! implement. The cache, Accounts and the store all depend on this module; it depends on
//! none of them.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use http::HeaderValue;

use crate::secret::Secret;

/// The longest lifetime a token is taken to have, whatever its source says (Zoho's live
/// an hour): a larger figure from Accounts, the token file or the fleet's store is cut
/// down to it, so that no expiry overflows the clocks.
pub const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// An access token ready for the request path.
#[derive(Debug)]
pub struct Token {
    /// `Zoho-oauthtoken <token>`, precomputed and marked sensitive.
    pub header: HeaderValue,
    /// The bare token, for the token file and the shared store.
    pub access_token: Secret<String>,
    /// When Zoho stops accepting it.
    pub expires_at: Instant,
    /// The same moment on the wall clock, for the token file and the shared store.
    pub expires_at_wall: SystemTime,
    /// Its whole lifetime, to cap the refresh margin.
    pub lifetime: Duration,
    /// Increases with every token the cache holds; Desk's rejection of a token is
    /// recorded by its generation.
    pub generation: u64,
}

impl Token {
    /// Whether Zoho still accepts it at `now` (as far as its expiry goes).
    pub fn is_valid_at(&self, now: Instant) -> bool {
        now < self.expires_at
    }

    /// When the background task renews it: `margin` before expiry, at most half its life.
    pub fn refresh_at(&self, margin: Duration) -> Instant {
        self.expires_at - margin.min(self.lifetime / 2)
    }

    /// Builds a token living `lifetime` (at most [`MAX_LIFETIME`]) from now; `None` when
    /// Zoho sent bytes that cannot be a header value.
    pub fn new(access_token: Secret<String>, lifetime: Duration, generation: u64) -> Option<Self> {
        let header = authorization(&access_token)?;
        let lifetime = lifetime.min(MAX_LIFETIME);
        Some(Self {
            header,
            access_token,
            expires_at: Instant::now() + lifetime,
            expires_at_wall: SystemTime::now() + lifetime,
            lifetime,
            generation,
        })
    }
}

/// `Zoho-oauthtoken <token>` as a header value marked sensitive; `None` when Zoho sent
/// bytes that cannot be a header value.
pub fn authorization(access_token: &Secret<String>) -> Option<HeaderValue> {
    let mut header =
        HeaderValue::from_str(&format!("Zoho-oauthtoken {}", access_token.expose())).ok()?;
    header.set_sensitive(true);
    Some(header)
}

/// A token granted by Accounts (or read from the fleet's store).
#[derive(Debug, Clone)]
pub struct Grant {
    /// The access token.
    pub access_token: Secret<String>,
    /// Its lifetime from now.
    pub expires_in: Duration,
    /// A refresh token, present on the `authorization_code` grant only.
    pub refresh_token: Option<Secret<String>>,
    /// The API domain Zoho reports (informational).
    pub api_domain: Option<String>,
}

/// What a source came back with.
#[derive(Debug, Clone)]
pub enum Fetched {
    /// Accounts issued a token to this proxy just now: the refresh guard counts it.
    Issued(Grant),
    /// Another replica's token, read from the shared store: no Accounts call was made.
    Shared(Grant),
    /// A usable token arrived in the cache while the refresh waited (the store's
    /// follower adopted the fleet's): no Accounts call was made.
    Arrived,
}

/// Why a source gave no token. Decided on Zoho's `error` code, never on its wording,
/// which may be localized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccountsError {
    /// No connection: the request never reached Accounts.
    #[error("Zoho Accounts could not be reached: {0}")]
    Unreachable(String),
    /// The request was sent but its answer was lost (a connection that broke): Accounts
    /// may have issued a token, so the refresh guard counts it.
    #[error("Zoho Accounts' answer was lost: {0}")]
    Interrupted(String),
    /// No answer in time (Accounts may have issued a token: the guard counts it).
    #[error("Zoho Accounts did not answer within {0:?}")]
    Timeout(Duration),
    /// "Access Denied" / too many requests: back off for at least 60 s.
    #[error("Zoho Accounts is throttling token requests (error \"{0}\")")]
    Throttled(String),
    /// The client id, secret, refresh token or grant code was refused: an operator must act.
    #[error("Zoho Accounts rejected the credentials (error \"{0}\")")]
    Rejected(String),
    /// The fleet-wide refresh guard of the shared store refused the call.
    #[error(
        "refresh guard: the fleet made oauth.max_refreshes_per_10min token refreshes in the last 10 minutes"
    )]
    GuardRefused {
        /// When the oldest counted refresh leaves the window.
        retry_after: Duration,
    },
    /// Another replica held the fleet's refresh lock for longer than a refresh can take;
    /// no call was made without it.
    #[error("another replica holds the fleet's refresh lock; no token was requested")]
    FleetBusy,
    /// Any other failure: a server error, an unexpected answer.
    #[error("Zoho Accounts answered HTTP {status}{}", code.as_ref().map(|c| format!(" with error \"{c}\"")).unwrap_or_default())]
    Failed {
        /// The HTTP status.
        status: u16,
        /// Zoho's `error` code, when the answer had one.
        code: Option<String>,
    },
}

impl AccountsError {
    /// Whether Accounts may have issued a token for the call that ended so: the refresh
    /// guard counts such a call as it counts a success. A successful status with neither
    /// a token nor an error code in the answer (not JSON, cut short) counts too.
    pub fn may_have_issued(&self) -> bool {
        match self {
            Self::Timeout(_) | Self::Interrupted(_) => true,
            Self::Failed { status, code: None } => (200..300).contains(status),
            _ => false,
        }
    }

    /// The fix an operator should apply, in plain words.
    pub fn advice(&self) -> &'static str {
        match self {
            Self::Rejected(code) if code == "invalid_code" => {
                "the refresh token (or grant code) is invalid, expired or revoked: generate a new grant token in the Zoho API console (Self Client) and run `zoho-desk-proxy exchange --code <grant token>` (and remove ZOHO_REFRESH_TOKEN or oauth.refresh_token if set: they override the token file), or set the new refresh token there"
            }
            Self::Rejected(code) if code == "invalid_client_secret" => {
                "the client secret is wrong: copy it again from the Self Client's \"Client Secret\" tab into oauth.client_secret"
            }
            Self::Rejected(_) => {
                "the client id is unknown to this data centre: check oauth.client_id, and that `dc` (or accounts_url) is the data centre your Zoho account lives in"
            }
            Self::Throttled(_) => {
                "Zoho Accounts throttles these credentials (it allows 10 refreshes per refresh token in 10 minutes): wait at least a minute, and stop other programs that refresh with the same refresh token"
            }
            Self::Unreachable(_) => "check the network path to accounts_url (DNS, firewall)",
            // Sent, perhaps received: not a question of the way there alone.
            Self::Interrupted(_) | Self::Timeout(_) => {
                "the request may have reached Zoho Accounts, which is slow or failing (or accounts_url names a server that takes requests and never answers): check accounts_url and the network path to it (a proxy, a firewall that drops answers), and try again later"
            }
            // Accounts never redirects its token endpoint: a redirect is another server's
            // (http:// for https://, a wrong host or path), and is never followed.
            Self::Failed { status, .. } if (300..400).contains(status) => {
                "accounts_url answers with a redirect, which Zoho Accounts never does (the proxy does not follow one, so the credentials go nowhere else): check accounts_url (https://, the data centre's host, no path), or `dc`"
            }
            Self::Failed { .. } => {
                "Zoho Accounts is failing: try again later (a running proxy retries with backoff)"
            }
            Self::GuardRefused { .. } => {
                "Desk keeps rejecting tokens, or replicas refresh too often: check Desk 401s in the logs"
            }
            Self::FleetBusy => {
                "another replica's refresh is stuck: check the other replicas' logs and Redis"
            }
        }
    }
}

/// What a refresh tells its source: the token it replaces, and a way to see whether a
/// usable token arrived while it waited (so that no call is made for nothing).
pub struct Refresh<'a> {
    /// The token held when the refresh began; `None` at start.
    pub stale: Option<Arc<Token>>,
    arrived: &'a (dyn Fn() -> bool + Send + Sync),
}

impl<'a> Refresh<'a> {
    /// A refresh of `stale`; `arrived` says whether the cache now holds a usable token
    /// newer than it.
    pub fn new(stale: Option<Arc<Token>>, arrived: &'a (dyn Fn() -> bool + Send + Sync)) -> Self {
        Self { stale, arrived }
    }

    /// Whether a usable token newer than [`Refresh::stale`] is in the cache now: a
    /// source checks it last thing before it calls Accounts.
    pub fn arrived(&self) -> bool {
        (self.arrived)()
    }
}

/// A boxed future of a fetch.
pub type FetchFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Fetched, AccountsError>> + Send + 'a>>;

/// Where new tokens come from: Zoho Accounts in production (through the shared store
/// when there is one), anything in unit tests.
pub trait TokenSource: Send + Sync + 'static {
    /// Obtains a token to replace `refresh.stale`.
    fn fetch<'a>(&'a self, refresh: &'a Refresh<'a>) -> FetchFuture<'a>;
}

impl<T: TokenSource + ?Sized> TokenSource for Box<T> {
    fn fetch<'a>(&'a self, refresh: &'a Refresh<'a>) -> FetchFuture<'a> {
        (**self).fetch(refresh)
    }
}
