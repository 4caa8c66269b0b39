//! Header rules (README "How requests are forwarded"): what is removed, replaced and added on the way to Desk and
//! on the way back.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// The proxy's own client-key header (README "Security model").
pub static PROXY_KEY: HeaderName = HeaderName::from_static("x-proxy-key");
/// Zoho Desk's organisation header.
pub static ORG_ID: HeaderName = HeaderName::from_static("orgid");
/// The request id sent back to the client.
pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Headers through which some servers let a request claim another method.
pub static METHOD_OVERRIDES: [HeaderName; 3] = [
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
];

/// `Keep-Alive`, not among `http`'s standard names.
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
/// A field named by the `close` connection option, should a client send one.
static CLOSE: HeaderName = HeaderName::from_static("close");
/// The legacy `Proxy-Connection`.
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
/// The obsolete `Cookie2` (RFC 2965), a cookie all the same.
static COOKIE2: HeaderName = HeaderName::from_static("cookie2");

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the legacy `Proxy-Connection`, as ready
/// names (removing by `&str` would parse the name on every call).
fn hop_by_hop() -> [&'static HeaderName; 8] {
    [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &header::PROXY_AUTHORIZATION,
        &PROXY_CONNECTION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
    ]
}

/// Removes `Connection`, every header it names, and the fixed hop-by-hop set.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    remove_hop_by_hop_and(headers, |_| false);
}

/// Removes what [`remove_hop_by_hop`] does and every header `also` picks.
fn remove_hop_by_hop_and(headers: &mut HeaderMap, also: impl Fn(&HeaderName) -> bool) {
    if headers.keys().any(|n| n == header::CONNECTION) {
        // The names `Connection` lists are parsed once and removed by name: however many
        // a client lists, each costs one parse and one removal. The raw bytes are split:
        // a value with non-ASCII bytes still names headers to remove. `close` and
        // `keep-alive`, by far the most common, are matched without parsing, and kept
        // out of the list (no allocation for a `Connection` that names only them):
        // `keep-alive` is one of the fixed names removed below.
        let mut close = false;
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .map(<[u8]>::trim_ascii)
            .filter_map(|name| {
                if name.eq_ignore_ascii_case(b"keep-alive") {
                    None
                } else if name.eq_ignore_ascii_case(b"close") {
                    close = true;
                    None
                } else {
                    HeaderName::from_bytes(name).ok()
                }
            })
            .collect();
        if close {
            headers.remove(&CLOSE);
        }
        for name in named {
            headers.remove(name);
        }
    }
    // The fixed names are looked for among those present, and only those found are
    // removed: a message carries one or two of them, and a removal by name hashes it.
    // Each pass removes one, so there are at most as many passes as fixed names.
    let fixed = |name: &HeaderName| hop_by_hop().contains(&name) || also(name);
    while let Some(name) = headers.keys().find(|n| fixed(n)).cloned() {
        headers.remove(&name);
    }
}

/// The client's credentials, for the proxy or for another site, never Desk's:
/// `Authorization` (the token takes its place), `Proxy-Authorization`, the proxy key and
/// cookies (a browser's or a tool's cookies for localhost are not Zoho's). Never
/// forwarded, never recorded.
pub fn is_client_credential(name: &HeaderName) -> bool {
    [
        &header::AUTHORIZATION,
        &header::COOKIE,
        &header::PROXY_AUTHORIZATION,
        &PROXY_KEY,
        &COOKIE2,
    ]
    .contains(&name)
}

/// Whether a request's `Transfer-Encoding`, if any, is `chunked` alone: hyper takes that
/// framing off once, and any other coding under it (`gzip, chunked`, or `chunked` twice)
/// would reach Desk as bytes nothing says are coded. A body's own coding goes in
/// `Content-Encoding`.
pub fn transfer_coding_is_chunked(headers: &HeaderMap) -> bool {
    // A scan of the few names a request has costs less than a lookup by name.
    if !headers.keys().any(|n| n == header::TRANSFER_ENCODING) {
        return true;
    }
    let mut codings = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|coding| !coding.is_empty());
    match codings.next() {
        None => true,
        Some(coding) => coding.eq_ignore_ascii_case(b"chunked") && codings.next().is_none(),
    }
}

/// Turns the client's headers into Desk's: hop-by-hop, `Host`, `Expect` and the client's
/// credentials go (the token goes in when the request is sent); `orgId` is added when
/// configured and absent. Everything else passes unchanged.
pub fn prepare_request(headers: &mut HeaderMap, org_id: Option<&HeaderValue>) {
    remove_hop_by_hop_and(headers, |name| {
        // `Expect`: the proxy answered `100 Continue` itself when it started reading the
        // body.
        name == header::HOST || name == header::EXPECT || is_client_credential(name)
    });
    if let Some(org_id) = org_id
        && !headers.keys().any(|n| n == ORG_ID)
    {
        headers.insert(ORG_ID.clone(), org_id.clone());
    }
}

/// Turns Desk's response headers into the client's: only hop-by-hop headers go, with
/// `Proxy-Authenticate` (a challenge for the proxy before Desk, never for the client, who
/// would answer it with the `Proxy-Authorization` this proxy takes its keys from), and a
/// `Content-Length` beside `Transfer-Encoding` (the chunked framing wins, and the body
/// is sent on with a framing of the proxy's own, as HTTP/1.1 asks of a forwarder).
pub fn prepare_response(headers: &mut HeaderMap) {
    // A scan of the few names an answer has costs less than a lookup by name.
    let chunked = headers.keys().any(|n| n == header::TRANSFER_ENCODING);
    remove_hop_by_hop_and(headers, |name| {
        name == header::PROXY_AUTHENTICATE || (chunked && name == header::CONTENT_LENGTH)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn request_rules() {
        let org = HeaderValue::from_static("123");
        // (incoming headers, header, expected value after; None = removed)
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, Option<&'a str>);
        let table: &[Case] = &[
            (&[("authorization", "Bearer client")], "authorization", None),
            (&[("host", "127.0.0.1:8080")], "host", None),
            (&[("cookie", "session=1")], "cookie", None),
            (&[("cookie2", "$Version=1")], "cookie2", None),
            (&[("x-proxy-key", "k")], "x-proxy-key", None),
            (
                &[("proxy-authorization", "Bearer k")],
                "proxy-authorization",
                None,
            ),
            (
                &[("connection", "keep-alive, x-custom"), ("x-custom", "1")],
                "x-custom",
                None,
            ),
            (&[("connection", "close")], "connection", None),
            (&[("connection", "close"), ("close", "x")], "close", None),
            (
                &[
                    ("connection", "Keep-Alive"),
                    ("connection", " X-One ,x-two"),
                    ("x-one", "1"),
                    ("x-two", "2"),
                ],
                "x-two",
                None,
            ),
            (
                &[("connection", "x-one"), ("x-one", "1"), ("x-three", "3")],
                "x-three",
                Some("3"),
            ),
            (&[("keep-alive", "timeout=5")], "keep-alive", None),
            (&[("te", "trailers")], "te", None),
            (&[("trailer", "x")], "trailer", None),
            (
                &[("transfer-encoding", "chunked")],
                "transfer-encoding",
                None,
            ),
            (&[("upgrade", "websocket")], "upgrade", None),
            (
                &[("proxy-connection", "keep-alive")],
                "proxy-connection",
                None,
            ),
            (&[], "orgid", Some("123")),
            (&[("orgId", "999")], "orgid", Some("999")),
            (
                &[("content-encoding", "gzip")],
                "content-encoding",
                Some("gzip"),
            ),
            (
                &[("accept-encoding", "gzip, br")],
                "accept-encoding",
                Some("gzip, br"),
            ),
            (
                &[("content-type", "multipart/form-data; boundary=x")],
                "content-type",
                Some("multipart/form-data; boundary=x"),
            ),
        ];
        for (incoming, name, expected) in table {
            let mut h = map(incoming);
            prepare_request(&mut h, Some(&org));
            assert_eq!(
                h.get(*name).map(|v| v.to_str().unwrap()),
                *expected,
                "{incoming:?} → {name}"
            );
        }
    }

    #[test]
    fn org_id_is_not_added_when_unconfigured() {
        let mut h = HeaderMap::new();
        prepare_request(&mut h, None);
        assert!(h.get("orgid").is_none());
    }

    #[test]
    fn response_rules_keep_rate_limit_and_encoding_headers() {
        let mut h = map(&[
            ("connection", "close"),
            ("transfer-encoding", "chunked"),
            ("content-encoding", "gzip"),
            ("x-rate-limit-remaining-v3", "4999"),
            ("set-cookie", "a=b"),
        ]);
        prepare_response(&mut h);
        assert!(h.get("connection").is_none());
        assert!(h.get("transfer-encoding").is_none());

        // A length beside chunked framing is not the body's: it goes too.
        let mut framed = map(&[("transfer-encoding", "chunked"), ("content-length", "1")]);
        prepare_response(&mut framed);
        assert!(framed.is_empty(), "{framed:?}");
        assert_eq!(h["content-encoding"], "gzip");
        assert_eq!(h["x-rate-limit-remaining-v3"], "4999");
        assert_eq!(h["set-cookie"], "a=b");

        // What `Connection` names goes, `keep-alive` and `close` too.
        let mut h = map(&[
            ("connection", "Keep-Alive, close, x-hop"),
            ("keep-alive", "timeout=5"),
            ("close", "x"),
            ("x-hop", "1"),
            ("x-end", "2"),
        ]);
        prepare_response(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-end"], "2");

        // A gateway's challenge for proxy credentials is not the client's to answer.
        let mut h = map(&[("proxy-authenticate", "Basic realm=\"gw\""), ("x-end", "2")]);
        prepare_response(&mut h);
        assert!(h.get("proxy-authenticate").is_none(), "{h:?}");
        assert_eq!(h["x-end"], "2");
    }
}
