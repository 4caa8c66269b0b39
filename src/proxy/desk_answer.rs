//! What Desk's answer tells the proxy besides itself: whether a 401 says the token is bad
//! (and costs a refresh), how long a 429 asks to wait, and the credits Desk has left.

use std::time::Duration;

use http::{HeaderMap, HeaderName};

/// The wait after a 429 that says nothing of one.
pub(super) const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Whether a 429 may be retried for a request: its method is one that, sent twice, does
/// no more than once. A method-override header counts as the method it claims (a server
/// behind Desk may honour it).
pub(super) fn is_idempotent(method: &http::Method, headers: &HeaderMap) -> bool {
    let idempotent = |method: &[u8]| {
        ["GET", "HEAD", "OPTIONS", "PUT", "DELETE"]
            .iter()
            .any(|m| method.eq_ignore_ascii_case(m.as_bytes()))
    };
    idempotent(method.as_str().as_bytes())
        && headers
            .iter()
            .filter(|(name, _)| crate::headers::METHOD_OVERRIDES.contains(name))
            .all(|(_, claimed)| {
                claimed
                    .as_bytes()
                    .split(|b| *b == b',')
                    .all(|m| idempotent(m.trim_ascii()))
            })
}

/// The wait a `Retry-After` asks for: seconds, or an HTTP date.
pub(super) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    // A wait no clock overflows adding (a request whose time is longer still is retried
    // after a day).
    const LONGEST: Duration = Duration::from_secs(86_400);
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs).min(LONGEST));
    }
    // Seconds past what a u64 holds: the longest wait, not none.
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return Some(LONGEST);
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .min(LONGEST),
    )
}

/// The remaining value of Desk's rate limit, when its answer carries one
/// (`X-Rate-Limit-Remaining-v3`, or `X-Rate-Limit-Remaining`).
pub(super) fn rate_limit_remaining(headers: &HeaderMap) -> Option<i64> {
    // Ready names: a lookup by `&str` would parse the name on every answer.
    static NAMES: [HeaderName; 2] = [
        HeaderName::from_static("x-rate-limit-remaining-v3"),
        HeaderName::from_static("x-rate-limit-remaining"),
    ];
    NAMES
        .iter()
        .find_map(|name| headers.get(name))
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.trim().parse().ok())
}

/// Whether a Desk 401 body says the token itself is bad (`INVALID_OAUTH`, or no
/// `errorCode` at all), as opposed to a valid token lacking rights.
pub(super) fn token_is_invalid(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct DeskError {
        #[serde(rename = "errorCode")]
        error_code: Option<String>,
    }
    match serde_json::from_slice::<DeskError>(body) {
        Ok(DeskError {
            error_code: Some(code),
        }) => code == "INVALID_OAUTH",
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    #[test]
    fn a_429_is_retried_for_idempotent_methods_and_what_an_override_claims() {
        use http::Method;
        let none = HeaderMap::new();
        for method in [
            Method::GET,
            Method::HEAD,
            Method::OPTIONS,
            Method::PUT,
            Method::DELETE,
        ] {
            assert!(is_idempotent(&method, &none), "{method}");
        }
        assert!(!is_idempotent(&Method::POST, &none));
        assert!(!is_idempotent(&Method::PATCH, &none));
        let mut claims = HeaderMap::new();
        claims.insert("x-http-method-override", "post".parse().unwrap());
        assert!(!is_idempotent(&Method::GET, &claims));
        claims.insert("x-http-method-override", "DELETE".parse().unwrap());
        assert!(is_idempotent(&Method::GET, &claims));
        claims.insert("x-method-override", "GET, PATCH".parse().unwrap());
        assert!(!is_idempotent(&Method::GET, &claims));
    }

    #[test]
    fn a_retry_after_of_any_size_is_a_wait_that_fits_a_clock() {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::RETRY_AFTER,
            "18446744073709551615".parse().unwrap(),
        );
        let wait = retry_after(&headers).unwrap();
        assert_eq!(wait, Duration::from_secs(86_400));
        assert!(Instant::now().checked_add(wait).is_some());
        headers.insert(
            http::header::RETRY_AFTER,
            "Fri, 31 Dec 9999 23:59:59 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(86_400)));
        headers.insert(
            http::header::RETRY_AFTER,
            "99999999999999999999".parse().unwrap(),
        );
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(86_400)));
        headers.insert(http::header::RETRY_AFTER, "2".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(2)));
    }

    #[test]
    fn desks_remaining_credits_are_read_from_the_v3_header_first() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.append(*name, http::HeaderValue::from_static(value));
            }
            map
        };
        let v3 = "x-rate-limit-remaining-v3";
        let v2 = "x-rate-limit-remaining";
        assert_eq!(rate_limit_remaining(&headers(&[])), None);
        assert_eq!(rate_limit_remaining(&headers(&[(v2, "7")])), Some(7));
        assert_eq!(
            rate_limit_remaining(&headers(&[(v2, "7"), (v3, "9")])),
            Some(9)
        );
        assert_eq!(
            rate_limit_remaining(&headers(&[(v3, " 9 "), (v2, "7")])),
            Some(9)
        );
        assert_eq!(
            rate_limit_remaining(&headers(&[(v3, "9"), (v3, "1")])),
            Some(9)
        );
        assert_eq!(rate_limit_remaining(&headers(&[(v3, "many")])), None);
    }

    #[test]
    fn which_401s_cost_a_refresh() {
        let table: &[(&str, bool)] = &[
            (
                r#"{"errorCode":"INVALID_OAUTH","message":"The OAuth Token you provided is invalid."}"#,
                true,
            ),
            ("", true),
            ("<html>Unauthorized</html>", true),
            (r#"{"message":"no code"}"#, true),
            (r#"{"errorCode":"SCOPE_MISMATCH","message":"…"}"#, false),
            (r#"{"errorCode":"OAUTH_ORG_MISMATCH","message":"…"}"#, false),
            (r#"{"errorCode":"UNAUTHORIZED","message":"…"}"#, false),
        ];
        for (body, refresh) in table {
            assert_eq!(token_is_invalid(body.as_bytes()), *refresh, "{body}");
        }
    }
}
