//! Fake Zoho Accounts: `POST /oauth/v2/token`.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderValue, Method, StatusCode, header};
use hyper::body::Incoming;
use hyper::{Request, Response};
use serde_json::{Value, json};

use super::body::{full, parse_form, read_body};
use super::{AccountsBehavior, RespBody, Shared};

/// Largest token-endpoint body the fake reads.
const MAX_FORM: usize = 64 * 1024;
const API_DOMAIN: &str = "https://www.zohoapis.com";
const THROTTLE_DESCRIPTION: &str =
    "You have made too many requests continuously. Please try again after some time.";

/// Handles one request on the Accounts listener.
pub(super) async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, io::Error> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    tracing::debug!(%method, %path, "fake accounts request");

    if path != "/oauth/v2/token" {
        let (_, _) = read_body(req.into_body(), 0).await?;
        return Ok(json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": "not_found", "error_description": "The requested URL was not found."}),
        ));
    }
    if method != Method::POST {
        let (_, _) = read_body(req.into_body(), 0).await?;
        return Ok(json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({"error": "method_not_allowed"}),
        ));
    }

    let (_, body) = read_body(req.into_body(), MAX_FORM).await?;
    let Some(body) = body else {
        return Ok(json_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            &json!({"error": "invalid_request"}),
        ));
    };
    // Body fields first, then query-string fields; lookups take the first match.
    let mut form = parse_form(&body);
    form.extend(parse_form(query.as_bytes()));
    let grant_type = field(&form, "grant_type").map(str::to_owned);

    let (delay, behavior) = {
        let mut st = shared.lock();
        st.last_token_form = Some(form.clone());
        match grant_type.as_deref() {
            Some("refresh_token") => {
                st.token_requests += 1;
                shared.token_requests_tx.send_replace(st.token_requests);
            }
            Some("authorization_code") => st.exchange_requests += 1,
            _ => {}
        }
        (st.accounts_delay, st.accounts_behavior.clone())
    };
    tracing::debug!(grant_type = ?grant_type, ?behavior, "fake accounts token call");

    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }

    match behavior {
        AccountsBehavior::Normal => {}
        AccountsBehavior::Throttle { status } => {
            return Ok(throttled(status_or(status, StatusCode::BAD_REQUEST)));
        }
        AccountsBehavior::Error { status, body } => {
            let mut resp = Response::new(full(body));
            *resp.status_mut() = status_or(status, StatusCode::INTERNAL_SERVER_ERROR);
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            return Ok(resp);
        }
        AccountsBehavior::Unavailable => {
            let mut resp = Response::new(full("<html><body>Service Unavailable</body></html>"));
            *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html;charset=UTF-8"),
            );
            return Ok(resp);
        }
        AccountsBehavior::CloseConnection => {
            tracing::debug!("fake accounts dropping the connection");
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "fake zoho accounts: connection closed on purpose",
            ));
        }
    }

    Ok(match grant_type.as_deref() {
        Some("refresh_token") => refresh(&shared, &form),
        Some("authorization_code") => exchange(&shared, &form),
        _ => ok_json(&json!({"error": "unsupported_grant_type"})),
    })
}

/// `grant_type=refresh_token`.
fn refresh(shared: &Shared, form: &[(String, String)]) -> Response<RespBody> {
    if let Some(err) = check_client(shared, form) {
        return ok_json(&err);
    }
    if field(form, "refresh_token") != Some(shared.refresh_token.as_str()) {
        tracing::debug!("fake accounts: wrong refresh token");
        return ok_json(&json!({"error": "invalid_code"}));
    }
    let now = Instant::now();
    let mut st = shared.lock();
    if !st.admit_refresh(now) {
        tracing::debug!("fake accounts: rate limit hit");
        return throttled(StatusCode::BAD_REQUEST);
    }
    let token = st.issue_token(now);
    tracing::debug!("fake accounts: access token issued via refresh token");
    ok_json(&token_json(
        token,
        st.token_lifetime,
        st.expires_in_ms_quirk,
        None,
    ))
}

/// `grant_type=authorization_code` (Self Client: no redirect_uri needed).
fn exchange(shared: &Shared, form: &[(String, String)]) -> Response<RespBody> {
    if let Some(err) = check_client(shared, form) {
        return ok_json(&err);
    }
    let mut st = shared.lock();
    let code = field(form, "code").unwrap_or("");
    let Some(pos) = st.unused_grant_codes.iter().position(|c| c == code) else {
        tracing::debug!("fake accounts: unknown or used grant code");
        return ok_json(&json!({"error": "invalid_code"}));
    };
    st.unused_grant_codes.remove(pos);
    let token = st.issue_token(Instant::now());
    tracing::debug!("fake accounts: grant code exchanged");
    ok_json(&token_json(
        token,
        st.token_lifetime,
        st.expires_in_ms_quirk,
        Some(&shared.refresh_token),
    ))
}

/// Zoho's client checks; `Some(error)` when the client is not accepted.
fn check_client(shared: &Shared, form: &[(String, String)]) -> Option<Value> {
    if field(form, "client_id") != Some(shared.client_id.as_str()) {
        tracing::debug!("fake accounts: wrong client id");
        return Some(json!({"error": "invalid_client"}));
    }
    if field(form, "client_secret") != Some(shared.client_secret.as_str()) {
        tracing::debug!("fake accounts: wrong client secret");
        return Some(json!({"error": "invalid_client_secret"}));
    }
    None
}

fn token_json(token: String, lifetime: Duration, ms_quirk: bool, refresh: Option<&str>) -> Value {
    let secs = lifetime.as_secs().max(1);
    let mut v = json!({
        "access_token": token,
        "api_domain": API_DOMAIN,
        "token_type": "Bearer",
    });
    if let Some(map) = v.as_object_mut() {
        if ms_quirk {
            map.insert("expires_in_sec".into(), json!(secs));
            map.insert("expires_in".into(), json!(secs.saturating_mul(1000)));
        } else {
            map.insert("expires_in".into(), json!(secs));
        }
        if let Some(rt) = refresh {
            map.insert("refresh_token".into(), json!(rt));
        }
    }
    v
}

fn throttled(status: StatusCode) -> Response<RespBody> {
    json_response(
        status,
        &json!({"error": "Access Denied", "error_description": THROTTLE_DESCRIPTION}),
    )
}

fn field<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn status_or(code: u16, fallback: StatusCode) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(fallback)
}

fn ok_json(value: &Value) -> Response<RespBody> {
    json_response(StatusCode::OK, value)
}

fn json_response(status: StatusCode, value: &Value) -> Response<RespBody> {
    let mut resp = Response::new(full(value.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json;charset=UTF-8"),
    );
    resp
}
