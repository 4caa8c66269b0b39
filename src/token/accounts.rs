//! Calls to Zoho Accounts (`POST /oauth/v2/token`) and the parsing of its quirky answers.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use serde::Deserialize;

use super::source::{
    AccountsError, FetchFuture, Fetched, Grant, MAX_LIFETIME, Refresh, TokenSource,
};
use crate::client::Connector;
use crate::config::Config;
use crate::secret::Secret;
use crate::url::BaseUrl;

/// Largest Accounts answer read; real ones are a few hundred bytes.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// The lifetime Zoho documents for an access token, taken when an answer gives none
/// that can be read.
const DOCUMENTED_LIFETIME_SECS: u64 = 3600;

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: Option<String>,
    refresh_token: Option<String>,
    /// Numbers as Zoho sends them, read leniently ([`positive`]).
    expires_in: Option<serde_json::Value>,
    expires_in_sec: Option<serde_json::Value>,
    api_domain: Option<String>,
    error: Option<String>,
}

/// A positive whole number of a JSON value: an integer, a float (rounded up) or a string
/// of digits; `None` for anything else, zero and negative numbers included.
fn positive(value: &serde_json::Value) -> Option<u64> {
    let number = match value {
        serde_json::Value::Number(n) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| *f > 0.0).map(|f| f.ceil() as u64)),
        serde_json::Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    number.filter(|n| *n > 0)
}

/// Parses an answer of `/oauth/v2/token`, Zoho's quirks included: success means an
/// `access_token` is present whatever the status; errors and throttling may come with 200;
/// `expires_in` is in milliseconds when `expires_in_sec` is present. A token whose
/// lifetime cannot be read (missing, zero, negative, not a number) is taken with Zoho's
/// documented hour: Desk's 401 still renews it if it dies sooner.
pub fn parse_token_answer(status: u16, body: &[u8]) -> Result<Grant, AccountsError> {
    let failed = |code: Option<String>| AccountsError::Failed { status, code };
    let answer: TokenAnswer = serde_json::from_slice(body).map_err(|_| failed(None))?;
    if let Some(token) = answer.access_token.filter(|t| !t.is_empty()) {
        let secs = match (&answer.expires_in_sec, &answer.expires_in) {
            (Some(secs), millis) => positive(secs).or_else(|| {
                millis
                    .as_ref()
                    .and_then(positive)
                    .map(|ms| ms.div_ceil(1000))
            }),
            (None, secs) => secs.as_ref().and_then(positive),
        };
        return Ok(Grant {
            access_token: Secret::new(token),
            expires_in: Duration::from_secs(secs.unwrap_or(DOCUMENTED_LIFETIME_SECS))
                .min(MAX_LIFETIME),
            refresh_token: answer
                .refresh_token
                .filter(|t| !t.is_empty())
                .map(Secret::new),
            api_domain: answer.api_domain,
        });
    }
    match answer.error {
        Some(code) => Err(classify(status, code)),
        None => Err(failed(None)),
    }
}

fn classify(status: u16, code: String) -> AccountsError {
    match code.as_str() {
        "Access Denied" | "access_denied" | "too_many_requests" => AccountsError::Throttled(code),
        "invalid_client"
        | "invalid_client_secret"
        | "invalid_code"
        | "unauthorized_client"
        | "invalid_grant" => AccountsError::Rejected(code),
        // An unknown code is shown only when it looks like one: Accounts' answer goes to
        // logs and to clients, and must carry nothing else there.
        _ => AccountsError::Failed {
            status,
            code: Some(if looks_like_a_code(&code) {
                code
            } else {
                UNEXPECTED_VALUE.into()
            }),
        },
    }
}

/// `err` without an error code that holds one of `secrets` or a part of one (Accounts
/// echoing what it was sent, say from a wrong `accounts_url`): the code reaches logs and
/// clients.
fn without_secrets(err: AccountsError, secrets: &[&str]) -> AccountsError {
    match err {
        AccountsError::Failed {
            status,
            code: Some(code),
        } if secrets.iter().any(|secret| shares(&code, secret)) => AccountsError::Failed {
            status,
            code: Some(UNEXPECTED_VALUE.into()),
        },
        err => err,
    }
}

/// Whether `code` holds `secret`, or 8 or more bytes of it.
fn shares(code: &str, secret: &str) -> bool {
    const PART: usize = 8;
    if secret.is_empty() {
        return false;
    }
    if code.contains(secret) {
        return true;
    }
    let secret = secret.as_bytes();
    secret.len() >= PART
        && secret
            .windows(PART)
            .any(|part| code.as_bytes().windows(PART).any(|c| c == part))
}

/// What an error code is shown as when it cannot be shown as it came.
const UNEXPECTED_VALUE: &str = "(an unexpected value)";

/// Zoho's error codes are short words: `invalid_code`, `Access Denied`.
fn looks_like_a_code(code: &str) -> bool {
    (1..=64).contains(&code.len())
        && code
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b' ' | b'-'))
}

/// A client of Zoho Accounts for one Self Client.
#[derive(Clone)]
pub struct AccountsClient {
    http: Client<Connector, Full<Bytes>>,
    base: BaseUrl,
    client_id: String,
    client_secret: Secret<String>,
    timeout: Duration,
}

impl AccountsClient {
    /// The client of a config: `accounts_url`, the Self Client's credentials, each call
    /// bounded by `timeouts.response_secs` (at most 30 s).
    pub fn from_config(config: &Config) -> Self {
        let http = crate::client::build(
            config.timeouts.connect,
            Duration::from_secs(30),
            2,
            &config.extra_roots,
        );
        Self {
            http,
            base: config.accounts_url.clone(),
            client_id: config.oauth.client_id.clone(),
            client_secret: config.oauth.client_secret.clone(),
            timeout: Self::call_timeout(config),
        }
    }

    /// How long one Accounts call may take.
    pub fn call_timeout(config: &Config) -> Duration {
        config.timeouts.response.min(Duration::from_secs(30))
    }

    /// `grant_type=refresh_token`: a new access token.
    pub async fn refresh(&self, refresh_token: &Secret<String>) -> Result<Grant, AccountsError> {
        self.call(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token.expose()),
        ])
        .await
    }

    /// `grant_type=authorization_code` (Self Client, no `redirect_uri`): a refresh token.
    pub async fn exchange(&self, code: &Secret<String>) -> Result<Grant, AccountsError> {
        self.call(&[
            ("grant_type", "authorization_code"),
            ("code", code.expose()),
        ])
        .await
    }

    async fn call(&self, params: &[(&str, &str)]) -> Result<Grant, AccountsError> {
        let body = {
            let mut form = form_urlencoded::Serializer::new(String::new());
            form.extend_pairs(params);
            form.append_pair("client_id", &self.client_id);
            form.append_pair("client_secret", self.client_secret.expose());
            form.finish()
        };

        let uri = self
            .base
            .join("/oauth/v2/token")
            .map_err(|e| AccountsError::Unreachable(format!("bad accounts_url: {e}")))?;
        let request = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| AccountsError::Unreachable(e.to_string()))?;

        let exchange = async {
            let response = self.http.request(request).await.map_err(|e| {
                let why = crate::client::innermost(&e);
                // Only a failed connect is sure never to have reached Accounts.
                if e.is_connect() {
                    AccountsError::Unreachable(why)
                } else {
                    AccountsError::Interrupted(why)
                }
            })?;
            let status = response.status().as_u16();
            let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| AccountsError::Interrupted(format!("answer unreadable: {e}")))?
                .to_bytes();
            Ok::<_, AccountsError>((status, body))
        };
        let (status, body) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| AccountsError::Timeout(self.timeout))??;
        parse_token_answer(status, &body).map_err(|err| {
            let mut secrets: Vec<&str> = params
                .iter()
                .filter(|(name, _)| *name != "grant_type")
                .map(|(_, value)| *value)
                .collect();
            secrets.push(self.client_secret.expose());
            without_secrets(err, &secrets)
        })
    }
}

/// The production [`TokenSource`]: `grant_type=refresh_token` with the configured
/// refresh token.
pub struct RefreshTokenSource {
    /// The Accounts client.
    pub client: AccountsClient,
    /// The refresh token.
    pub refresh_token: Secret<String>,
}

impl TokenSource for RefreshTokenSource {
    fn fetch<'a>(&'a self, refresh: &'a Refresh<'a>) -> FetchFuture<'a> {
        Box::pin(async move {
            if refresh.arrived() {
                return Ok(Fetched::Arrived);
            }
            self.client
                .refresh(&self.refresh_token)
                .await
                .map(Fetched::Issued)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Bodies as Zoho Accounts sends them.
    const SUCCESS: &str = r#"{"access_token":"1000.67013ab3960787bcf3affae67e649fc0.83a789c859e040bf11e7d05f9c8b5ef6","api_domain":"https://www.zohoapis.com","token_type":"Bearer","expires_in":3600}"#;
    const SUCCESS_MS: &str = r#"{"access_token":"1000.aa.bb","expires_in_sec":3600,"expires_in":3600000,"api_domain":"https://www.zohoapis.com","token_type":"Bearer"}"#;
    const EXCHANGE: &str = r#"{"access_token":"1000.67013ab3960787bcf3affae67e649fc0.83a789c859e040bf11e7d05f9c8b5ef6","refresh_token":"1000.aed4288cd9cfb2d63d093faef1b98890.2f4aa58ddadbec9fbbfd683805da839b","token_type":"Bearer","expires_in":3600}"#;
    const INVALID_CODE: &str = r#"{"error":"invalid_code"}"#;
    const INVALID_CLIENT: &str = r#"{"error":"invalid_client"}"#;
    const THROTTLED: &str = r#"{"error":"Access Denied","error_description":"You have made too many requests continuously. Please try again after some time."}"#;
    const THROTTLED_LOCALIZED: &str =
        r#"{"error":"Access Denied","error_description":"Vous avez fait trop de demandes."}"#;

    #[test]
    fn success_in_seconds() {
        let grant = parse_token_answer(200, SUCCESS.as_bytes()).unwrap();
        assert_eq!(grant.expires_in, Duration::from_secs(3600));
        assert!(grant.access_token.expose().starts_with("1000.6701"));
        assert!(grant.refresh_token.is_none());
    }

    #[test]
    fn expires_in_is_milliseconds_when_expires_in_sec_is_present() {
        let grant = parse_token_answer(200, SUCCESS_MS.as_bytes()).unwrap();
        assert_eq!(grant.expires_in, Duration::from_secs(3600));
    }

    #[test]
    fn exchange_answer_carries_the_refresh_token() {
        let grant = parse_token_answer(200, EXCHANGE.as_bytes()).unwrap();
        assert!(
            grant
                .refresh_token
                .unwrap()
                .expose()
                .starts_with("1000.aed4")
        );
    }

    #[test]
    fn errors_with_http_200_are_errors() {
        assert_eq!(
            parse_token_answer(200, INVALID_CODE.as_bytes()).unwrap_err(),
            AccountsError::Rejected("invalid_code".into())
        );
        assert_eq!(
            parse_token_answer(200, INVALID_CLIENT.as_bytes()).unwrap_err(),
            AccountsError::Rejected("invalid_client".into())
        );
    }

    #[test]
    fn throttling_with_200_or_400_and_any_language() {
        for (status, body) in [
            (200, THROTTLED),
            (400, THROTTLED),
            (400, THROTTLED_LOCALIZED),
        ] {
            assert_eq!(
                parse_token_answer(status, body.as_bytes()).unwrap_err(),
                AccountsError::Throttled("Access Denied".into()),
                "{status} {body}"
            );
        }
    }

    #[test]
    fn a_redirect_says_accounts_url_is_wrong() {
        for status in [301, 302, 307, 308] {
            let err = parse_token_answer(status, b"<html>Moved</html>").unwrap_err();
            assert!(
                err.advice().contains("check accounts_url"),
                "{status}: {err}"
            );
        }
        let failing = parse_token_answer(503, b"").unwrap_err();
        assert!(failing.advice().contains("try again later"));
    }

    #[test]
    fn server_errors_and_garbage_are_transient_failures() {
        assert_eq!(
            parse_token_answer(503, b"<html>Service Unavailable</html>").unwrap_err(),
            AccountsError::Failed {
                status: 503,
                code: None
            }
        );
        assert_eq!(
            parse_token_answer(500, br#"{"error":"internal_error"}"#).unwrap_err(),
            AccountsError::Failed {
                status: 500,
                code: Some("internal_error".into())
            }
        );
        assert_eq!(
            parse_token_answer(200, b"{}").unwrap_err(),
            AccountsError::Failed {
                status: 200,
                code: None
            }
        );
    }

    #[test]
    fn a_token_with_an_odd_lifetime_is_still_a_token() {
        let lifetime = |fields: &str| {
            let body = format!(r#"{{"access_token":"1000.aa.bb"{fields}}}"#);
            parse_token_answer(200, body.as_bytes())
                .map(|grant| grant.expires_in.as_secs())
                .unwrap_or_else(|err| panic!("{fields}: {err}"))
        };
        assert_eq!(lifetime(r#","expires_in":3600.0"#), 3600);
        assert_eq!(lifetime(r#","expires_in":"1800""#), 1800);
        assert_eq!(lifetime(r#","expires_in":2.5"#), 3);
        // Unreadable: Zoho's documented hour.
        for odd in [
            r#","expires_in":-5"#,
            r#","expires_in":0"#,
            r#","expires_in":"soon""#,
            r#","expires_in":null"#,
            "",
        ] {
            assert_eq!(lifetime(odd), 3600, "{odd}");
        }
        // Milliseconds beside an unreadable expires_in_sec.
        assert_eq!(
            lifetime(r#","expires_in_sec":"x","expires_in":1800000"#),
            1800
        );
        // Huge figures are cut down to a day, so that no clock overflows on them.
        assert_eq!(
            lifetime(r#","expires_in":18446744073709551615"#),
            MAX_LIFETIME.as_secs()
        );
        let token = crate::token::source::Token::new(
            Secret::new("1000.aa.bb".into()),
            Duration::from_secs(u64::MAX),
            1,
        )
        .expect("a token");
        assert_eq!(token.lifetime, crate::token::source::MAX_LIFETIME);
    }

    #[test]
    fn a_successful_status_without_a_readable_answer_may_have_issued_a_token() {
        for body in [&br#"{"access_token":"1000.aa"#[..], b"", b"{}"] {
            assert!(parse_token_answer(200, body).unwrap_err().may_have_issued());
        }
        for (status, body) in [
            (503, &b"<html>Service Unavailable</html>"[..]),
            (200, br#"{"error":"internal_error"}"#),
        ] {
            assert!(
                !parse_token_answer(status, body)
                    .unwrap_err()
                    .may_have_issued()
            );
        }
    }

    #[test]
    fn an_error_code_that_echoes_a_secret_is_not_shown() {
        let secret = "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567";
        for code in [secret, &secret[..12], &format!("bad {secret}")] {
            let err = AccountsError::Failed {
                status: 400,
                code: Some(code.to_string()),
            };
            let shown = without_secrets(err, &["1000.refresh", secret]).to_string();
            assert!(!shown.contains(&secret[..8]), "{shown}");
            assert!(shown.contains("an unexpected value"), "{shown}");
        }
        let err = AccountsError::Failed {
            status: 400,
            code: Some("invalid_request".into()),
        };
        assert!(
            without_secrets(err, &[secret])
                .to_string()
                .contains("invalid_request")
        );
    }

    #[test]
    fn errors_never_print_what_the_answer_held() {
        // Answers that carry token-like values besides their error: none may reach an
        // error's text, which is logged and shown to clients.
        for (status, body) in [
            (
                200,
                r#"{"error":"invalid_code","refresh_token":"1000.leaked.refresh","access_token":""}"#,
            ),
            (400, r#"{"error":"1000.leaked.code"}"#),
            (500, "<html>1000.leaked.page</html>"),
            (
                200,
                r#"{"error":"Access Denied","error_description":"1000.leaked.description"}"#,
            ),
        ] {
            let err = parse_token_answer(status, body.as_bytes()).unwrap_err();
            let shown = format!("{err} {err:?} {}", err.advice());
            assert!(!shown.contains("leaked"), "{body} -> {shown}");
        }
    }
}
