//! Access rules of SPEC §7: client keys, `Host` and `Origin`, methods, paths, client IPs.
//! Every refusal names the rule that fired.

use std::net::{IpAddr, SocketAddr};

use globset::GlobMatcher;
use http::{HeaderMap, Method, Request, header};
use ipnet::IpNet;
use subtle::ConstantTimeEq;

use crate::config::{AccessConfig, Config, ConfigError};
use crate::error::ProxyError;
use crate::headers::PROXY_KEY;
use crate::secret::Secret;
use crate::target::Target;

/// The compiled access rules.
#[derive(Debug)]
pub struct AccessPolicy {
    api_keys: Vec<Secret<String>>,
    allow_methods: Option<Vec<Method>>,
    allow_paths: Vec<PathPattern>,
    deny_paths: Vec<PathPattern>,
    /// Lower-case host names; `*` accepts any.
    allow_hosts: Vec<String>,
    allow_origins: Vec<String>,
    allow_cidrs: Vec<IpNet>,
}

/// A path rule: a prefix that matches whole segments, or a glob (`*` within a segment,
/// `**` across segments).
#[derive(Debug)]
enum PathPattern {
    Prefix(String),
    Glob(GlobMatcher),
}

impl PathPattern {
    fn parse(key: &'static str, text: &str) -> Result<Self, ConfigError> {
        if text.contains(['*', '?', '[', '{']) {
            let glob = globset::GlobBuilder::new(text)
                .literal_separator(true)
                .build()
                .map_err(|e| ConfigError::Invalid {
                    key,
                    reason: format!("bad glob {text:?}: {e}"),
                })?;
            Ok(Self::Glob(glob.compile_matcher()))
        } else if text.starts_with('/') {
            Ok(Self::Prefix(text.trim_end_matches('/').to_owned()))
        } else {
            Err(ConfigError::Invalid {
                key,
                reason: format!("{text:?} must start with \"/\""),
            })
        }
    }

    fn matches(&self, path: &str) -> bool {
        match self {
            Self::Glob(glob) => glob.is_match(path),
            Self::Prefix(prefix) => path
                .strip_prefix(prefix.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
        }
    }
}

impl AccessPolicy {
    /// Compiles the rules of a validated config; patterns and CIDRs were checked by
    /// [`AccessPolicy::validate`], so a bad one here is skipped.
    pub fn new(config: &Config) -> Self {
        Self::compile(&config.access, config.listen).unwrap_or_else(|err| {
            tracing::error!(error = %err, "access rules could not be compiled; refusing everything");
            Self::deny_all()
        })
    }

    /// Checks the rules of a config, as `serve` does before it starts.
    pub fn validate(config: &Config) -> Result<(), ConfigError> {
        Self::compile(&config.access, config.listen).map(|_| ())
    }

    fn deny_all() -> Self {
        Self {
            api_keys: Vec::new(),
            allow_methods: Some(Vec::new()),
            allow_paths: Vec::new(),
            deny_paths: vec![PathPattern::Prefix(String::new())],
            allow_hosts: Vec::new(),
            allow_origins: Vec::new(),
            allow_cidrs: Vec::new(),
        }
    }

    fn compile(access: &AccessConfig, listen: SocketAddr) -> Result<Self, ConfigError> {
        let patterns = |key: &'static str, list: &[String]| {
            list.iter()
                .map(|p| PathPattern::parse(key, p))
                .collect::<Result<Vec<_>, _>>()
        };
        let allow_hosts = match &access.allow_hosts {
            Some(hosts) => hosts.iter().map(|h| normalize_host(h)).collect(),
            None => default_hosts(listen),
        };
        let allow_cidrs = access
            .allow_cidrs
            .iter()
            .map(|c| parse_cidr(c))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            api_keys: access.api_keys.clone(),
            allow_methods: access.allow_methods.clone(),
            allow_paths: patterns("access.allow_paths", &access.allow_paths)?,
            deny_paths: patterns("access.deny_paths", &access.deny_paths)?,
            allow_hosts,
            allow_origins: access
                .allow_origins
                .iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
            allow_cidrs,
        })
    }

    /// Whether clients must present a key.
    pub fn requires_key(&self) -> bool {
        !self.api_keys.is_empty()
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
        self.check_method(req.method())?;
        self.check_path(target.path())
    }

    /// Rules for `/_proxy/<endpoint>`: health and ready are open to every client that may
    /// connect; the rest need the key like forwarded requests.
    pub fn check_admin<B>(
        &self,
        req: &Request<B>,
        peer: SocketAddr,
        endpoint: &str,
    ) -> Result<(), ProxyError> {
        self.check_peer(peer)?;
        if crate::admin::is_public(endpoint) {
            return Ok(());
        }
        self.check_host(req)?;
        self.check_origin(req.headers())?;
        self.check_key(req.headers())
    }

    fn check_peer(&self, peer: SocketAddr) -> Result<(), ProxyError> {
        let ip = peer.ip().to_canonical();
        if self.allow_cidrs.is_empty() || self.allow_cidrs.iter().any(|net| net.contains(&ip)) {
            Ok(())
        } else {
            Err(ProxyError::Forbidden(format!(
                "access.allow_cidrs: client address {ip} is not allowed"
            )))
        }
    }

    fn check_host<B>(&self, req: &Request<B>) -> Result<(), ProxyError> {
        if self.allow_hosts.iter().any(|h| h == "*") {
            return Ok(());
        }
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()))
            .ok_or_else(|| {
                ProxyError::Forbidden("access.allow_hosts: the request has no Host header".into())
            })?;
        // Allowed names are stored lower-cased; compare without allocating.
        let name = host_name(host);
        if self
            .allow_hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(name))
        {
            Ok(())
        } else {
            Err(ProxyError::Forbidden(format!(
                "access.allow_hosts: Host {name:?} is not allowed (a guard against DNS rebinding; add it to access.allow_hosts if you use that name)"
            )))
        }
    }

    fn check_origin(&self, headers: &HeaderMap) -> Result<(), ProxyError> {
        let Some(origin) = headers.get(header::ORIGIN) else {
            return Ok(());
        };
        let origin = origin
            .to_str()
            .unwrap_or("")
            .trim_end_matches('/')
            .to_ascii_lowercase();
        if self.allow_origins.contains(&origin) {
            Ok(())
        } else {
            Err(ProxyError::Forbidden(format!(
                "access.allow_origins: browser Origin {origin:?} is not allowed (web pages must not drive the proxy)"
            )))
        }
    }

    fn check_key(&self, headers: &HeaderMap) -> Result<(), ProxyError> {
        if self.api_keys.is_empty() {
            return Ok(());
        }
        let presented = headers.get(&PROXY_KEY).map(|v| v.as_bytes()).or_else(|| {
            headers
                .get(header::PROXY_AUTHORIZATION)
                .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        });
        let Some(presented) = presented else {
            return Err(ProxyError::Unauthorized(
                "access.api_keys: this proxy needs a key: send it as X-Proxy-Key or Proxy-Authorization: Bearer".into(),
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

    fn check_method(&self, method: &Method) -> Result<(), ProxyError> {
        match &self.allow_methods {
            Some(methods) if !methods.contains(method) => Err(ProxyError::MethodNotAllowed(
                format!("access.allow_methods: {method} is not allowed by this proxy"),
            )),
            _ => Ok(()),
        }
    }

    fn check_path(&self, path: &str) -> Result<(), ProxyError> {
        if self.deny_paths.iter().any(|p| p.matches(path)) {
            return Err(ProxyError::Forbidden(format!(
                "access.deny_paths: {path} is denied"
            )));
        }
        if !self.allow_paths.is_empty() && !self.allow_paths.iter().any(|p| p.matches(path)) {
            return Err(ProxyError::Forbidden(format!(
                "access.allow_paths: {path} is not allowed"
            )));
        }
        Ok(())
    }
}

/// Loopback names, plus the listen host when it is a specific address.
fn default_hosts(listen: SocketAddr) -> Vec<String> {
    let mut hosts: Vec<String> = ["localhost", "127.0.0.1", "::1"].map(String::from).to_vec();
    let ip = listen.ip();
    if !ip.is_unspecified() && !ip.is_loopback() {
        hosts.push(ip.to_string());
    }
    hosts
}

/// The host name of a `Host` value: lower case, port and IPv6 brackets removed, trailing
/// dot removed.
fn normalize_host(host: &str) -> String {
    host_name(host).to_ascii_lowercase()
}

/// The host name of a `Host` value, as written: port and IPv6 brackets removed, trailing
/// dot removed.
fn host_name(host: &str) -> &str {
    let host = host.trim();
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else if host.matches(':').count() == 1 {
        host.split(':').next().unwrap_or("")
    } else {
        host
    };
    name.trim_end_matches('.')
}

fn parse_cidr(text: &str) -> Result<IpNet, ConfigError> {
    let text = text.trim();
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| ConfigError::Invalid {
            key: "access.allow_cidrs",
            reason: format!(
                "{text:?} is not an address range such as \"10.0.0.0/8\" or \"fd00::/8\""
            ),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(toml_access: &str) -> AccessPolicy {
        let config = Config::from_toml(&format!(
            "[oauth]\nclient_id = \"i\"\nclient_secret = \"s\"\n[access]\n{toml_access}"
        ))
        .unwrap();
        AccessPolicy::compile(&config.access, config.listen).unwrap()
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
                "allow_hosts = [\"*\"]",
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
    fn health_is_open_but_metrics_needs_the_key() {
        let p = policy("api_keys = [\"k\"]");
        let req = request("GET", "/_proxy/health", &[("host", "10.0.0.5:8080")]);
        assert!(p.check_admin(&req, peer("127.0.0.1"), "health").is_ok());
        let req = request("GET", "/_proxy/metrics", &[("host", "localhost")]);
        assert_eq!(
            p.check_admin(&req, peer("127.0.0.1"), "metrics")
                .unwrap_err()
                .code(),
            "PROXY_UNAUTHORIZED"
        );
    }

    #[test]
    fn bad_rules_are_config_errors() {
        let config = Config::from_toml("[oauth]\nclient_id = \"i\"\nclient_secret = \"s\"\n[access]\nallow_cidrs = [\"10.0.0.0/33\"]").unwrap();
        let err = AccessPolicy::validate(&config).unwrap_err();
        assert!(err.to_string().contains("access.allow_cidrs"), "{err}");
    }
}
