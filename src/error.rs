//! Errors of the proxy itself, answered in Zoho Desk's own error shape.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

/// A failure of the proxy, as a client sees it: a status and a Zoho-shaped JSON body
/// `{"errorCode":"PROXY_…","message":"…"}` (README "How requests are forwarded").
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    /// No valid token, and Accounts is unreachable, failing, throttling, or the refresh
    /// guard is closed.
    #[error("{message}")]
    TokenUnavailable {
        /// Why, in plain words.
        message: String,
        /// When a new attempt may succeed.
        retry_after: Duration,
    },
    /// Accounts rejected the client id, secret or refresh token: an operator must act.
    #[error("{0}")]
    AuthRejected(String),
    /// Desk could not be reached.
    #[error("{0}")]
    UpstreamUnreachable(String),
    /// Desk did not answer in time.
    #[error("{0}")]
    UpstreamTimeout(String),
    /// The proxy API key is missing or wrong.
    #[error("{0}")]
    Unauthorized(String),
    /// An access rule refused the request; the message names the rule.
    #[error("{0}")]
    Forbidden(String),
    /// `CONNECT`, `TRACE`, `TRACK`, or a method outside `allow_methods`.
    #[error("{message}")]
    MethodNotAllowed {
        /// Which rule refused it.
        message: String,
        /// The methods that would be accepted, for the `Allow` header.
        allow: HeaderValue,
    },
    /// A request the proxy cannot forward.
    #[error("{0}")]
    BadRequest(String),
    /// A path under the reserved `/_proxy/` prefix that names no endpoint.
    #[error("{0}")]
    NotFound(String),
    /// Replay mode: no recorded answer matches the request.
    #[error("{0}")]
    ReplayMiss(String),
    /// The client's request body stalled longer than `timeouts.body_read_secs`.
    #[error("{0}")]
    RequestTimeout(String),
    /// The client's request body broke (bad chunk framing, early end): a bad request,
    /// never Desk's failure.
    #[error("{0}")]
    BrokenBody(String),
    /// More header fields than the proxy accepts (431, as for an oversized HTTP/1 head).
    #[error("{0}")]
    HeadersTooLarge(String),
    /// The requests in progress hold as much as the proxy allows of something (HTTP/2
    /// request heads): 503 with `Retry-After`, try again shortly.
    #[error("{0}")]
    Overloaded(String),
}

impl ProxyError {
    /// The `errorCode` of the JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            Self::TokenUnavailable { .. } => "PROXY_TOKEN_UNAVAILABLE",
            Self::AuthRejected(_) => "PROXY_AUTH_REJECTED",
            Self::UpstreamUnreachable(_) => "PROXY_UPSTREAM_UNREACHABLE",
            Self::UpstreamTimeout(_) => "PROXY_UPSTREAM_TIMEOUT",
            Self::Unauthorized(_) => "PROXY_UNAUTHORIZED",
            Self::Forbidden(_) => "PROXY_FORBIDDEN",
            Self::MethodNotAllowed { .. } => "PROXY_METHOD_NOT_ALLOWED",
            Self::BadRequest(_) | Self::BrokenBody(_) | Self::HeadersTooLarge(_) => {
                "PROXY_BAD_REQUEST"
            }
            Self::NotFound(_) => "PROXY_NOT_FOUND",
            Self::ReplayMiss(_) => "PROXY_REPLAY_MISS",
            Self::RequestTimeout(_) => "PROXY_REQUEST_TIMEOUT",
            Self::Overloaded(_) => "PROXY_OVERLOADED",
        }
    }

    /// The HTTP status of the answer.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::TokenUnavailable { .. } | Self::AuthRejected(_) | Self::Overloaded(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::UpstreamUnreachable(_) => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::BadRequest(_) | Self::BrokenBody(_) => StatusCode::BAD_REQUEST,
            Self::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::NotFound(_) | Self::ReplayMiss(_) => StatusCode::NOT_FOUND,
            Self::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// The JSON body, `{"errorCode":…,"message":…}` and a newline.
    pub fn body(&self) -> Bytes {
        let body = serde_json::json!({ "errorCode": self.code(), "message": self.to_string() });
        let mut text = body.to_string();
        text.push('\n');
        Bytes::from(text)
    }

    /// Whether the client's connection is closed after this answer: the request's body
    /// was left unread (it stalled, or its framing broke), so nothing more on that
    /// connection can be trusted to start where a request starts.
    pub fn closes_connection(&self) -> bool {
        matches!(self, Self::RequestTimeout(_) | Self::BrokenBody(_))
    }

    /// The whole answer, with `Retry-After` where the error has one.
    pub fn to_response<B: From<Bytes>>(&self) -> Response<B> {
        let mut response = Response::new(B::from(self.body()));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json;charset=UTF-8"),
        );
        match self {
            Self::TokenUnavailable { retry_after, .. } => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(retry_after_secs(*retry_after)),
                );
            }
            Self::Overloaded(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            Self::Unauthorized(_) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"zoho-desk-proxy\""),
                );
            }
            Self::MethodNotAllowed { allow, .. } => {
                headers.insert(header::ALLOW, allow.clone());
            }
            _ => {}
        }
        response
    }
}

/// `Retry-After` in whole seconds, rounded up and at least 1.
pub fn retry_after_secs(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_the_spec_code_and_status() {
        let table = [
            (
                ProxyError::TokenUnavailable {
                    message: "x".into(),
                    retry_after: Duration::from_millis(1500),
                },
                "PROXY_TOKEN_UNAVAILABLE",
                503,
            ),
            (
                ProxyError::AuthRejected("x".into()),
                "PROXY_AUTH_REJECTED",
                503,
            ),
            (
                ProxyError::UpstreamUnreachable("x".into()),
                "PROXY_UPSTREAM_UNREACHABLE",
                502,
            ),
            (
                ProxyError::UpstreamTimeout("x".into()),
                "PROXY_UPSTREAM_TIMEOUT",
                504,
            ),
            (
                ProxyError::Unauthorized("x".into()),
                "PROXY_UNAUTHORIZED",
                401,
            ),
            (ProxyError::Forbidden("x".into()), "PROXY_FORBIDDEN", 403),
            (
                ProxyError::MethodNotAllowed {
                    message: "x".into(),
                    allow: HeaderValue::from_static("GET, HEAD"),
                },
                "PROXY_METHOD_NOT_ALLOWED",
                405,
            ),
            (ProxyError::BadRequest("x".into()), "PROXY_BAD_REQUEST", 400),
            (
                ProxyError::RequestTimeout("x".into()),
                "PROXY_REQUEST_TIMEOUT",
                408,
            ),
            (ProxyError::BrokenBody("x".into()), "PROXY_BAD_REQUEST", 400),
            (
                ProxyError::HeadersTooLarge("x".into()),
                "PROXY_BAD_REQUEST",
                431,
            ),
        ];
        for (err, code, status) in table {
            let response: Response<Bytes> = err.to_response();
            assert_eq!(response.status().as_u16(), status, "{code}");
            assert!(response.body().ends_with(b"}\n"), "{code}: a line of JSON");
            let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
            assert_eq!(body["errorCode"], code);
            assert_eq!(body["message"], "x");
            if status == 405 {
                assert_eq!(response.headers()[header::ALLOW], "GET, HEAD");
            }
        }
    }

    #[test]
    fn token_unavailable_carries_retry_after_rounded_up() {
        let err = ProxyError::TokenUnavailable {
            message: "x".into(),
            retry_after: Duration::from_millis(1500),
        };
        let response: Response<Bytes> = err.to_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
    }
}
