//! From what the user wrote to a [`Config`]: one pass over every key that reports every
//! problem at once, each with its key, where it was set and the fix; rules are compiled
//! here, so that what passes is ready to use.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use http::{HeaderValue, Method};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use super::error::ConfigError;
use super::model::{
    API_DOMAINS, AccessConfig, Config, DATA_CENTRES, DEFAULT_CA_DIR, DEFAULT_LISTEN,
    DEFAULT_TOKEN_FILE, DESK_METHODS, DeskConfig, EDITIONS, InterceptConfig, LogFormat,
    MAX_RECORD_BODY_BYTES, OAuthConfig, RecordConfig, Timeouts,
};
use super::raw::{RawAccess, RawConfig, RawDesk, RawIntercept};
use super::values::{
    Problems, Zero, at_least_one, parse_cidr, read_secret_file, required, seconds, secret_value,
    secs,
};
use crate::paths::{Case, PathRule};
use crate::secret::Secret;
use crate::url::BaseUrl;

/// What a missing credential adds when none is set at all.
const TRY_THE_DEMO: &str = "; no Zoho credentials are set at all: to try the proxy without any, run `zoho-desk-proxy demo`";

impl TryFrom<RawConfig> for Config {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Self, ConfigError> {
        let RawConfig {
            listen,
            dc,
            upstream,
            accounts_url,
            org_id,
            token_file,
            token_store,
            token_store_file,
            oauth,
            access,
            timeouts,
            limits,
            log,
            tls,
            intercept,
            desk,
            record,
            api_keys_env,
            origins,
            serving,
        } = raw;
        let mut p = Problems {
            origins: &origins,
            found: Vec::new(),
        };

        let listen_text = listen.as_deref().unwrap_or(DEFAULT_LISTEN).trim();
        let listen: Option<SocketAddr> = p.check(
            "listen",
            listen_text.parse().map_err(|_| {
                format!("{listen_text:?} is not an address:port such as \"127.0.0.1:8080\"")
            }),
        );

        let dc = dc.as_deref().unwrap_or("com").trim().to_ascii_lowercase();
        let centre = p.check(
            "dc",
            DATA_CENTRES
                .iter()
                .find(|(name, _, _)| *name == dc)
                .ok_or_else(|| {
                    let names: Vec<&str> = DATA_CENTRES.iter().map(|d| d.0).collect();
                    format!(
                        "unknown data centre {dc:?}; use one of {}",
                        names.join(", ")
                    )
                }),
        );
        let (dc_name, dc_accounts, dc_desk) = centre.map_or(DATA_CENTRES[0], |c| *c);
        let upstream = p.check(
            "upstream",
            BaseUrl::parse(upstream.as_deref().unwrap_or(dc_desk)).map_err(|e| e.to_string()),
        );
        let accounts_url = p.check(
            "accounts_url",
            BaseUrl::parse_like(
                accounts_url.as_deref().unwrap_or(dc_accounts),
                "https://accounts.zoho.com",
            )
            .map_err(|e| e.to_string()),
        );
        let org_id = match org_id.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(v) => p.check(
                "org_id",
                HeaderValue::from_str(v).map_err(|_| {
                    "must be a plain header value (the portal's numeric org id)".to_owned()
                }),
            ),
        };

        let client_id = secret_value(
            &mut p,
            ("oauth.client_id", "oauth.client_id_file"),
            oauth.client_id,
            oauth.client_id_file,
        );
        let client_secret = secret_value(
            &mut p,
            ("oauth.client_secret", "oauth.client_secret_file"),
            oauth.client_secret,
            oauth.client_secret_file,
        );
        let refresh_token = secret_value(
            &mut p,
            ("oauth.refresh_token", "oauth.refresh_token_file"),
            oauth.refresh_token,
            oauth.refresh_token_file,
        );
        let nothing_set = matches!(
            (&client_id, &client_secret, &refresh_token),
            (Ok(None), Ok(None), Ok(None))
        );
        let hint = if nothing_set { TRY_THE_DEMO } else { "" };
        let client_id = required(&mut p, client_id, "oauth.client_id", "ZOHO_CLIENT_ID", hint);
        let client_secret = required(
            &mut p,
            client_secret,
            "oauth.client_secret",
            "ZOHO_CLIENT_SECRET",
            hint,
        );
        // 0 refreshes at expiry (or at Desk's 401), which the margin has always allowed.
        let refresh_margin = seconds(
            &mut p,
            "oauth.refresh_margin_secs",
            oauth.refresh_margin_secs,
            300.0,
            Zero::Allowed,
        );
        let max_refreshes_per_10min = at_least_one(
            &mut p,
            "oauth.max_refreshes_per_10min",
            oauth.max_refreshes_per_10min.unwrap_or(5),
            " (Zoho allows 10)",
        );

        let token_file = match token_file {
            None => Some(PathBuf::from(DEFAULT_TOKEN_FILE)),
            Some(path) if path.trim().is_empty() => None,
            Some(path) => Some(PathBuf::from(path)),
        };
        // Its URL may hold Redis' password: a container secret may give it. Blank is
        // no store, as it always was.
        let token_store = secret_value(
            &mut p,
            ("token_store", "token_store_file"),
            token_store.filter(|s| !s.trim().is_empty()),
            token_store_file,
        )
        .ok()
        .flatten();
        if let Some(store) = &token_store
            && !["redis://", "rediss://", "redis+unix://"]
                .iter()
                .any(|scheme| store.starts_with(scheme))
        {
            p.invalid(
                "token_store",
                "must be a redis://, rediss:// (TLS) or redis+unix:// (a Unix socket) URL",
            );
        } else if let Some(store) = &token_store
            && let Err(trouble) = crate::client::redis_client(store)
        {
            p.invalid("token_store", trouble.to_string());
        }

        let access = access_config(&mut p, access, api_keys_env);
        // Not when an access rule was wrong: its problem says what to fix.
        let rules_wrong = p.found.iter().any(|e| {
            matches!(e, ConfigError::Invalid { key, .. } if [
                "access.api_keys",
                "access.api_keys_file",
                "access.allow_cidrs",
                "ZOHO_PROXY_API_KEYS",
            ]
            .contains(key))
        });
        if serving
            && let Some(listen) = listen
            && access.refuses(listen)
            && !rules_wrong
        {
            p.found
                .push(ConfigError::open_listener(listen, origins.of("listen")));
        }

        let timeouts = Timeouts {
            connect: secs(&mut p, "timeouts.connect_secs", timeouts.connect_secs, 10.0),
            response: secs(
                &mut p,
                "timeouts.response_secs",
                timeouts.response_secs,
                120.0,
            ),
            idle: secs(&mut p, "timeouts.idle_secs", timeouts.idle_secs, 90.0),
            header_read: secs(
                &mut p,
                "timeouts.header_read_secs",
                timeouts.header_read_secs,
                10.0,
            ),
            body_read: secs(
                &mut p,
                "timeouts.body_read_secs",
                timeouts.body_read_secs,
                30.0,
            ),
            shutdown_grace: secs(
                &mut p,
                "timeouts.shutdown_grace_secs",
                timeouts.shutdown_grace_secs,
                30.0,
            ),
        };
        let log_format = match log.format.as_deref().map(str::trim) {
            None | Some("") => None,
            Some("pretty") => Some(LogFormat::Pretty),
            Some("json") => Some(LogFormat::Json),
            Some(other) => {
                p.invalid(
                    "log.format",
                    format!("{other:?} is not a format; use \"pretty\" or \"json\""),
                );
                None
            }
        };
        let extra_roots = match &tls.ca_file {
            None => Vec::new(),
            Some(path) => p
                .check("tls.ca_file", read_certificates(path))
                .unwrap_or_default(),
        };
        let intercept = intercept_config(&mut p, intercept, dc_name, dc_desk, dc_accounts);
        let desk = desk_config(&mut p, desk);
        let max_body_bytes = record
            .max_body_bytes
            .unwrap_or(RecordConfig::default().max_body_bytes);
        if max_body_bytes > MAX_RECORD_BODY_BYTES {
            p.invalid(
                "record.max_body_bytes",
                format!(
                    "at most {MAX_RECORD_BODY_BYTES} (16 MiB): each recorded request holds up to twice this much until it is written (a longer body keeps its start and is marked truncated)"
                ),
            );
        }
        let record = RecordConfig {
            max_body_bytes,
            ..RecordConfig::default()
        };
        let max_connections = at_least_one(
            &mut p,
            "limits.max_connections",
            limits.max_connections.unwrap_or(4096),
            "",
        );
        let max_upstream_requests = at_least_one(
            &mut p,
            "limits.max_upstream_requests",
            limits.max_upstream_requests.unwrap_or(64),
            "",
        );

        if let Some(errors) = ConfigError::all(p.found) {
            return Err(errors);
        }
        // Every value below was checked above; a `None` here had its problem noted.
        let (
            Some(listen),
            Some(upstream),
            Some(accounts_url),
            Some(client_id),
            Some(client_secret),
        ) = (listen, upstream, accounts_url, client_id, client_secret)
        else {
            return Err(ConfigError::invalid("config", "incomplete"));
        };
        Ok(Self {
            listen,
            upstream,
            accounts_url,
            org_id,
            oauth: OAuthConfig {
                client_id,
                client_secret: Secret::new(client_secret),
                refresh_token: refresh_token.ok().flatten().map(Secret::new),
                refresh_margin,
                max_refreshes_per_10min,
            },
            token_file,
            token_store,
            access,
            timeouts,
            replay_body_bytes: limits.replay_body_bytes.unwrap_or(1 << 20),
            buffered_body_bytes: limits.buffered_body_bytes.unwrap_or(64 << 20),
            max_connections,
            max_upstream_requests,
            workers: limits.workers.unwrap_or(0),
            log_format,
            extra_roots,
            intercept,
            desk,
            record,
            source: if origins.source.is_empty() {
                "built-in defaults".into()
            } else {
                origins.source.clone()
            },
        })
    }
}

/// Desk's limits: the edition's concurrency unless `desk.max_concurrent` says otherwise.
fn desk_config(p: &mut Problems<'_>, raw: RawDesk) -> DeskConfig {
    let defaults = DeskConfig::default();
    let edition = match raw
        .edition
        .as_deref()
        .map(|e| e.trim().to_ascii_lowercase())
    {
        None => EDITIONS.iter().find(|(name, _)| *name == defaults.edition),
        Some(name) => {
            let found = EDITIONS.iter().find(|(known, _)| *known == name);
            if found.is_none() {
                let names: Vec<&str> = EDITIONS.iter().map(|(n, _)| *n).collect();
                p.invalid(
                    "desk.edition",
                    format!(
                        "unknown edition {name:?}; use one of {} (or set desk.max_concurrent)",
                        names.join(", ")
                    ),
                );
            }
            found
        }
    };
    let (edition, edition_limit) = edition.copied().unwrap_or(EDITIONS[2]);
    let max_concurrent = match raw.max_concurrent {
        None => edition_limit,
        Some(n) => at_least_one(
            p,
            "desk.max_concurrent",
            n,
            " (the calls Desk may have in flight at once; 0 would send nothing)",
        ),
    };
    DeskConfig {
        edition,
        max_concurrent,
        fleet_lease: secs(p, "desk.fleet_lease_secs", raw.fleet_lease_secs, 10.0),
    }
}

/// Transparent mode's settings: the data centre's Desk and Accounts hosts, plus
/// `intercept.hosts` (an `accounts.` host is answered as Accounts).
fn intercept_config(
    p: &mut Problems<'_>,
    raw: RawIntercept,
    dc: &str,
    dc_desk: &str,
    dc_accounts: &str,
) -> InterceptConfig {
    let host_of = |url: &str| {
        url.trim_start_matches("https://")
            .trim_end_matches('/')
            .to_owned()
    };
    let mut desk_hosts = vec![host_of(dc_desk)];
    let mut accounts_hosts = vec![host_of(dc_accounts)];
    for host in raw.hosts.unwrap_or_default() {
        let name = host.trim();
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        if !is_dns_name(&name) {
            p.invalid(
                "intercept.hosts",
                format!(
                    "{host:?} is not a host name such as \"desk.zoho.eu\" (the local CA vouches for names only, never an IP address)"
                ),
            );
            continue;
        }
        let list = if name.starts_with("accounts.") {
            &mut accounts_hosts
        } else {
            &mut desk_hosts
        };
        if !list.contains(&name) {
            list.push(name);
        }
    }
    let api_domain = API_DOMAINS
        .iter()
        .find(|(name, _)| *name == dc)
        .map_or(API_DOMAINS[0].1, |(_, domain)| domain)
        .to_owned();
    InterceptConfig {
        enabled: raw.enabled.unwrap_or(false),
        ca_dir: raw.ca_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_CA_DIR)),
        desk_hosts,
        accounts_hosts,
        api_domain,
    }
}

/// Whether `name` is a DNS host name of two labels or more: letters, digits and inner
/// `-`, 63 characters at most each, the last not all digits (so never an IPv4 address).
fn is_dns_name(name: &str) -> bool {
    let labels: Vec<&str> = name.split('.').collect();
    let label_ok = |label: &&str| {
        (1..=63).contains(&label.len())
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    labels.len() >= 2
        && labels.iter().all(label_ok)
        && labels
            .last()
            .is_some_and(|last| !last.bytes().all(|b| b.is_ascii_digit()))
}

fn access_config(p: &mut Problems<'_>, raw: RawAccess, env_keys: Option<String>) -> AccessConfig {
    let keys = match env_keys {
        // The environment replaces the file's keys; a blank value (what a compose file
        // substitutes for an unset variable) must not mean "no keys".
        Some(text) => {
            let keys: Vec<String> = text
                .split(',')
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(str::to_owned)
                .collect();
            if keys.is_empty() {
                p.found.push(ConfigError::invalid(
                    "ZOHO_PROXY_API_KEYS",
                    "is set but holds no key (empty, or only commas and spaces): set it to one or more comma-separated keys, or unset it to use access.api_keys",
                ));
            }
            keys
        }
        None => raw.api_keys.unwrap_or_default(),
    };
    let mut api_keys: Vec<Secret<String>> = keys.into_iter().map(Secret::new).collect();
    if let Some(path) = raw.api_keys_file
        && let Some(text) = p.check("access.api_keys_file", read_secret_file(&path))
    {
        // One key per line; blank lines and `#` comments are no keys.
        let keys: Vec<Secret<String>> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| Secret::new(l.to_owned()))
            .collect();
        if keys.is_empty() {
            p.invalid(
                "access.api_keys_file",
                "holds no key (only blank lines and # comments): put one key per line, or remove api_keys_file",
            );
        }
        api_keys.extend(keys);
    }
    if api_keys.iter().any(|k| k.expose().trim().is_empty()) {
        p.invalid("access.api_keys", "a key is empty");
    }
    let allow_methods = raw.allow_methods.map(|list| {
        list.iter()
            .filter_map(|m| {
                let name = m.trim().to_ascii_uppercase();
                let method = if DESK_METHODS.contains(&name.as_str()) {
                    Method::from_bytes(name.as_bytes()).ok()
                } else {
                    None
                };
                if method.is_none() {
                    p.invalid(
                        "access.allow_methods",
                        format!(
                            "{m:?} is not a method the proxy forwards; use some of {}",
                            DESK_METHODS.join(", ")
                        ),
                    );
                }
                method
            })
            .collect()
    });
    let rules = |p: &mut Problems<'_>, key: &'static str, list: Option<Vec<String>>, case| {
        list.unwrap_or_default()
            .iter()
            .filter_map(|rule| p.check(key, PathRule::parse(rule, case).map_err(|e| e.to_string())))
            .collect()
    };
    let allow_paths = rules(p, "access.allow_paths", raw.allow_paths, Case::Sensitive);
    let deny_paths = rules(p, "access.deny_paths", raw.deny_paths, Case::Insensitive);
    let allow_hosts = raw.allow_hosts.map(|hosts| {
        hosts
            .iter()
            .filter_map(|host| {
                let host = host.trim();
                if host == "*" {
                    if api_keys.is_empty() && raw.allow_unauthenticated_remote != Some(true) {
                        p.invalid(
                            "access.allow_hosts",
                            "\"*\" (any Host) needs access.api_keys: without a key, the Host check is what keeps a web page whose name was rebound to this address (DNS rebinding) from driving the proxy; fix: list the names clients use, or set api_keys (or, on a private network with no browser, access.allow_unauthenticated_remote = true)",
                        );
                        return None;
                    }
                    return Some(host.to_owned());
                }
                // An IPv6 address may be written bare (`::1`, as the default's is) or in
                // brackets; names are kept as the check compares them, a port ignored.
                let name = if host.parse::<std::net::Ipv6Addr>().is_ok() {
                    Ok(host)
                } else {
                    crate::target::host_name(host)
                };
                p.check(
                    "access.allow_hosts",
                    name.map(|name| crate::target::comparable_host(name).to_ascii_lowercase())
                        .map_err(|_| format!("{host:?} is not a host name or IP address (an IPv6 address bare or in brackets: \"::1\", \"[::1]\")")),
                )
            })
            .collect()
    });
    let allow_cidrs = raw
        .allow_cidrs
        .unwrap_or_default()
        .iter()
        .filter_map(|cidr| p.check("access.allow_cidrs", parse_cidr(cidr)))
        .collect();
    AccessConfig {
        api_keys,
        allow_methods,
        allow_paths,
        deny_paths,
        allow_hosts,
        allow_origins: raw
            .allow_origins
            .unwrap_or_default()
            .iter()
            .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
            .collect(),
        allow_cidrs,
        allow_unauthenticated_remote: raw.allow_unauthenticated_remote.unwrap_or(false),
    }
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}
