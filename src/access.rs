//! Access rules (README "Security model"): client keys, `Host`, `Origin` and
//! `Sec-Fetch-Site`, methods (and the headers that override them), paths, client IPs.
//! Every refusal names the rule that fired.

use std::net::SocketAddr;

use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, header};
use ipnet::IpNet;
use subtle::ConstantTimeEq;

use crate::config::AccessConfig;
use crate::error::ProxyError;
use crate::headers::PROXY_KEY;
use crate::paths::PathRule;
use crate::secret::Secret;
use crate::target::{self, Target};

/// Methods never forwarded: `CONNECT` (this is not a tunnel), and `TRACE` / `TRACK`, whose
/// echo would hand the injected token to the client.
const NEVER_FORWARDED: [&str; 3] = ["CONNECT", "TRACE", "TRACK"];

/// The methods a proxy without `allow_methods` answers, for the `Allow` header.
const DEFAULT_ALLOW: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

static SEC_FETCH_SITE: HeaderName = HeaderName::from_static("sec-fetch-site");

/// The compiled access rules.
#[derive(Debug)]
pub struct AccessPolicy {
    api_keys: Vec<Secret<String>>,
    allow_methods: Option<Vec<Method>>,
    /// The `Allow` header of a 405.
    allow: HeaderValue,
    allow_paths: Vec<PathRule>,
    deny_paths: Vec<PathRule>,
    /// Lower-case host names; `*` accepts any.
    allow_hosts: Vec<String>,
    allow_origins: Vec<String>,
    allow_cidrs: Vec<IpNet>,
}

impl AccessPolicy {
    /// The policy of a validated configuration (its rules are compiled already).
    pub fn new(access: &AccessConfig, listen: SocketAddr) -> Self {
        let allow = match &access.allow_methods {
            None => HeaderValue::from_static(DEFAULT_ALLOW),
            Some(methods) => {
                let listed: Vec<&str> = methods.iter().map(Method::as_str).collect();
                HeaderValue::from_str(&listed.join(", "))
                    .unwrap_or(HeaderValue::from_static(DEFAULT_ALLOW))
            }
        };
        Self {
            api_keys: access.api_keys.clone(),
            allow_methods: access.allow_methods.clone(),
            allow,
            allow_paths: access.allow_paths.clone(),
            deny_paths: access.deny_paths.clone(),
            allow_hosts: access
                .allow_hosts
                .clone()
                .unwrap_or_else(|| default_hosts(listen)),
            allow_origins: access.allow_origins.clone(),
            allow_cidrs: access.allow_cidrs.clone(),
        }
    }

    /// Whether clients must present a key.
    pub fn requires_key(&self) -> bool {
        !self.api_keys.is_empty()
    }

    /// Refuses the methods that are never forwarded, whatever the rules: `CONNECT`,
    /// `TRACE`, `TRACK` (405 with `Allow`).
    pub fn check_method_is_forwardable(&self, method: &Method) -> Result<(), ProxyError> {
        // In any case: method names are case-sensitive in HTTP, but a server further on
        // may not hold to that, and `trace` must not reach it with the token.
        if NEVER_FORWARDED
            .iter()
            .any(|never| never.eq_ignore_ascii_case(method.as_str()))
        {
            let why = if method.as_str().eq_ignore_ascii_case("CONNECT") {
                "CONNECT is not supported: this is a reverse proxy for the Zoho Desk API, send plain HTTP requests to it"
            } else {
                "TRACE and TRACK are never forwarded: Desk's echo would carry the proxy's token"
            };
            return Err(self.method_not_allowed(why.into()));
        }
        Ok(())
    }

    /// Rules for a request to be forwarded.
    pub fn check<B>(
        &self,
        req: &Request<B>,
        peer: SocketAddr,
        target: &Target,
    ) -> Result<(), ProxyError> {
        self.check_peer(peer)?;
        if !target.absolute_form {
            self.check_host(req)?;
        }
        self.check_origin(req.headers())?;
        self.check_key(req.headers())?;
        self.check_method(req.method(), req.headers())?;
        self.check_path(target.path())
    }

    /// Rules for a `CONNECT` of transparent mode: the client's address, `Origin`, and key
    /// (`Proxy-Authorization: Bearer <key>`, or `Basic` with the key as the password, as
    /// `HTTPS_PROXY=http://user:key@host` sends it). Its `Host` names the target, not the
    /// proxy.
    pub fn check_connect<B>(&self, req: &Request<B>, peer: SocketAddr) -> Result<(), ProxyError> {
        self.check_peer(peer)?;
        self.check_connect_client(req)
    }

    /// [`AccessPolicy::check_connect`] but the address, when that was checked first.
    pub fn check_connect_client<B>(&self, req: &Request<B>) -> Result<(), ProxyError> {
        self.check_origin(req.headers())?;
        self.check_key(req.headers())
    }

    /// Rules for a request inside a tunnel: as for any forwarded request, but its `Host`
    /// names Zoho and its key was checked on the `CONNECT`.
    pub fn check_tunneled<B>(
        &self,
        req: &Request<B>,
        peer: SocketAddr,
        target: &Target,
    ) -> Result<(), ProxyError> {
        self.check_peer(peer)?;
        self.check_origin(req.headers())?;
        self.check_method(req.method(), req.headers())?;
        self.check_path(target.path())
    }

    /// Rules for the proxy's own endpoints that reveal something (metrics): the client's
    /// address, `Host`, `Origin` and key, as for forwarded requests.
    pub fn check_private<B>(&self, req: &Request<B>, peer: SocketAddr) -> Result<(), ProxyError> {
        self.check_peer(peer)?;
        self.check_host(req)?;
        self.check_origin(req.headers())?;
        self.check_key(req.headers())
    }

    /// Rules for the proxy's endpoints that reveal nothing (health, ready): only the
    /// client's address, so that load balancers and probes reach them.
    pub fn check_peer(&self, peer: SocketAddr) -> Result<(), ProxyError> {
        let ip = peer.ip().to_canonical();
        if self.allow_cidrs.is_empty() || self.allow_cidrs.iter().any(|net| net.contains(&ip)) {
            Ok(())
        } else {
            Err(ProxyError::Forbidden(format!(
                "access.allow_cidrs: client address {ip} is not allowed"
            )))
        }
    }

    /// Every name the request gives for the proxy (its `Host`, and the `:authority` of an
    /// HTTP/2 request) must be allowed.
    fn check_host<B>(&self, req: &Request<B>) -> Result<(), ProxyError> {
        if self.allow_hosts.iter().any(|h| h == "*") {
            return Ok(());
        }
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok());
        let authority = req.uri().authority().map(|a| a.as_str());
        if host.is_none() && authority.is_none() {
            return Err(ProxyError::Forbidden(
                "access.allow_hosts: the request has no Host header".into(),
            ));
        }
        for given in host.into_iter().chain(authority) {
            // As allowed names are stored.
            let name = target::comparable_host(target::host_name(given)?);
            let name = name.as_ref();
            // Allowed names are stored lower-cased; compare without allocating.
            if !self
                .allow_hosts
                .iter()
                .any(|h| h.eq_ignore_ascii_case(name))
            {
                return Err(ProxyError::Forbidden(format!(
                    "access.allow_hosts: Host {name:?} is not allowed (a guard against DNS rebinding; add it to access.allow_hosts if you use that name)"
                )));
            }
        }
        Ok(())
    }

    /// A browser's request is refused unless its `Origin` is allowed: one with another
    /// `Origin`, and one that says it comes from another site (`Sec-Fetch-Site`) without
    /// an allowed `Origin` (a blind cross-site GET must not spend the user's token).
    /// Every `Origin` and `Sec-Fetch-Site` the request carries is checked: all of them
    /// are forwarded.
    fn check_origin(&self, headers: &HeaderMap) -> Result<(), ProxyError> {
        let origins = headers.get_all(header::ORIGIN);
        if origins.iter().next().is_some() {
            // Allowed origins are stored lower-cased; compare without allocating.
            let refused = origins
                .iter()
                .map(|o| o.to_str().unwrap_or("").trim_end_matches('/'))
                .find(|o| !self.allow_origins.iter().any(|a| a.eq_ignore_ascii_case(o)));
            return match refused {
                Some(origin) => Err(ProxyError::Forbidden(format!(
                    "access.allow_origins: browser Origin {:?} is not allowed (web pages must not drive the proxy)",
                    origin.to_ascii_lowercase()
                ))),
                None => Ok(()),
            };
        }
        if let Some(site) = headers
            .get_all(&SEC_FETCH_SITE)
            .iter()
            .map(HeaderValue::as_bytes)
            .find(|s| s.eq_ignore_ascii_case(b"cross-site") || s.eq_ignore_ascii_case(b"same-site"))
        {
            return Err(ProxyError::Forbidden(format!(
                "access.allow_origins: a browser request from another site (Sec-Fetch-Site: {}) without an allowed Origin is refused (web pages must not drive the proxy)",
                String::from_utf8_lossy(site)
            )));
        }
        Ok(())
    }

    fn check_key(&self, headers: &HeaderMap) -> Result<(), ProxyError> {
        if self.api_keys.is_empty() {
            return Ok(());
        }
        let basic;
        let presented = match headers.get(&PROXY_KEY) {
            Some(key) => Some(key.as_bytes()),
            // The scheme's name in any case, as HTTP has it.
            None => match headers.get(header::PROXY_AUTHORIZATION).and_then(|v| {
                let v = v.as_bytes();
                let space = v.iter().position(|b| *b == b' ')?;
                Some((&v[..space], &v[space + 1..]))
            }) {
                Some((scheme, key)) if scheme.eq_ignore_ascii_case(b"bearer") => {
                    Some(key.trim_ascii())
                }
                Some((scheme, encoded)) if scheme.eq_ignore_ascii_case(b"basic") => {
                    basic = basic_password(encoded);
                    basic.as_deref()
                }
                _ => None,
            },
        };
        let Some(presented) = presented else {
            return Err(ProxyError::Unauthorized(
                "access.api_keys: this proxy needs a key: send it as X-Proxy-Key, Proxy-Authorization: Bearer <key>, or Proxy-Authorization: Basic with the key as the password (user:key)".into(),
            ));
        };
        // Compare against every key, without stopping early.
        let mut found = subtle::Choice::from(0);
        for key in &self.api_keys {
            found |= key.expose().as_bytes().ct_eq(presented);
        }
        if bool::from(found) {
            Ok(())
        } else {
            Err(ProxyError::Unauthorized(
                "access.api_keys: the proxy key is wrong".into(),
            ))
        }
    }

    /// The method, and any method an override header claims, must be allowed: Desk (or a
    /// gateway before it) may honour `X-HTTP-Method-Override`, so a read-only proxy must
    /// not forward a GET that says it is a DELETE.
    fn check_method(&self, method: &Method, headers: &HeaderMap) -> Result<(), ProxyError> {
        if let Some(methods) = &self.allow_methods
            && !methods.contains(method)
        {
            return Err(self.method_not_allowed(format!(
                "access.allow_methods: {method} is not allowed by this proxy"
            )));
        }
        // One pass over the request's headers: a request has a handful, and looking up
        // each of the override names would hash it three times for nothing.
        let overrides = headers
            .iter()
            .filter(|(name, _)| crate::headers::METHOD_OVERRIDES.contains(name));
        for (name, value) in overrides {
            for claimed in value.as_bytes().split(|b| *b == b',') {
                let claimed = String::from_utf8_lossy(claimed.trim_ascii()).to_ascii_uppercase();
                let allowed = !NEVER_FORWARDED.contains(&claimed.as_str())
                    && self
                        .allow_methods
                        .as_ref()
                        .is_none_or(|methods| methods.iter().any(|m| m.as_str() == claimed));
                if !allowed {
                    return Err(self.method_not_allowed(format!(
                        "access.allow_methods: {name} claims {claimed:?}, which this proxy does not allow"
                    )));
                }
            }
        }
        Ok(())
    }

    /// A 405 with `message`, and this policy's methods in its `Allow` header.
    pub fn method_not_allowed(&self, message: String) -> ProxyError {
        ProxyError::MethodNotAllowed {
            message,
            allow: self.allow.clone(),
        }
    }

    /// `path` is canonical ([`crate::paths`]): deny rules compare in any case, allow
    /// rules exactly.
    fn check_path(&self, path: &str) -> Result<(), ProxyError> {
        if self.deny_paths.is_empty() && self.allow_paths.is_empty() {
            return Ok(());
        }
        let path = &*crate::paths::rule_form(path);
        if let Some(rule) = self.deny_paths.iter().find(|p| p.covers(path)) {
            return Err(ProxyError::Forbidden(format!(
                "access.deny_paths: {path} is denied (by {:?})",
                rule.as_str()
            )));
        }
        if !self.allow_paths.is_empty() && !self.allow_paths.iter().any(|p| p.covers(path)) {
            return Err(ProxyError::Forbidden(format!(
                "access.allow_paths: {path} is not allowed"
            )));
        }
        Ok(())
    }
}

/// The password of `Basic base64(user:password)`; the user name is ignored.
fn basic_password(encoded: &[u8]) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim_ascii())
        .ok()?;
    let colon = decoded.iter().position(|b| *b == b':')?;
    Some(decoded[colon + 1..].to_vec())
}

/// Loopback names, plus the listen host when it is a specific address.
fn default_hosts(listen: SocketAddr) -> Vec<String> {
    let mut hosts: Vec<String> = ["localhost", "127.0.0.1", "::1"].map(String::from).to_vec();
    let ip = listen.ip().to_string();
    // Any address the proxy listens on by name (127.0.0.2 too), not 0.0.0.0 or `::`.
    if !listen.ip().is_unspecified() && !hosts.contains(&ip) {
        hosts.push(ip);
    }
    hosts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn policy(toml_access: &str) -> AccessPolicy {
        let config = Config::from_toml(&format!(
            "[oauth]\nclient_id = \"i\"\nclient_secret = \"s\"\n[access]\n{toml_access}"
        ))
        .unwrap();
        AccessPolicy::new(&config.access, config.listen)
    }

    fn request(method: &str, path: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        builder.body(()).unwrap()
    }

    fn target(path: &str) -> Target {
        Target {
            path_and_query: path.parse().unwrap(),
            absolute_form: false,
        }
    }

    fn peer(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), 40000)
    }

    /// (rules, method, path, headers, client ip, expected errorCode or None when allowed)
    type Case = (
        &'static str,
        &'static str,
        &'static str,
        &'static [(&'static str, &'static str)],
        &'static str,
        Option<&'static str>,
    );

    #[test]
    fn rules_table() {
        let local: &[(&str, &str)] = &[("host", "127.0.0.1:8080")];
        let cases: &[Case] = &[
            // Host allowlist (DNS rebinding)
            ("", "GET", "/api/v1/tickets", local, "127.0.0.1", None),
            (
                "",
                "GET",
                "/api/v1/tickets",
                &[("host", "localhost:8080")],
                "127.0.0.1",
                None,
            ),
            (
                "",
                "GET",
                "/api/v1/tickets",
                &[("host", "[::1]:8080")],
                "127.0.0.1",
                None,
            ),
            // The same address written longer.
            (
                "",
                "GET",
                "/api/v1/tickets",
                &[("host", "[0:0::1]")],
                "127.0.0.1",
                None,
            ),
            (
                "allow_hosts = [\"FD00:0::2\"]",
                "GET",
                "/api/v1/tickets",
                &[("host", "[fd00::2]:8080")],
                "127.0.0.1",
                None,
            ),
            (
                "",
                "GET",
                "/api/v1/tickets",
                &[("host", "evil.example")],
                "127.0.0.1",
                Some("PROXY_FORBIDDEN"),
            ),
            (
                "",
                "GET",
                "/api/v1/tickets",
                &[("host", "localhost.evil.example")],
                "127.0.0.1",
                Some("PROXY_FORBIDDEN"),
            ),
            (
                "",
                "GET",
                "/api/v1/tickets",
                &[("host", "127.0.0.1.nip.io:8080")],
                "127.0.0.1",
                Some("PROXY_FORBIDDEN"),
            ),
            (
                "allow_hosts = [\"zoho-proxy\"]",
                "GET",
                "/api/v1/tickets",
                &[("host", "zoho-proxy:8080")],
                "127.0.0.1",
                None,
            ),
            (
                "allow_hosts = [\"*\"]\nallow_unauthenticated_remote = true",
                "GET",
                "/api/v1/tickets",
                &[("host", "anything")],
                "127.0.0.1",
                None,
            ),
            // Origin
            (
                "",
                "GET",
                "/api/v1/tickets",
                &[("host", "localhost"), ("origin", "https://evil.example")],
                "127.0.0.1",
                Some("PROXY_FORBIDDEN"),
            ),
            (
                "",
                "GET",
                "/api/v1/tickets",
                &[("host", "localhost"), ("origin", "null")],
                "127.0.0.1",
                Some("PROXY_FORBIDDEN"),
            ),
            (
                "allow_origins = [\"http://localhost:3000\"]",
                "GET",
                "/api/v1/tickets",
                &[("host", "localhost"), ("origin", "http://localhost:3000")],
                "127.0.0.1",
                None,
            ),
            // Keys
            (
                "api_keys = [\"k1\", \"k2\"]",
                "GET",
                "/api/v1/tickets",
                local,
                "127.0.0.1",
                Some("PROXY_UNAUTHORIZED"),
            ),
            (
                "api_keys = [\"k1\", \"k2\"]",
                "GET",
                "/api/v1/tickets",
                &[("host", "localhost"), ("x-proxy-key", "k2")],
                "127.0.0.1",
                None,
            ),
            (
                "api_keys = [\"k1\", \"k2\"]",
                "GET",
                "/api/v1/tickets",
                &[("host", "localhost"), ("proxy-authorization", "Bearer k1")],
                "127.0.0.1",
                None,
            ),
            (
                "api_keys = [\"k1\", \"k2\"]",
                "GET",
                "/api/v1/tickets",
                &[("host", "localhost"), ("proxy-authorization", "bearer k2")],
                "127.0.0.1",
                None,
            ),
            (
                "api_keys = [\"k1\", \"k2\"]",
                "GET",
                "/api/v1/tickets",
                // base64("any-user:k1")
                &[
                    ("host", "localhost"),
                    ("proxy-authorization", "BASIC YW55LXVzZXI6azE="),
                ],
                "127.0.0.1",
                None,
            ),
            (
                "api_keys = [\"k1\", \"k2\"]",
                "GET",
                "/api/v1/tickets",
                &[("host", "localhost"), ("proxy-authorization", "Bearerk1")],
                "127.0.0.1",
                Some("PROXY_UNAUTHORIZED"),
            ),
            (
                "api_keys = [\"k1\", \"k2\"]",
                "GET",
                "/api/v1/tickets",
                &[("host", "localhost"), ("x-proxy-key", "k3")],
                "127.0.0.1",
                Some("PROXY_UNAUTHORIZED"),
            ),
            (
                "api_keys = [\"k1\", \"k2\"]",
                "GET",
                "/api/v1/tickets",
                &[("host", "localhost"), ("x-proxy-key", "k")],
                "127.0.0.1",
                Some("PROXY_UNAUTHORIZED"),
            ),
            (
                "api_keys = [\"k1\"]",
                "GET",
                "/api/v1/tickets",
                &[("host", "localhost"), ("authorization", "Bearer k1")],
                "127.0.0.1",
                Some("PROXY_UNAUTHORIZED"),
            ),
            // Methods
            (
                "allow_methods = [\"GET\", \"head\"]",
                "GET",
                "/api/v1/tickets",
                local,
                "127.0.0.1",
                None,
            ),
            (
                "allow_methods = [\"GET\", \"head\"]",
                "HEAD",
                "/api/v1/tickets",
                local,
                "127.0.0.1",
                None,
            ),
            (
                "allow_methods = [\"GET\", \"head\"]",
                "POST",
                "/api/v1/tickets",
                local,
                "127.0.0.1",
                Some("PROXY_METHOD_NOT_ALLOWED"),
            ),
            // Paths: prefix on segment boundaries, globs within segments
            (
                "allow_paths = [\"/api/v1/tickets\"]",
                "GET",
                "/api/v1/tickets",
                local,
                "127.0.0.1",
                None,
            ),
            (
                "allow_paths = [\"/api/v1/tickets\"]",
                "GET",
                "/api/v1/tickets/1",
                local,
                "127.0.0.1",
                None,
            ),
            (
                "allow_paths = [\"/api/v1/tickets\"]",
                "GET",
                "/api/v1/ticketsX",
                local,
                "127.0.0.1",
                Some("PROXY_FORBIDDEN"),
            ),
            (
                "allow_paths = [\"/api/v1/tickets\"]",
                "GET",
                "/api/v1/contacts",
                local,
                "127.0.0.1",
                Some("PROXY_FORBIDDEN"),
            ),
            (
                "allow_paths = [\"/api/v1/*/comments\"]",
                "GET",
                "/api/v1/tickets/comments",
                local,
                "127.0.0.1",
                None,
            ),
            (
                "allow_paths = [\"/api/v1/*/comments\"]",
                "GET",
                "/api/v1/a/b/comments",
                local,
                "127.0.0.1",
                Some("PROXY_FORBIDDEN"),
            ),
            (
                "allow_paths = [\"/api/v1/**\"]",
                "GET",
                "/api/v1/a/b/comments",
                local,
                "127.0.0.1",
                None,
            ),
            (
                "deny_paths = [\"/api/v1/agents\"]",
                "GET",
                "/api/v1/agents/5",
                local,
                "127.0.0.1",
                Some("PROXY_FORBIDDEN"),
            ),
            (
                "deny_paths = [\"/api/v1/agents\"]",
                "GET",
                "/api/v1/tickets",
                local,
                "127.0.0.1",
                None,
            ),
            (
                "allow_paths = [\"/api/v1\"]\ndeny_paths = [\"/api/v1/*/delete\"]",
                "GET",
                "/api/v1/x/delete",
                local,
                "127.0.0.1",
                Some("PROXY_FORBIDDEN"),
            ),
            // CIDRs, IPv4 and IPv6, and IPv4-mapped IPv6
            (
                "allow_cidrs = [\"10.0.0.0/8\", \"fd00::/8\"]",
                "GET",
                "/api/v1/tickets",
                local,
                "10.1.2.3",
                None,
            ),
            (
                "allow_cidrs = [\"10.0.0.0/8\", \"fd00::/8\"]",
                "GET",
                "/api/v1/tickets",
                local,
                "fd00::1",
                None,
            ),
            (
                "allow_cidrs = [\"10.0.0.0/8\", \"fd00::/8\"]",
                "GET",
                "/api/v1/tickets",
                local,
                "::ffff:10.0.0.1",
                None,
            ),
            (
                "allow_cidrs = [\"10.0.0.0/8\", \"fd00::/8\"]",
                "GET",
                "/api/v1/tickets",
                local,
                "192.168.1.1",
                Some("PROXY_FORBIDDEN"),
            ),
            (
                "allow_cidrs = [\"10.0.0.0/8\", \"fd00::/8\"]",
                "GET",
                "/api/v1/tickets",
                local,
                "fe80::1",
                Some("PROXY_FORBIDDEN"),
            ),
            // Every Origin and Sec-Fetch-Site is checked: each is forwarded.
            (
                "allow_origins = [\"http://good.example\"]",
                "GET",
                "/api/v1/tickets",
                &[
                    ("host", "127.0.0.1:8080"),
                    ("origin", "http://good.example"),
                    ("origin", "http://evil.example"),
                ],
                "127.0.0.1",
                Some("PROXY_FORBIDDEN"),
            ),
            (
                "",
                "GET",
                "/api/v1/tickets",
                &[
                    ("host", "127.0.0.1:8080"),
                    ("sec-fetch-site", "none"),
                    ("sec-fetch-site", "cross-site"),
                ],
                "127.0.0.1",
                Some("PROXY_FORBIDDEN"),
            ),
        ];
        for (rules, method, path, headers, ip, expected) in cases {
            let p = policy(rules);
            let result = p.check(&request(method, path, headers), peer(ip), &target(path));
            assert_eq!(
                result.as_ref().err().map(ProxyError::code),
                *expected,
                "{rules} | {method} {path} {headers:?} from {ip}: {result:?}"
            );
        }
    }

    #[test]
    fn the_default_hosts_are_loopback_s_names_and_the_address_listened_on() {
        let hosts = |listen: &str| default_hosts(listen.parse().unwrap());
        let loopback = ["localhost", "127.0.0.1", "::1"];
        assert_eq!(hosts("127.0.0.1:8080"), loopback);
        assert_eq!(hosts("0.0.0.0:8080"), loopback);
        assert_eq!(hosts("[::]:8080"), loopback);
        // Another loopback address is named by clients too (an audit got 403 on it).
        assert_eq!(hosts("127.0.0.6:8080").last().unwrap(), "127.0.0.6");
        assert_eq!(hosts("192.0.2.2:8080").last().unwrap(), "192.0.2.2");
        assert_eq!(hosts("[fd00::2]:8080").last().unwrap(), "fd00::2");
    }

    #[test]
    fn trace_and_track_are_refused_in_any_case() {
        let p = policy("");
        for method in ["TRACE", "trace", "Trace", "TRACK", "track", "connect"] {
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            let err = p.check_method_is_forwardable(&method).unwrap_err();
            assert_eq!(err.code(), "PROXY_METHOD_NOT_ALLOWED", "{method}");
        }
        assert!(p.check_method_is_forwardable(&Method::GET).is_ok());
    }

    #[test]
    fn refusals_name_the_rule() {
        let p = policy("deny_paths = [\"/api/v1/agents\"]");
        let err = p
            .check(
                &request("GET", "/api/v1/agents", &[("host", "localhost")]),
                peer("127.0.0.1"),
                &target("/api/v1/agents"),
            )
            .unwrap_err();
        assert!(err.to_string().starts_with("access.deny_paths"), "{err}");
    }

    #[test]
    fn public_endpoints_check_the_address_only_private_ones_the_key_too() {
        let p = policy("api_keys = [\"k\"]\nallow_cidrs = [\"127.0.0.0/8\"]");
        assert!(p.check_peer(peer("127.0.0.1")).is_ok());
        assert_eq!(
            p.check_peer(peer("10.0.0.1")).unwrap_err().code(),
            "PROXY_FORBIDDEN"
        );
        let req = request("GET", "/_proxy/metrics", &[("host", "localhost")]);
        assert_eq!(
            p.check_private(&req, peer("127.0.0.1")).unwrap_err().code(),
            "PROXY_UNAUTHORIZED"
        );
        let req = request(
            "GET",
            "/_proxy/metrics",
            &[("host", "localhost"), ("x-proxy-key", "k")],
        );
        assert!(p.check_private(&req, peer("127.0.0.1")).is_ok());
    }
}
