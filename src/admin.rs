//! The proxy's own endpoints under `/_proxy/` (SPEC §4); never forwarded.

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};

use crate::body::ResponseBody;
use crate::error::ProxyError;
use crate::proxy::Proxy;
use crate::token::cache::Readiness;

/// The reserved prefix.
pub const PREFIX: &str = "/_proxy/";

/// Endpoints that reveal nothing and stay open to every client that may connect.
pub fn is_public(endpoint: &str) -> bool {
    matches!(endpoint, "health" | "ready")
}

/// Whether a request's path (as sent, before it is made canonical) names one of the
/// proxy's own endpoints, which it answers at once without going to Desk.
pub fn is_local(raw_path: &str) -> bool {
    raw_path.starts_with(PREFIX)
}

/// Answers `GET /_proxy/<endpoint>`.
pub fn answer<B>(
    proxy: &Proxy,
    req: &Request<B>,
    endpoint: &str,
) -> Result<Response<ResponseBody>, ProxyError> {
    if !matches!(endpoint, "health" | "ready" | "metrics") {
        return Err(ProxyError::NotFound(format!(
            "{PREFIX}{endpoint} is not an endpoint of the proxy (there are {PREFIX}health, {PREFIX}ready and {PREFIX}metrics)"
        )));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Err(ProxyError::MethodNotAllowed {
            message: format!("{PREFIX}{endpoint} answers GET and HEAD only"),
            allow: HeaderValue::from_static("GET, HEAD"),
        });
    }
    Ok(match endpoint {
        "health" => json(StatusCode::OK, serde_json::json!({ "status": "ok" })),
        "ready" => ready(proxy),
        _ => metrics(proxy),
    })
}

fn ready(proxy: &Proxy) -> Response<ResponseBody> {
    if proxy.lifecycle.is_draining() {
        return json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({ "status": "not_ready", "reason": "shutting down" }),
        );
    }
    let (status, mut body) = match proxy.tokens.readiness() {
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
    if let Some(store) = &proxy.store {
        body["token_store"] = match store.degraded() {
            None => "ok".into(),
            Some(error) => {
                body["token_store_error"] = error.into();
                "degraded".into()
            }
        };
    }
    json(status, body)
}

fn metrics(proxy: &Proxy) -> Response<ResponseBody> {
    let now = tokio::time::Instant::now();
    let expires_in = proxy
        .tokens
        .current()
        .filter(|t| t.is_valid_at(now))
        .map(|t| t.expires_at - now);
    let text = proxy.metrics.encode(expires_in, proxy.buffered.held());
    let mut response = Response::new(ResponseBody::full(text));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
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
