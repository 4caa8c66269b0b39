//! The proxy's own endpoints under `/_proxy/` (README "Operations"); never forwarded.
//! They see the proxy through a narrow [`Status`] view, and say which of them reveal
//! nothing ([`Endpoint::is_public`]); the router applies the access rules.

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};

use crate::body::ResponseBody;
use crate::budget::ByteBudget;
use crate::concurrency::DeskSlots;
use crate::error::ProxyError;
use crate::metrics::Metrics;
use crate::observe::Lifecycle;
use crate::record::Replay;
use crate::token::Readiness;
use crate::token::TokenCache;
use crate::token::shared::StoreStatus;

/// The reserved prefix.
pub const PREFIX: &str = "/_proxy/";

/// What the endpoints report from: the proxy's state, read-only.
pub struct Status<'a> {
    /// Draining after SIGTERM?
    pub lifecycle: &'a Lifecycle,
    /// The token.
    pub tokens: &'a TokenCache,
    /// The series.
    pub metrics: &'a Metrics,
    /// Request-body bytes held for 401 retries.
    pub buffered: &'a ByteBudget,
    /// The shared token store's health, when there is one.
    pub store: Option<&'a StoreStatus>,
    /// Desk's concurrent calls.
    pub desk: &'a DeskSlots,
    /// The recording being replayed, in replay mode.
    pub replay: Option<&'a Replay>,
}

/// One of the proxy's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `GET /_proxy/health`.
    Health,
    /// `GET /_proxy/ready`.
    Ready,
    /// `GET /_proxy/metrics`.
    Metrics,
}

impl Endpoint {
    /// The endpoint `/_proxy/<name>` names, or a 404 that lists them.
    pub fn parse(name: &str) -> Result<Self, ProxyError> {
        match name {
            "health" => Ok(Self::Health),
            "ready" => Ok(Self::Ready),
            "metrics" => Ok(Self::Metrics),
            _ => Err(ProxyError::NotFound(format!(
                "{PREFIX}{name} is not an endpoint of the proxy (there are {PREFIX}health, {PREFIX}ready and {PREFIX}metrics)"
            ))),
        }
    }

    /// Its name under `/_proxy/`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Health => "health",
            Self::Ready => "ready",
            Self::Metrics => "metrics",
        }
    }

    /// Whether it reveals nothing, and so stays open to every client that may connect
    /// (load balancers and probes carry no key).
    pub fn is_public(self) -> bool {
        matches!(self, Self::Health | Self::Ready)
    }
}

/// The name a path gives under the reserved prefix (`""` for `/_proxy` itself, which is
/// reserved too), or `None` for a path of Desk's.
pub fn reserved_name(path: &str) -> Option<&str> {
    match path.strip_prefix(PREFIX) {
        Some(name) => Some(name),
        None => (path == &PREFIX[..PREFIX.len() - 1]).then_some(""),
    }
}

/// Whether a request's path (as sent, before it is made canonical) names one of the
/// proxy's own endpoints, which it answers at once without going to Desk.
pub fn is_local(raw_path: &str) -> bool {
    reserved_name(raw_path).is_some()
}

/// Answers `GET` or `HEAD` of an endpoint.
pub fn answer<B>(
    status: &Status<'_>,
    endpoint: Endpoint,
    req: &Request<B>,
) -> Result<Response<ResponseBody>, ProxyError> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Err(ProxyError::MethodNotAllowed {
            message: format!("{PREFIX}{} answers GET and HEAD only", endpoint.name()),
            allow: HeaderValue::from_static("GET, HEAD"),
        });
    }
    Ok(match endpoint {
        Endpoint::Health => json(StatusCode::OK, serde_json::json!({ "status": "ok" })),
        Endpoint::Ready => ready(status),
        Endpoint::Metrics => metrics(status, req),
    })
}

fn ready(status: &Status<'_>) -> Response<ResponseBody> {
    if status.lifecycle.is_draining() {
        return json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({ "status": "not_ready", "reason": "shutting down" }),
        );
    }
    if let Some(replay) = status.replay {
        // Every answer comes from the file: ready as long as the process runs.
        return json(
            StatusCode::OK,
            serde_json::json!({
                "status": "ready",
                "mode": "replay",
                "replay_entries": replay.entries(),
            }),
        );
    }
    let (code, mut body) = match status.tokens.readiness() {
        Readiness::Ready(remaining) => (
            StatusCode::OK,
            serde_json::json!({ "status": "ready", "token_expires_in_secs": remaining.as_secs() }),
        ),
        Readiness::NotReady(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({ "status": "not_ready", "reason": reason }),
        ),
    };
    // A degraded store does not stop the proxy serving: it says so and stays ready.
    if let Some(store) = status.store {
        body["token_store"] = match store.degraded() {
            None => "ok".into(),
            Some(error) => {
                body["token_store_error"] = error.into();
                "degraded".into()
            }
        };
    }
    body["desk_max_concurrent"] = status.desk.limit().into();
    if let Some(fleet) = status.desk.fleet_status() {
        // Like the store: a fleet count that fell back to the local share still serves.
        body["desk_concurrency"] = match fleet.degraded {
            None => "fleet".into(),
            Some(error) => {
                body["desk_concurrency_error"] = error.into();
                body["desk_concurrency_share"] = fleet.share.into();
                "local_share".into()
            }
        };
        body["desk_replicas"] = fleet.replicas.into();
        body["desk_fleet_in_flight"] = fleet.fleet_held.into();
    }
    if let Some(remaining) = status.metrics.desk_rate_limit_remaining() {
        body["desk_rate_limit_remaining"] = remaining.into();
    }
    json(code, body)
}

/// Classic Prometheus text, or OpenMetrics when the scraper asks for it.
fn metrics<B>(status: &Status<'_>, req: &Request<B>) -> Response<ResponseBody> {
    let now = tokio::time::Instant::now();
    let expires_in = status
        .tokens
        .current()
        .filter(|t| status.tokens.is_usable(t, now))
        .map(|t| t.expires_at - now);
    let openmetrics = req.headers().get_all(header::ACCEPT).iter().any(|v| {
        String::from_utf8_lossy(v.as_bytes())
            .to_ascii_lowercase()
            .contains("application/openmetrics-text")
    });
    let (text, content_type) =
        status
            .metrics
            .encode(expires_in, status.buffered.held(), openmetrics);
    let mut response = Response::new(ResponseBody::full(text));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn json(status: StatusCode, body: serde_json::Value) -> Response<ResponseBody> {
    let mut text = body.to_string();
    text.push('\n');
    let mut response = Response::new(ResponseBody::full(Bytes::from(text)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
