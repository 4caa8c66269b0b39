//! Where a request goes: the request target of SPEC §5 (origin-form, absolute-form,
//! `CONNECT`) and the path checks that keep path rules meaningful.

use http::uri::PathAndQuery;
use http::{Method, Uri, Version};
use percent_encoding::percent_decode_str;

use crate::config::BaseUrl;
use crate::error::ProxyError;

/// A request that may be forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The path and query exactly as the client sent them (sharing the request's bytes).
    pub path_and_query: PathAndQuery,
    /// The client used absolute-form, so its `Host` names the upstream (SPEC §5).
    pub absolute_form: bool,
}

impl Target {
    /// The path without the query.
    pub fn path(&self) -> &str {
        self.path_and_query.path()
    }
}

/// Decides whether and where a request may be forwarded.
pub fn resolve(
    method: &Method,
    uri: &Uri,
    version: Version,
    upstream: &BaseUrl,
) -> Result<Target, ProxyError> {
    if method == Method::CONNECT {
        return Err(ProxyError::MethodNotAllowed(
            "CONNECT is not supported: this is a reverse proxy for the Zoho Desk API, send plain HTTP requests to it".into(),
        ));
    }
    // HTTP/2 requests always carry :scheme and :authority; only HTTP/1 absolute-form
    // names a target host.
    let absolute_form = version != Version::HTTP_2 && uri.authority().is_some();
    if absolute_form {
        check_absolute_host(uri, upstream)?;
    }
    let path_and_query = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    check_path(uri.path())?;
    Ok(Target {
        path_and_query,
        absolute_form,
    })
}

fn check_absolute_host(uri: &Uri, upstream: &BaseUrl) -> Result<(), ProxyError> {
    let host = uri
        .host()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let same_host = host.eq_ignore_ascii_case(&upstream.host());
    let same_port = uri.port_u16().is_none_or(|port| port == upstream.port());
    if same_host && same_port {
        Ok(())
    } else {
        Err(ProxyError::Forbidden(format!(
            "absolute-form request to {} refused: this proxy forwards only to {}",
            uri.authority().map_or("", |a| a.as_str()),
            upstream.authority
        )))
    }
}

/// Refuses paths with dot-segments (`/../`, `/./`, percent-encoded too) or empty segments
/// (`//`): Desk never needs them, and they would defeat path rules.
pub fn check_path(path: &str) -> Result<(), ProxyError> {
    if !path.starts_with('/') {
        return Err(ProxyError::BadRequest(format!(
            "the request target must be a path starting with \"/\" (got {:?})",
            truncate(path)
        )));
    }
    if path.contains("//") {
        return Err(ProxyError::BadRequest(
            "the path has an empty segment (\"//\"); Zoho Desk paths never do".into(),
        ));
    }
    for segment in path.split('/') {
        let decoded: Vec<u8> = percent_decode_str(segment).collect();
        let dotted = decoded
            .split(|b| *b == b'/' || *b == b'\\')
            .any(|piece| piece == b"." || piece == b"..");
        if dotted {
            return Err(ProxyError::BadRequest(
                "the path has a dot-segment (\".\" or \"..\", possibly percent-encoded); Zoho Desk paths never do".into(),
            ));
        }
    }
    Ok(())
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream() -> BaseUrl {
        BaseUrl::parse("upstream", "https://desk.zoho.com").unwrap()
    }

    fn resolve_str(method: &str, target: &str, version: Version) -> Result<Target, ProxyError> {
        let uri: Uri = target.parse().unwrap();
        resolve(
            &Method::from_bytes(method.as_bytes()).unwrap(),
            &uri,
            version,
            &upstream(),
        )
    }

    #[test]
    fn paths_allowed_and_refused() {
        let table = [
            ("/api/v1/tickets", true),
            ("/api/v1/tickets/", true),
            ("/api/v1/tickets?limit=10&q=a%2Fb+c%20d", true),
            ("/api/v1/search?q=..", true),
            ("/api/v1/a..b/c", true),
            ("/api/v1/.well", true),
            ("/api/v1/../admin", false),
            ("/api/v1/./tickets", false),
            ("/api/v1/%2e%2e/admin", false),
            ("/api/v1/%2E%2e/admin", false),
            ("/api/v1/.%2e/admin", false),
            ("/api/v1/%2e/tickets", false),
            ("/api/v1/x%2f..%2fadmin", false),
            ("/api/v1/x%5c..%5cadmin", false),
            ("/api/v1//tickets", false),
            ("//api/v1/tickets", false),
            ("/..", false),
        ];
        for (target, ok) in table {
            let result = resolve_str("GET", target, Version::HTTP_11);
            assert_eq!(result.is_ok(), ok, "{target}: {result:?}");
            if let Err(e) = result {
                assert_eq!(e.code(), "PROXY_BAD_REQUEST");
            }
        }
    }

    #[test]
    fn path_and_query_are_kept_byte_for_byte() {
        let t = resolve_str(
            "GET",
            "/api/v1/tickets?q=a%2Fb+c%20d&x=%7E",
            Version::HTTP_11,
        )
        .unwrap();
        assert_eq!(t.path_and_query, "/api/v1/tickets?q=a%2Fb+c%20d&x=%7E");
        assert_eq!(t.path(), "/api/v1/tickets");
    }

    #[test]
    fn absolute_form_only_to_the_upstream() {
        let table = [
            ("http://desk.zoho.com/api/v1/tickets", true),
            ("http://DESK.zoho.com/api/v1/tickets", true),
            ("https://desk.zoho.com:443/api/v1/tickets", true),
            ("http://desk.zoho.com:80/api/v1/tickets", false),
            ("http://evil.example/api/v1/tickets", false),
            ("http://desk.zoho.com.evil.example/api/v1/tickets", false),
        ];
        for (target, ok) in table {
            let result = resolve_str("GET", target, Version::HTTP_11);
            assert_eq!(result.is_ok(), ok, "{target}: {result:?}");
            match result {
                Ok(t) => assert!(t.absolute_form),
                Err(e) => assert_eq!(e.status(), 403),
            }
        }
    }

    #[test]
    fn http2_authority_is_not_absolute_form() {
        let t = resolve_str(
            "GET",
            "http://127.0.0.1:8080/api/v1/tickets",
            Version::HTTP_2,
        )
        .unwrap();
        assert!(!t.absolute_form);
        assert_eq!(t.path_and_query, "/api/v1/tickets");
    }

    #[test]
    fn connect_is_refused() {
        let uri: Uri = "desk.zoho.com:443".parse().unwrap();
        let err = resolve(&Method::CONNECT, &uri, Version::HTTP_11, &upstream()).unwrap_err();
        assert_eq!(err.code(), "PROXY_METHOD_NOT_ALLOWED");
    }
}
