//! Where a request goes: the request target (origin-form, absolute-form; see README "How
//! requests are forwarded"), brought to its canonical path ([`crate::paths`]), and the
//! strict syntax of the host names a request gives (`Host`, `:authority`, absolute-form).

use std::borrow::Cow;
use std::net::Ipv6Addr;

use http::uri::PathAndQuery;
use http::{HeaderMap, Uri, Version, header};

use crate::error::ProxyError;
use crate::paths::{self, PathError};
use crate::url::BaseUrl;

/// A request that may be forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The canonical path and the query exactly as the client sent it: what the rules
    /// check and what is forwarded (sharing the request's bytes when the path was already
    /// canonical).
    pub path_and_query: PathAndQuery,
    /// The client used absolute-form, so its `Host` names the upstream.
    pub absolute_form: bool,
}

impl Target {
    /// The canonical path, without the query.
    pub fn path(&self) -> &str {
        self.path_and_query.path()
    }
}

/// Decides whether and where a request may be forwarded: its path brought to the
/// canonical form (400 when it has none), and an absolute-form target only for the
/// upstream's host (403 otherwise).
pub fn resolve(uri: &Uri, version: Version, upstream: &BaseUrl) -> Result<Target, ProxyError> {
    // HTTP/2 requests always carry :scheme and :authority; only HTTP/1 absolute-form
    // names a target host.
    let absolute_form = version != Version::HTTP_2 && uri.authority().is_some();
    if absolute_form {
        check_absolute_host(uri, upstream)?;
    } else if version == Version::HTTP_2 {
        check_scheme(uri.scheme_str().unwrap_or("https"))?;
    }
    let mut path_and_query = match uri.path_and_query() {
        Some(pq) => canonical(pq)?,
        None => PathAndQuery::from_static("/"),
    };
    if absolute_form && !upstream.prefix.is_empty() {
        // The URL names the upstream's resource in full, prefix included: the rules and
        // the joining to `upstream` take the path below it, as for origin-form.
        path_and_query = below_prefix(&path_and_query, upstream)?;
    }
    Ok(Target {
        path_and_query,
        absolute_form,
    })
}

/// An absolute-form target's path and query with the upstream's path prefix taken off;
/// a path outside the prefix is refused (403).
fn below_prefix(pq: &PathAndQuery, upstream: &BaseUrl) -> Result<PathAndQuery, ProxyError> {
    let below = pq
        .path()
        .strip_prefix(upstream.prefix.as_str())
        .filter(|rest| rest.is_empty() || rest.starts_with('/'))
        .ok_or_else(|| {
            ProxyError::Forbidden(format!(
                "absolute-form request for {} refused: this proxy forwards only below {upstream}",
                truncate(pq.path())
            ))
        })?;
    let path = if below.is_empty() { "/" } else { below };
    let text = match pq.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    };
    PathAndQuery::try_from(text)
        .map_err(|_| ProxyError::BadRequest("the request target cannot be forwarded".into()))
}

/// The path and query with the path in canonical form.
fn canonical(pq: &PathAndQuery) -> Result<PathAndQuery, ProxyError> {
    match paths::canonicalize(pq.path()).map_err(bad_path)? {
        Cow::Borrowed(_) => Ok(pq.clone()),
        Cow::Owned(path) => {
            let text = match pq.query() {
                Some(query) => format!("{path}?{query}"),
                None => path,
            };
            PathAndQuery::try_from(text).map_err(|_| {
                ProxyError::BadRequest("the request target cannot be forwarded".into())
            })
        }
    }
}

fn bad_path(err: PathError) -> ProxyError {
    ProxyError::BadRequest(err.to_string())
}

/// Checks the syntax of every host name the request gives: each `Host` header and the
/// URI's authority. A host name or IP literal with an optional numeric port; userinfo,
/// anything after `]`, a non-numeric port, two `Host` headers, or none on HTTP/1.1 are
/// 400.
pub fn check_host_syntax(
    uri: &Uri,
    version: Version,
    headers: &HeaderMap,
) -> Result<(), ProxyError> {
    check_host_headers(headers, version == Version::HTTP_11)?;
    if let Some(authority) = uri.authority() {
        host_name(authority.as_str())?;
    }
    Ok(())
}

/// Checks the `Host` headers of a request: at most one, a host name or IP literal with an
/// optional numeric port, and one when `required`.
pub fn check_host_headers(headers: &HeaderMap, required: bool) -> Result<(), ProxyError> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let first = hosts.next();
    if first.is_none() && required {
        return Err(ProxyError::BadRequest(
            "an HTTP/1.1 request must carry a Host header".into(),
        ));
    }
    if let Some(host) = first {
        if hosts.next().is_some() {
            return Err(ProxyError::BadRequest(
                "the request has more than one Host header".into(),
            ));
        }
        let text = host
            .to_str()
            .map_err(|_| ProxyError::BadRequest("the Host header is not ASCII".into()))?;
        host_name(text)?;
    }
    Ok(())
}

/// The host name of a `Host` value or an authority, as [`host_and_port`] parses it.
pub fn host_name(value: &str) -> Result<&str, ProxyError> {
    host_and_port(value).map(|(name, _)| name)
}

/// A host name as names are compared: an IPv6 address (the only name with a `:`) in its
/// usual form (`0:0::1` is `::1`), any other as it is.
pub fn comparable_host(name: &str) -> std::borrow::Cow<'_, str> {
    match name.contains(':').then(|| name.parse::<Ipv6Addr>()) {
        Some(Ok(ip)) => ip.to_string().into(),
        _ => name.into(),
    }
}

/// The host name and port of a `Host` value or an authority, strictly parsed: a name of
/// letters, digits, `-`, `.` and `_`, an IPv4 address, or an IPv6 address in brackets,
/// then an optional `:port` of digits. Brackets and a trailing dot are removed.
pub fn host_and_port(value: &str) -> Result<(&str, Option<u16>), ProxyError> {
    let bad = |what: &str| {
        // Whatever part the parse stumbled on, userinfo is the reason; the value is not
        // shown (a refusal is logged, and userinfo may hold a password).
        if value.contains('@') {
            return ProxyError::BadRequest(
                "the host has userinfo (user@), which is not allowed: a host name or IP address with an optional numeric port only".into(),
            );
        }
        ProxyError::BadRequest(format!(
            "the host {:?} is not a host name or IP address with an optional numeric port: {what}",
            truncate(value)
        ))
    };
    let (name, port) = if let Some(rest) = value.strip_prefix('[') {
        let (literal, after) = rest.split_once(']').ok_or_else(|| bad("no \"]\""))?;
        literal
            .parse::<Ipv6Addr>()
            .map_err(|_| bad("not an IPv6 address between the brackets"))?;
        let port = match after {
            "" => None,
            _ => Some(
                after
                    .strip_prefix(':')
                    .ok_or_else(|| bad("something after \"]\""))?,
            ),
        };
        (literal, port)
    } else {
        // A byte search: `str::split_once` with a `char` costs more than the whole
        // check on a name this short.
        match value.bytes().position(|b| b == b':') {
            Some(colon) => (&value[..colon], Some(&value[colon + 1..])),
            None => (value, None),
        }
    };
    let port = match port {
        None => None,
        Some(port) => {
            let numeric =
                !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit());
            match port.parse::<u16>() {
                Ok(port) if numeric => Some(port),
                _ => {
                    return Err(bad(
                        "the port is not a number from 0 to 65535 of at most 5 digits",
                    ));
                }
            }
        }
    };
    if !value.starts_with('[') {
        if name.is_empty() {
            return Err(bad("no host name"));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        {
            return Err(bad(
                "a host name has only letters, digits, \"-\", \".\" and \"_\"",
            ));
        }
    }
    Ok((name.strip_suffix('.').unwrap_or(name), port))
}

/// A request's scheme (the absolute-form target's, or HTTP/2's `:scheme`): http or https.
fn check_scheme(scheme: &str) -> Result<(), ProxyError> {
    if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https") {
        Ok(())
    } else {
        Err(ProxyError::BadRequest(format!(
            "the request target's scheme {:?} cannot be forwarded: http or https only",
            truncate(scheme)
        )))
    }
}

fn check_absolute_host(uri: &Uri, upstream: &BaseUrl) -> Result<(), ProxyError> {
    check_scheme(uri.scheme_str().unwrap_or(""))?;
    let authority = uri.authority().map_or("", |a| a.as_str());
    let host = host_name(authority)?;
    let same_host = host.eq_ignore_ascii_case(upstream.host_as_written());
    let same_port = uri.port_u16().is_none_or(|port| port == upstream.port());
    if same_host && same_port {
        Ok(())
    } else {
        Err(ProxyError::Forbidden(format!(
            "absolute-form request to {} refused: this proxy forwards only to {}",
            truncate(authority),
            upstream.authority
        )))
    }
}

/// Refuses a path that has no canonical form (see [`crate::paths`]).
pub fn check_path(path: &str) -> Result<(), ProxyError> {
    paths::canonicalize(path).map(|_| ()).map_err(bad_path)
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
        BaseUrl::parse("https://desk.zoho.com").unwrap()
    }

    fn resolve_str(target: &str, version: Version) -> Result<Target, ProxyError> {
        let uri: Uri = target.parse().unwrap();
        resolve(&uri, version, &upstream())
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
            ("/api/v1/tickets/..;/agents", false),
            ("/api/v1/agents;x=1", false),
        ];
        for (target, ok) in table {
            let result = resolve_str(target, Version::HTTP_11);
            assert_eq!(result.is_ok(), ok, "{target}: {result:?}");
            if let Err(e) = result {
                assert_eq!(e.code(), "PROXY_BAD_REQUEST");
            }
        }
    }

    #[test]
    fn the_query_is_kept_byte_for_byte_and_the_path_made_canonical() {
        let t = resolve_str("/api/v1/tickets?q=a%2Fb+c%20d&x=%7E", Version::HTTP_11).unwrap();
        assert_eq!(t.path_and_query, "/api/v1/tickets?q=a%2Fb+c%20d&x=%7E");
        assert_eq!(t.path(), "/api/v1/tickets");
        let t = resolve_str("/api/v1/%61gents/caf%c3%a9?q=%61", Version::HTTP_11).unwrap();
        assert_eq!(t.path_and_query, "/api/v1/agents/caf%c3%a9?q=%61");
    }

    #[test]
    fn absolute_form_only_to_the_upstream() {
        let table = [
            ("http://desk.zoho.com/api/v1/tickets", Some(true)),
            ("http://DESK.zoho.com/api/v1/tickets", Some(true)),
            ("https://desk.zoho.com:443/api/v1/tickets", Some(true)),
            ("http://desk.zoho.com:80/api/v1/tickets", Some(false)),
            ("http://evil.example/api/v1/tickets", Some(false)),
            (
                "http://desk.zoho.com.evil.example/api/v1/tickets",
                Some(false),
            ),
            ("http://user@desk.zoho.com/api/v1/tickets", None),
            ("ftp://desk.zoho.com/api/v1/tickets", None),
            ("ws://desk.zoho.com/api/v1/tickets", None),
        ];
        for (target, ok) in table {
            let result = resolve_str(target, Version::HTTP_11);
            match (ok, result) {
                (Some(true), Ok(t)) => assert!(t.absolute_form),
                (Some(false), Err(e)) => assert_eq!(e.status(), 403, "{target}"),
                (None, Err(e)) => assert_eq!(e.status(), 400, "{target}"),
                (_, other) => panic!("{target}: {other:?}"),
            }
        }
    }

    #[test]
    fn absolute_form_names_the_upstream_s_prefix_which_is_taken_off() {
        let upstream = BaseUrl::parse("http://gw.example:9000/zoho/desk").unwrap();
        let table = [
            (
                "http://gw.example:9000/zoho/desk/api/v1/tickets?limit=2",
                Some("/api/v1/tickets?limit=2"),
            ),
            ("http://gw.example:9000/zoho/desk", Some("/")),
            ("http://gw.example:9000/zoho/desk/", Some("/")),
            ("http://gw.example:9000/zoho/desk?x=1", Some("/?x=1")),
            ("http://gw.example:9000/zoho/desktop/api", None),
            ("http://gw.example:9000/api/v1/tickets", None),
            ("http://gw.example:9000/ZOHO/desk/api/v1/tickets", None),
        ];
        for (target, below) in table {
            let result = resolve(&target.parse().unwrap(), Version::HTTP_11, &upstream);
            match (below, result) {
                (Some(below), Ok(t)) => assert_eq!(t.path_and_query, below, "{target}"),
                (None, Err(e)) => assert_eq!(e.status(), 403, "{target}"),
                (_, other) => panic!("{target}: {other:?}"),
            }
        }
        // Origin-form paths are below the prefix already.
        let t = resolve(
            &"/api/v1/tickets".parse().unwrap(),
            Version::HTTP_11,
            &upstream,
        )
        .unwrap();
        assert_eq!(t.path_and_query, "/api/v1/tickets");
    }

    #[test]
    fn http2_authority_is_not_absolute_form() {
        let t = resolve_str("http://127.0.0.1:8080/api/v1/tickets", Version::HTTP_2).unwrap();
        assert!(!t.absolute_form);
        assert_eq!(t.path_and_query, "/api/v1/tickets");
        // `:scheme` as any other target's scheme: http or https.
        let err = resolve_str("ftp://127.0.0.1:8080/api/v1/tickets", Version::HTTP_2).unwrap_err();
        assert_eq!(err.status(), 400);
    }

    #[test]
    fn host_names_are_parsed_strictly() {
        let table: &[(&str, Option<&str>)] = &[
            ("localhost", Some("localhost")),
            ("localhost:8080", Some("localhost")),
            ("localhost.", Some("localhost")),
            ("127.0.0.1:8080", Some("127.0.0.1")),
            ("[::1]", Some("::1")),
            ("[::1]:8080", Some("::1")),
            ("zoho-proxy_1.ci", Some("zoho-proxy_1.ci")),
            ("user@localhost", None),
            ("user:pw@localhost:8080", None),
            ("localhost:80a", None),
            ("localhost:", None),
            ("localhost:99999", None),
            ("localhost:8080:1", None),
            ("[::1]x", None),
            ("[::1]:8080x", None),
            ("[::1", None),
            ("[evil.example]", None),
            ("::1", None),
            ("", None),
            (":8080", None),
            ("local host", None),
            ("evil.example/path", None),
        ];
        for (value, expected) in table {
            let got = host_name(value);
            assert_eq!(got.as_ref().ok().copied(), *expected, "{value:?}: {got:?}");
            if let Err(e) = got {
                assert_eq!(e.code(), "PROXY_BAD_REQUEST");
                if value.contains('@') {
                    assert!(e.to_string().contains("userinfo"), "{value:?}: {e}");
                }
            }
        }
    }

    #[test]
    fn two_host_headers_or_none_on_http_1_1_are_a_bad_request() {
        let mut headers = HeaderMap::new();
        let uri: Uri = "/".parse().unwrap();
        let check = |headers: &HeaderMap, version| check_host_syntax(&uri, version, headers);
        assert_eq!(check(&headers, Version::HTTP_11).unwrap_err().status(), 400);
        // HTTP/1.0 may leave it out (the access rules then refuse it, naming them).
        assert!(check(&headers, Version::HTTP_10).is_ok());
        headers.append(header::HOST, "localhost".parse().unwrap());
        assert!(check(&headers, Version::HTTP_11).is_ok());
        headers.append(header::HOST, "evil.example".parse().unwrap());
        assert_eq!(check(&headers, Version::HTTP_11).unwrap_err().status(), 400);
    }
}
