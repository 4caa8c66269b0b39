//! The operator's commands: `exchange` (grant token → refresh token in the token file)
//! and `check` (what works and what doesn't, in plain words).

use std::fmt::Write as _;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, header};
use http_body_util::{BodyExt, Empty, Limited};

use crate::config::{Config, ConfigError};
use crate::secret::Secret;
use crate::token::accounts::AccountsClient;
use crate::token::file::{StoredTokens, TokenFile};
use crate::token::source::AccountsError;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// The configuration cannot be used (exit code 2).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Zoho refused or could not be reached (exit code 1).
    #[error("{0}")]
    Failed(String),
}

/// Exchanges a Self Client grant token for a refresh token and stores both tokens in the
/// token file. Returns what to print.
pub async fn exchange(config: &Config, code: &str) -> Result<String, OpsError> {
    let Some(path) = &config.token_file else {
        return Err(ConfigError::invalid(
            "token_file",
            "is disabled (\"\"), so there is nowhere to store the refresh token: set token_file to a path",
        )
        .into());
    };
    // A grant token is single-use: it is spent only once its refresh token can be kept.
    let file = TokenFile::new(path);
    file.check_writable().map_err(|err| {
        ConfigError::invalid(
            "token_file",
            format!("{err}: the refresh token could not be stored, so the grant token was not used; fix: set token_file (or ZOHO_TOKEN_FILE) to a file in a directory this user may write"),
        )
    })?;
    let code = Secret::new(code.trim().to_owned());
    let grant = AccountsClient::from_config(config).exchange(&code).await.map_err(|err| {
        OpsError::Failed(match &err {
            AccountsError::Rejected(c) if c == "invalid_code" => format!(
                "{err}: the grant token is invalid, expired (grant tokens live only minutes) or already used (they are single-use). Generate a new one in the API console (Self Client → Generate Code) and run exchange again at once"
            ),
            AccountsError::Rejected(c) if c == "invalid_client" => format!(
                "{err}: Zoho Accounts at {} does not know this client id. Check oauth.client_id, and that `dc` is the data centre where you created the Self Client (a client created on accounts.zoho.eu is unknown to accounts.zoho.com)",
                config.accounts_url
            ),
            // A grant token is single-use: the one sent may be spent.
            AccountsError::Interrupted(_) | AccountsError::Timeout(_) => format!(
                "{err}; {}. The grant token may have been used by this call: if exchange then says invalid_code, generate a new one",
                err.advice()
            ),
            _ => format!("{err}; {}", err.advice()),
        })
    })?;
    let Some(refresh_token) = grant.refresh_token else {
        return Err(OpsError::Failed(
            "Zoho Accounts answered without a refresh token; generate a new grant token with the access type \"offline\" (the Self Client default) and try again".into(),
        ));
    };
    // Keep nothing of an older file but overwrite it whole: the new refresh token starts
    // a new chain of access tokens.
    let stored = StoredTokens {
        client_id: Some(config.oauth.client_id.clone()),
        refresh_token: Some(refresh_token.clone()),
        access_token: Some((
            grant.access_token,
            std::time::SystemTime::now() + grant.expires_in,
        )),
        issued_with: Some(crate::token::file::fingerprint(&refresh_token)),
    };
    file.save(&stored)
        .map_err(|e| OpsError::Failed(e.to_string()))?;
    let mut said = format!(
        "refresh token {} stored in {} (mode 0600).\n",
        refresh_token.masked(),
        path.display()
    );
    if config.oauth.refresh_token.is_some() {
        // The configuration's refresh token goes before the file's.
        said.push_str(
            "Note: a refresh token is also set in the configuration (oauth.refresh_token, oauth.refresh_token_file, ZOHO_REFRESH_TOKEN or ZOHO_REFRESH_TOKEN_FILE), and the proxy uses that one: remove it there for the proxy to use the new one.",
        );
    } else {
        said.push_str(
            "Start the proxy with `zoho-desk-proxy serve`; it reads the refresh token from there.",
        );
    }
    Ok(said)
}

/// One line of `check`'s report.
struct Report {
    text: String,
    ok: bool,
}

impl Report {
    fn line(&mut self, ok: bool, what: &str, detail: impl std::fmt::Display) {
        self.ok &= ok;
        let mark = if ok { "ok  " } else { "FAIL" };
        let _ = writeln!(self.text, "[{mark}] {what}: {detail}");
    }
}

/// Validates the config, obtains one access token, calls `GET /api/v1/organizations`,
/// and reports each step with the fix for what failed. Returns the report and whether
/// everything worked.
pub async fn check(config: &Config) -> (String, bool) {
    let mut report = Report {
        text: String::new(),
        ok: true,
    };
    report.line(
        true,
        "configuration",
        format!(
            "{}; Accounts {}, Desk {}",
            config.source, config.accounts_url, config.upstream
        ),
    );
    if let Some(url) = &config.token_store {
        let answer =
            async { crate::client::redis_ping(&crate::client::redis_client(url)?).await }.await;
        match answer {
            Ok(()) => report.line(true, "token store", "Redis answers"),
            Err(trouble) => report.line(false, "token store", trouble),
        }
    }
    if let Some(path) = &config.token_file {
        match TokenFile::new(path).check_writable() {
            Ok(()) => report.line(true, "token file", format!("{} can be written", path.display())),
            Err(err) => report.line(
                false,
                "token file",
                format!("{err}; fix: set token_file (or ZOHO_TOKEN_FILE) to a file in a directory this user may write, or to \"\" to keep no tokens across restarts"),
            ),
        }
    }
    let Some(refresh_token) = &config.oauth.refresh_token else {
        report.line(
            false,
            "refresh token",
            "none in the config, the environment (ZOHO_REFRESH_TOKEN) or the token file; fix: run `zoho-desk-proxy exchange --code <grant token>`",
        );
        return (report.text, false);
    };
    let grant = AccountsClient::from_config(config)
        .refresh(refresh_token)
        .await;
    let token = match grant {
        Ok(grant) => {
            report.line(true, "Zoho Accounts reachable", &config.accounts_url);
            report.line(
                true,
                "token refresh",
                format!(
                    "access token obtained, valid for {} s{}",
                    grant.expires_in.as_secs(),
                    grant
                        .api_domain
                        .as_deref()
                        .map(|d| format!(" (Zoho's API domain for this account: {d})"))
                        .unwrap_or_default()
                ),
            );
            grant.access_token
        }
        Err(err) => {
            let reachable = !matches!(
                err,
                AccountsError::Unreachable(_)
                    | AccountsError::Interrupted(_)
                    | AccountsError::Timeout(_)
            );
            report.line(
                reachable,
                "Zoho Accounts reachable",
                if reachable {
                    err.to_string()
                } else {
                    format!("{err}; fix: {}", err.advice())
                },
            );
            if reachable {
                report.line(
                    false,
                    "token refresh",
                    format!("{err}; fix: {}", err.advice()),
                );
            }
            return (report.text, false);
        }
    };
    match desk_call(config, &token).await {
        Ok((200, _)) => report.line(true, "Zoho Desk", "GET /api/v1/organizations answered 200"),
        Ok((status, body)) => report.line(false, "Zoho Desk", desk_failure(status, &body, &token)),
        Err(err) => report.line(
            false,
            "Zoho Desk",
            format!("{err}; fix: check `upstream` and the network path to it"),
        ),
    }
    let ok = report.ok;
    let _ = writeln!(
        report.text,
        "{}",
        if ok {
            "all checks passed"
        } else {
            "some checks failed"
        }
    );
    (report.text, ok)
}

/// What `check` says of Desk's answer other than 200: Desk's `errorCode` and message
/// (its body, cut short, when it has none), never the token it may echo, and the fix for
/// that code.
fn desk_failure(status: u16, body: &[u8], token: &Secret<String>) -> String {
    let json: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let field = |name: &str| {
        json.as_ref()
            .and_then(|j| j.get(name))
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
    };
    let code = field("errorCode");
    let said = match (&code, field("message")) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.clone(),
        _ => String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned(),
    };
    let said = said.replace(token.expose().as_str(), "***");
    let fix = match (status, code.as_deref()) {
        (401, Some("OAUTH_ORG_MISMATCH")) => {
            "set `org_id` to your portal's organisation id (README Troubleshooting)"
        }
        (401, Some("INVALID_OAUTH")) => {
            "Desk refused the token Accounts just gave: check that `dc` (or `upstream` and `accounts_url`) name the same data centre"
        }
        (401, _) => {
            "the token lacks Desk scopes: generate the grant token with Desk.tickets.ALL,Desk.basic.READ,… (see README)"
        }
        _ => "check `upstream` and `dc`",
    };
    format!("GET /api/v1/organizations answered {status} {said}; fix: {fix}")
}

async fn desk_call(config: &Config, token: &Secret<String>) -> Result<(u16, Bytes), String> {
    let client = crate::client::build::<Empty<Bytes>>(
        config.timeouts.connect,
        Duration::from_secs(5),
        1,
        &config.extra_roots,
    );
    let uri = config
        .upstream
        .join("/api/v1/organizations")
        .map_err(|e| e.to_string())?;
    let auth = crate::token::source::authorization(token)
        .ok_or_else(|| "the access token is not a valid header value".to_owned())?;
    let request = Request::get(uri)
        .header(header::AUTHORIZATION, auth)
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let call = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| crate::client::innermost(&e))?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), 64 * 1024)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(config.timeouts.response, call)
        .await
        .map_err(|_| "no answer in time".to_owned())?
}

/// `ca init`: creates transparent mode's local CA in `dir` (default `intercept.ca_dir`),
/// name-constrained to the intercepted hosts. Returns what to print.
pub fn ca_init(
    config: &Config,
    dir: Option<&std::path::Path>,
    force: bool,
) -> Result<String, OpsError> {
    let dir = dir.unwrap_or(&config.intercept.ca_dir);
    let hosts = config.intercept.hosts();
    let cert = crate::intercept::ca::init(dir, &hosts, force).map_err(|e| match e {
        // A usage error: the fix is --force (exit 2).
        crate::intercept::ca::CaError::Exists(_) => {
            OpsError::Config(ConfigError::invalid("ca init", e.to_string()))
        }
        e => OpsError::Failed(e.to_string()),
    })?;
    Ok(format!(
        "local CA created: {} (trust this one), its key {} (mode 0600, keep it private).\nIt can sign certificates for {} only, and for no IP address.\nNext: set intercept.enabled = true, start the proxy, and run `eval \"$(zoho-desk-proxy env)\"` in the client's shell.",
        cert.display(),
        dir.join(crate::intercept::ca::CA_KEY).display(),
        hosts.join(", ")
    ))
}

/// `env`: the shell lines that make clients use the proxy for Zoho's hosts and trust its
/// CA. A client key is referred to as `$ZOHO_PROXY_KEY`, never printed.
pub fn env_lines(config: &Config) -> Result<String, OpsError> {
    let ca = config.intercept.ca_dir.join(crate::intercept::ca::CA_CERT);
    if !ca.exists() {
        return Err(OpsError::Failed(format!(
            "no CA at {}: create one with `zoho-desk-proxy ca init`",
            ca.display()
        )));
    }
    let ca = std::fs::canonicalize(&ca).map_err(|e| OpsError::Failed(e.to_string()))?;
    let host = match config.listen.ip() {
        ip if ip.is_unspecified() => "127.0.0.1".to_owned(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    let credentials = if config.access.api_keys.is_empty() {
        String::new()
    } else {
        "proxy:${ZOHO_PROXY_KEY}@".to_owned()
    };
    let proxy = format!("http://{credentials}{host}:{}", config.listen.port());
    let ca = shell_quote(&ca.display().to_string());
    let mut text = String::new();
    let _ = writeln!(
        text,
        "# zoho-desk-proxy: HTTPS to {} goes through the proxy, which trusts its local CA.",
        config.intercept.hosts().join(", ")
    );
    let _ = writeln!(
        text,
        "# For this shell (or CI step) only: the proxy refuses every other HTTPS host."
    );
    if !credentials.is_empty() {
        let _ = writeln!(
            text,
            "# The proxy needs a key: set ZOHO_PROXY_KEY to one of access.api_keys first."
        );
    }
    for name in ["HTTPS_PROXY", "https_proxy"] {
        let _ = writeln!(text, "export {name}=\"{proxy}\"");
    }
    // curl, Python's requests and httpx, Go and OpenSSL-based clients read a bundle
    // file; Node adds extra certificates to its own.
    for name in [
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "NODE_EXTRA_CA_CERTS",
    ] {
        let _ = writeln!(text, "export {name}={ca}");
    }
    // Node reads HTTPS_PROXY only when asked to (Node 22.21 and 24 onwards).
    let _ = writeln!(text, "export NODE_USE_ENV_PROXY=1");
    Ok(text)
}

/// `s` quoted for a POSIX shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_names_desk_s_error_and_its_fix_never_the_token() {
        let token = Secret::new("1000.abcdef123456.secret".to_owned());
        let table: &[(u16, &str, &str, &str)] = &[
            (
                401,
                r#"{"errorCode":"OAUTH_ORG_MISMATCH","message":"Org mismatch"}"#,
                "OAUTH_ORG_MISMATCH: Org mismatch",
                "set `org_id`",
            ),
            (
                401,
                r#"{"errorCode":"SCOPE_MISMATCH","message":"no scope"}"#,
                "SCOPE_MISMATCH: no scope",
                "lacks Desk scopes",
            ),
            (
                401,
                r#"{"errorCode":"INVALID_OAUTH","message":"bad"}"#,
                "INVALID_OAUTH: bad",
                "same data centre",
            ),
            (
                401,
                r#"{"headers":{"authorization":"Zoho-oauthtoken 1000.abcdef123456.secret"}}"#,
                "Zoho-oauthtoken ***",
                "lacks Desk scopes",
            ),
            (
                404,
                "Not Found",
                "404 Not Found",
                "check `upstream` and `dc`",
            ),
        ];
        for (status, body, said, fix) in table {
            let line = desk_failure(*status, body.as_bytes(), &token);
            assert!(line.contains(said), "{line}");
            assert!(line.contains(fix), "{line}");
            assert!(!line.contains("abcdef123456"), "{line}");
        }
    }
}
