//! Fake Zoho Desk: a few `/api/v1/...` endpoints plus test helpers
//! (echo, streamed download/upload, gzip, redirect, slow body).

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response};
use serde_json::{Map, Value, json};

use super::body::{PatternBody, SlowBody};
use super::body::{full, parse_form, read_body};
use super::store::now_iso8601;
use super::{RecordedRequest, RespBody, Shared};

const JSON: &str = "application/json;charset=UTF-8";
const RATE_HEADER: &str = "x-rate-limit-remaining-v3";
const INVALID_OAUTH_MSG: &str = "The OAuth Token you provided is invalid.";
const NOT_FOUND_MSG: &str = "The URL you requested could not be found.";
/// Echo returns the body itself only up to this size.
const ECHO_KEEP: usize = 65536;
/// Largest JSON body accepted by the create endpoints.
const MAX_JSON: usize = 1024 * 1024;
/// gzip.compress(b'{"data":[]}', mtime=0)
const GZIP_EMPTY_DATA: [u8; 31] = [
    0x1f, 0x8b, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x03, 0xab, 0x56, 0x4a, 0x49, 0x2c, 0x49,
    0x54, 0xb2, 0x8a, 0x8e, 0xad, 0x05, 0x00, 0x94, 0x64, 0xb2, 0x5e, 0x0b, 0x00, 0x00, 0x00,
];

/// Handles one request on the Desk listener. Every answer carries the credits left.
pub(super) async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, io::Error> {
    let mut resp = handle_inner(Arc::clone(&shared), req).await?;
    let remaining = {
        let mut st = shared.lock();
        st.credits_remaining = st.credits_remaining.saturating_sub(1);
        st.credits_remaining
    };
    resp.headers_mut()
        .insert(RATE_HEADER, HeaderValue::from(remaining));
    Ok(resp)
}

/// A call counted in flight until it ends (or is dropped).
struct InFlight {
    shared: Arc<Shared>,
    counted: AtomicBool,
}

impl InFlight {
    fn start(shared: &Arc<Shared>) -> Arc<Self> {
        Arc::new(Self {
            shared: Arc::clone(shared),
            counted: AtomicBool::new(true),
        })
    }

    /// Ends the count, once.
    fn end(&self) {
        if self.counted.swap(false, Ordering::AcqRel) {
            let mut st = self.shared.lock();
            st.desk_in_flight = st.desk_in_flight.saturating_sub(1);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.end();
    }
}

/// Ends a call's count when its handler is done with it.
struct Done(Arc<InFlight>);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// Desk's answer to a call beyond the portal's concurrency, or a forced 429.
fn too_many(retry_after: Option<u64>) -> Response<RespBody> {
    let mut resp = error(
        StatusCode::TOO_MANY_REQUESTS,
        "TOO_MANY_REQUESTS",
        "You have exceeded the number of concurrent API calls allowed for your portal.",
    );
    if let Some(secs) = retry_after {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

async fn handle_inner(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> io::Result<Response<RespBody>> {
    let (parts, body) = req.into_parts();
    let raw = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("")
        .to_owned();
    tracing::debug!(method = %parts.method, path = %parts.uri.path(), version = ?parts.version, "fake desk request");
    let (idx, forced) = {
        let mut st = shared.lock();
        st.desk_requests.push(RecordedRequest {
            method: parts.method.as_str().to_owned(),
            path_and_query: raw.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
            body_len: 0,
            body_complete: false,
            received_at: Instant::now(),
            token_accepted: None,
        });
        let forced = if st.forced_401_remaining > 0 {
            st.forced_401_remaining -= 1;
            Some((st.forced_401_code.clone(), st.forced_401_stalls))
        } else {
            None
        };
        shared
            .desk_requests_tx
            .send_replace(st.desk_requests.len() as u64);
        (st.desk_requests.len() - 1, forced)
    };
    let mut req = Req {
        shared: &shared,
        idx,
        parts: &parts,
        body: Some(body),
    };

    // The portal's concurrency: a call beyond the cap is refused at once; a forced 429
    // comes after Desk's delay, as a rate limit would.
    let (admitted, forced_429) = {
        let mut st = shared.lock();
        if st
            .desk_concurrency_cap
            .is_some_and(|cap| st.desk_in_flight >= cap)
        {
            st.desk_429s += 1;
            (false, None)
        } else {
            st.desk_in_flight += 1;
            st.desk_max_in_flight = st.desk_max_in_flight.max(st.desk_in_flight);
            let skipped = st.forced_429_remaining > 0 && st.forced_429_skip > 0;
            if skipped {
                st.forced_429_skip -= 1;
            }
            let forced = (st.forced_429_remaining > 0 && !skipped).then(|| {
                st.forced_429_remaining -= 1;
                st.desk_429s += 1;
                st.forced_429_retry_after
            });
            (true, forced)
        }
    };
    if !admitted {
        req.consume(0).await?;
        tracing::debug!("fake desk: over the concurrency cap");
        return Ok(too_many(Some(1)));
    }
    let in_flight = InFlight::start(&shared);

    // Desk takes its time before any answer, 401s included, and finishes what it started:
    // a call whose caller hung up counts against the portal until then. A call answered
    // ends when its handler returns, as before.
    let delay = shared.lock().desk_delay;
    if !delay.is_zero() {
        let working = Arc::clone(&in_flight);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            working.end();
        });
        tokio::time::sleep(delay).await;
    }
    let _done = Done(in_flight);
    if let Some(retry_after) = forced_429 {
        req.consume(0).await?;
        return Ok(too_many(retry_after));
    }

    if let Some((code, stalls)) = forced {
        req.consume(0).await?;
        tracing::debug!("fake desk: forced 401");
        let body = match code {
            Some(code) => {
                let message = if code == "INVALID_OAUTH" {
                    INVALID_OAUTH_MSG
                } else {
                    "Forced failure (fake Zoho Desk)."
                };
                json!({"errorCode": code, "message": message}).to_string()
            }
            None => String::new(),
        };
        return Ok(forced_401(&parts.headers, Bytes::from(body), stalls));
    }

    let authorized = {
        let mut st = shared.lock();
        let authorized =
            bearer(&parts.headers).is_some_and(|t| st.token_is_valid(t, Instant::now()));
        if let Some(r) = st.desk_requests.get_mut(idx) {
            r.token_accepted = Some(authorized);
        }
        authorized
    };
    if !authorized {
        req.consume(0).await?;
        tracing::debug!("fake desk: invalid or missing oauth token");
        return Ok(error(
            StatusCode::UNAUTHORIZED,
            "INVALID_OAUTH",
            INVALID_OAUTH_MSG,
        ));
    }

    route(req, &raw).await
}

/// The request being answered, with a body that can be consumed once.
struct Req<'a> {
    shared: &'a Shared,
    idx: usize,
    parts: &'a Parts,
    body: Option<Incoming>,
}

impl Req<'_> {
    /// Reads the whole body (frame by frame), records its length and returns
    /// its content when it is at most `keep` bytes.
    async fn consume(&mut self, keep: usize) -> io::Result<(u64, Option<Bytes>)> {
        let Some(body) = self.body.take() else {
            return Ok((0, Some(Bytes::new())));
        };
        let (len, content) = read_body(body, keep).await?;
        if let Some(r) = self.shared.lock().desk_requests.get_mut(self.idx) {
            r.body_len = len;
            r.body_complete = true;
        }
        Ok((len, content))
    }

    fn query(&self) -> Vec<(String, String)> {
        parse_form(self.parts.uri.query().unwrap_or("").as_bytes())
    }
}

/// `Zoho-oauthtoken <token>` from the only Authorization header, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    value.to_str().ok()?.strip_prefix("Zoho-oauthtoken ")
}

async fn route(mut req: Req<'_>, raw: &str) -> io::Result<Response<RespBody>> {
    let method = req.parts.method.clone();
    let path = req.parts.uri.path();
    let Some(rest) = path.strip_prefix("/api/v1/") else {
        req.consume(0).await?;
        return Ok(not_found());
    };
    if rest == "echo" || rest.starts_with("echo/") {
        return echo(req, raw).await;
    }
    if matches!(rest, "tickets" | "contacts") && method == Method::POST {
        let (_, body) = req.consume(MAX_JSON).await?;
        return Ok(create(req.shared, rest, body.as_deref()));
    }
    if method == Method::PATCH
        && let Some((kind @ ("tickets" | "contacts"), id)) = rest.split_once('/')
        && !id.contains('/')
    {
        let (_, body) = req.consume(MAX_JSON).await?;
        return Ok(update(req.shared, kind, id, body.as_deref()));
    }
    let (len, _) = req.consume(0).await?;
    let query = req.query();
    let param = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let resp = match (rest, method) {
        ("upload", Method::POST | Method::PUT) => {
            tracing::debug!(bytes = len, "fake desk: upload consumed");
            json_value(StatusCode::OK, &json!({"bytes": len}))
        }
        ("tickets" | "contacts", Method::GET | Method::HEAD) => list(req.shared, rest, &param),
        ("organizations", Method::GET) => {
            let mut resp = json_value(
                StatusCode::OK,
                &json!({"data": [{
                    "id": "60001234567", "companyName": "Zylker (fake)",
                    "portalName": "zylker", "isDefault": true,
                }]}),
            );
            // Zoho sets cookies on API answers too; nothing needs them.
            resp.headers_mut().insert(
                header::SET_COOKIE,
                HeaderValue::from_static("crmcsr=fake-csrf-cookie-7f3a; Path=/; Secure; HttpOnly"),
            );
            resp
        }
        ("download", Method::GET) => match param("bytes").and_then(|b| b.parse::<u64>().ok()) {
            Some(n) => download(n),
            None => invalid("The query parameter 'bytes' must be a non-negative integer."),
        },
        ("gzip", Method::GET) => {
            let mut resp = json_response(StatusCode::OK, Bytes::from_static(&GZIP_EMPTY_DATA));
            resp.headers_mut()
                .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            resp
        }
        ("redirect", Method::GET) => {
            match param("to").and_then(|t| HeaderValue::from_str(t).ok()) {
                Some(location) => {
                    let mut resp = Response::new(full(Bytes::new()));
                    *resp.status_mut() = StatusCode::FOUND;
                    resp.headers_mut().insert(header::LOCATION, location);
                    resp
                }
                None => invalid("The query parameter 'to' must be a URL."),
            }
        }
        // A body that takes `ms` as a whole, a space every `every` ms, then the JSON.
        ("drip", Method::GET) => match (
            param("ms").and_then(|m| m.parse::<u64>().ok()),
            param("every")
                .and_then(|m| m.parse::<u64>().ok())
                .filter(|e| *e > 0),
        ) {
            (Some(ms), Some(every)) => {
                let steps = ms / every;
                let parts = futures_util::stream::unfold(0u64, move |i| async move {
                    if i > steps {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(every)).await;
                    let part = if i == steps {
                        Bytes::from_static(b"{\"ok\":true}")
                    } else {
                        Bytes::from_static(b" ")
                    };
                    Some((Ok::<_, io::Error>(hyper::body::Frame::data(part)), i + 1))
                });
                let mut resp =
                    Response::new(BodyExt::boxed(http_body_util::StreamBody::new(parts)));
                resp.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON));
                resp
            }
            _ => invalid("The query parameters 'ms' and 'every' must be positive integers."),
        },
        ("slow-body", Method::GET) => match param("ms").and_then(|m| m.parse::<u64>().ok()) {
            Some(ms) => {
                let body = SlowBody::new(
                    Duration::from_millis(ms),
                    Bytes::from_static(b"{\"ok\":true}"),
                );
                let mut resp = Response::new(body.boxed());
                resp.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON));
                resp
            }
            None => invalid("The query parameter 'ms' must be a non-negative integer."),
        },
        (r, Method::GET | Method::HEAD) => match r.split_once('/') {
            Some((kind @ ("tickets" | "contacts"), id)) if !id.contains('/') => {
                get_one(req.shared, kind, id)
            }
            _ => not_found(),
        },
        (r, Method::DELETE) => match r.split_once('/') {
            Some((kind @ ("tickets" | "contacts"), id)) if !id.contains('/') => {
                delete(req.shared, kind, id)
            }
            _ => not_found(),
        },
        _ => not_found(),
    };
    Ok(resp)
}

/// `PATCH /api/v1/{tickets,contacts}/{id}` with a JSON object of the fields to change
/// (`id` and `ticketNumber` stay).
fn update(shared: &Shared, kind: &str, id: &str, body: Option<&[u8]>) -> Response<RespBody> {
    let changes = match body.map(serde_json::from_slice::<Value>) {
        Some(Ok(Value::Object(obj))) => obj,
        _ => return invalid("The request body must be a JSON object."),
    };
    let mut st = shared.lock();
    let items = if kind == "tickets" {
        &mut st.store.tickets
    } else {
        &mut st.store.contacts
    };
    let Some(item) = items
        .iter_mut()
        .find(|v| v.get("id").and_then(Value::as_str) == Some(id))
    else {
        return not_found();
    };
    if let Value::Object(fields) = item {
        for (name, value) in changes {
            if name != "id" && name != "ticketNumber" {
                fields.insert(name, value);
            }
        }
    }
    tracing::debug!("fake desk: {kind} updated");
    json_value(StatusCode::OK, item)
}

/// `DELETE /api/v1/{tickets,contacts}/{id}`: 204, or 404.
fn delete(shared: &Shared, kind: &str, id: &str) -> Response<RespBody> {
    let mut st = shared.lock();
    let items = if kind == "tickets" {
        &mut st.store.tickets
    } else {
        &mut st.store.contacts
    };
    let before = items.len();
    items.retain(|v| v.get("id").and_then(Value::as_str) != Some(id));
    if items.len() == before {
        return not_found();
    }
    tracing::debug!("fake desk: {kind} deleted");
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    response
}

/// `GET /api/v1/{tickets,contacts}` with `from` (0-based) and `limit` (default 10, max 100).
fn list<'q>(
    shared: &Shared,
    kind: &str,
    param: &dyn Fn(&str) -> Option<&'q str>,
) -> Response<RespBody> {
    let from = match param("from").map(str::parse::<usize>) {
        None => 0,
        Some(Ok(f)) => f,
        Some(Err(_)) => {
            return invalid("The query parameter 'from' must be a non-negative integer.");
        }
    };
    let limit = match param("limit").map(str::parse::<usize>) {
        None => 10,
        Some(Ok(l)) if l >= 1 => l.min(100),
        Some(_) => {
            return invalid("The query parameter 'limit' must be an integer between 1 and 100.");
        }
    };
    let st = shared.lock();
    let items = if kind == "tickets" {
        &st.store.tickets
    } else {
        &st.store.contacts
    };
    let page: Vec<Value> = items.iter().skip(from).take(limit).cloned().collect();
    json_value(StatusCode::OK, &json!({"data": page}))
}

/// `GET /api/v1/{tickets,contacts}/{id}`.
fn get_one(shared: &Shared, kind: &str, id: &str) -> Response<RespBody> {
    let st = shared.lock();
    let items = if kind == "tickets" {
        &st.store.tickets
    } else {
        &st.store.contacts
    };
    match items
        .iter()
        .find(|v| v.get("id").and_then(Value::as_str) == Some(id))
    {
        Some(v) => json_value(StatusCode::OK, v),
        None => not_found(),
    }
}

/// `POST /api/v1/{tickets,contacts}` with a JSON object body.
fn create(shared: &Shared, kind: &str, body: Option<&[u8]>) -> Response<RespBody> {
    let Some(body) = body else {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
            "The request body is too large.",
        );
    };
    let obj = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(obj)) => obj,
        _ => return invalid("The request body must be a JSON object."),
    };
    let text = |name: &str| {
        obj.get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let mut st = shared.lock();
    if kind == "tickets" {
        let Some(subject) = text("subject") else {
            return invalid("The field 'subject' is required.");
        };
        let default_contact = st
            .store
            .contacts
            .first()
            .and_then(|c| c.get("id"))
            .and_then(Value::as_str);
        let contact = text("contactId")
            .or(default_contact)
            .unwrap_or("")
            .to_owned();
        let (status, channel) = (
            text("status").unwrap_or("Open"),
            text("channel").unwrap_or("Web"),
        );
        let t = st
            .store
            .add_ticket(subject, status, &contact, &now_iso8601(), channel);
        tracing::debug!("fake desk: ticket created");
        json_value(StatusCode::OK, &t)
    } else {
        let Some(last) = text("lastName") else {
            return invalid("The field 'lastName' is required.");
        };
        let id = st.store.add_contact(text("firstName"), last, text("email"));
        tracing::debug!("fake desk: contact created");
        match st
            .store
            .contacts
            .iter()
            .find(|c| c.get("id").and_then(Value::as_str) == Some(id.as_str()))
        {
            Some(c) => json_value(StatusCode::OK, c),
            None => not_found(),
        }
    }
}

/// `ANY /api/v1/echo[/...]`: describes the request as received.
async fn echo(mut req: Req<'_>, raw: &str) -> io::Result<Response<RespBody>> {
    let (len, body) = req.consume(ECHO_KEEP).await?;
    let careless = req.shared.lock().echo_credentials;
    let mut headers = Map::new();
    for (name, value) in req.parts.headers.iter() {
        let text = String::from_utf8_lossy(value.as_bytes()).into_owned();
        // Like any sane API, never echo a credential back; keep its last 4 characters
        // so that callers can tell tokens apart.
        let text = if name == header::AUTHORIZATION && !careless {
            let tail: String = text
                .chars()
                .rev()
                .take(4)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            format!("{} ***{tail}", text.split(' ').next().unwrap_or(""))
        } else {
            text
        };
        let v = Value::String(text);
        match headers.get_mut(name.as_str()) {
            Some(Value::Array(values)) => values.push(v),
            _ => {
                headers.insert(name.as_str().to_owned(), Value::Array(vec![v]));
            }
        }
    }
    let body = body.map(|b| String::from_utf8_lossy(&b).into_owned());
    Ok(json_value(
        StatusCode::OK,
        &json!({
            "method": req.parts.method.as_str(),
            "path_and_query": raw,
            "version": format!("{:?}", req.parts.version),
            "headers": headers,
            "body_len": len,
            "body": body,
        }),
    ))
}

/// `GET /api/v1/download?bytes=N`: streams N pattern bytes.
fn download(n: u64) -> Response<RespBody> {
    let mut resp = Response::new(PatternBody::new(n).boxed());
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    resp
}

fn json_response(status: StatusCode, body: Bytes) -> Response<RespBody> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON));
    resp
}

fn json_value(status: StatusCode, value: &Value) -> Response<RespBody> {
    json_response(status, Bytes::from(value.to_string()))
}

/// A 401 with `body`, gzip-compressed when the request accepts it, as Desk's are; when
/// it `stalls`, its length is announced, half of it sent, and then nothing.
fn forced_401(request: &HeaderMap, body: Bytes, stalls: bool) -> Response<RespBody> {
    use std::io::Write;
    let gzip = request
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|e| e.trim().starts_with("gzip")));
    let compressed = (gzip && !body.is_empty())
        .then(|| {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            encoder
                .write_all(&body)
                .and_then(|()| encoder.finish())
                .ok()
        })
        .flatten();
    let gzipped = compressed.is_some();
    let body = compressed.map_or(body, Bytes::from);
    let length = body.len();
    let mut answer = if stalls {
        let half = body.slice(..length / 2);
        let frames = futures_util::stream::once(async move {
            Ok::<_, io::Error>(hyper::body::Frame::data(half))
        })
        .chain(futures_util::stream::pending());
        let stalled = BodyExt::boxed(http_body_util::StreamBody::new(frames));
        let mut answer = json_response(StatusCode::UNAUTHORIZED, Bytes::new());
        *answer.body_mut() = stalled;
        answer
    } else {
        json_response(StatusCode::UNAUTHORIZED, body)
    };
    let headers = answer.headers_mut();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    if gzipped {
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    answer
}

/// A Desk-shaped error: `{"errorCode":…,"message":…}`.
fn error(status: StatusCode, code: &str, message: &str) -> Response<RespBody> {
    json_value(status, &json!({"errorCode": code, "message": message}))
}

fn invalid(message: &str) -> Response<RespBody> {
    error(StatusCode::UNPROCESSABLE_ENTITY, "INVALID_DATA", message)
}

fn not_found() -> Response<RespBody> {
    error(StatusCode::NOT_FOUND, "URL_NOT_FOUND", NOT_FOUND_MSG)
}
