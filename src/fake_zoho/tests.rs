//! Smoke tests of the fake, driven by a raw hyper client.

use std::io;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use super::body::PatternBody;
use super::{AccountsBehavior, FakeOptions, FakeZoho};

type ReqBody = BoxBody<Bytes, io::Error>;
type HttpClient = Client<HttpConnector, ReqBody>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

fn h2_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

fn bytes_body(b: impl Into<Bytes>) -> ReqBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

fn empty() -> ReqBody {
    Empty::new().map_err(|e| match e {}).boxed()
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("json body")
    }
}

async fn send(c: &HttpClient, req: Request<ReqBody>) -> Answer {
    let resp = c.request(req).await.expect("request");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

async fn token_call(c: &HttpClient, fake: &FakeZoho, form: &str) -> Answer {
    let req = Request::post(format!("{}/oauth/v2/token", fake.accounts_url()))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(bytes_body(form.to_owned()))
        .expect("request");
    send(c, req).await
}

fn refresh_form() -> String {
    let o = FakeOptions::default();
    format!(
        "grant_type=refresh_token&client_id={}&client_secret={}&refresh_token={}",
        o.client_id, o.client_secret, o.refresh_token
    )
}

async fn new_token(c: &HttpClient, fake: &FakeZoho) -> String {
    let a = token_call(c, fake, &refresh_form()).await;
    assert_eq!(a.status, StatusCode::OK);
    a.json()["access_token"]
        .as_str()
        .expect("access_token")
        .to_owned()
}

async fn desk(
    c: &HttpClient,
    fake: &FakeZoho,
    method: Method,
    pq: &str,
    token: Option<&str>,
    body: ReqBody,
) -> Answer {
    let mut b = Request::builder()
        .method(method)
        .uri(format!("{}{}", fake.desk_url(), pq));
    if let Some(t) = token {
        b = b.header("authorization", format!("Zoho-oauthtoken {t}"));
    }
    send(c, b.body(body).expect("request")).await
}

async fn get(c: &HttpClient, fake: &FakeZoho, pq: &str, token: &str) -> Answer {
    desk(c, fake, Method::GET, pq, Some(token), empty()).await
}

fn is_hex32(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[tokio::test]
async fn refresh_token_then_desk_call() {
    let fake = FakeZoho::start().await.expect("start");
    let ctl = fake.control();
    let c = client();
    let a = token_call(&c, &fake, &refresh_form()).await;
    assert_eq!(a.status, StatusCode::OK);
    let v = a.json();
    let token = v["access_token"].as_str().expect("token").to_owned();
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3);
    assert_eq!(parts[0], "1000");
    assert!(is_hex32(parts[1]) && is_hex32(parts[2]));
    assert_eq!(v["expires_in"], 3600);
    assert_eq!(v["token_type"], "Bearer");
    assert_eq!(v["api_domain"], "https://www.zohoapis.com");
    assert!(v.get("refresh_token").is_none());
    assert_eq!(ctl.token_requests(), 1);
    assert_eq!(ctl.issued_tokens(), vec![token.clone()]);
    assert_eq!(ctl.live_token_count(), 1);
    let form = ctl.last_token_form().expect("form");
    assert!(form.iter().all(|(k, _)| k != "redirect_uri"));
    assert!(form.contains(&("grant_type".into(), "refresh_token".into())));

    let a = get(&c, &fake, "/api/v1/tickets", &token).await;
    assert_eq!(a.status, StatusCode::OK);
    // One credit per call: the first call to Desk leaves 4999 of the day's 5000.
    assert_eq!(a.headers["x-rate-limit-remaining-v3"], "4999");
    assert!(
        a.headers["content-type"]
            .to_str()
            .expect("ct")
            .starts_with("application/json")
    );
    let data = a.json()["data"].as_array().expect("data").clone();
    assert_eq!(data.len(), 3);
    assert_eq!(data[0]["ticketNumber"], "101");
    assert_eq!(data[0]["id"].as_str().expect("id").len(), 18);
    assert_eq!(ctl.desk_request_count(), 1);
    fake.shutdown().await;
}

#[tokio::test]
async fn accounts_errors_and_query_params() {
    let fake = FakeZoho::start().await.expect("start");
    let c = client();
    let o = FakeOptions::default();
    let cases = [
        (
            format!(
                "grant_type=refresh_token&client_id=nope&client_secret={}&refresh_token={}",
                o.client_secret, o.refresh_token
            ),
            "invalid_client",
        ),
        (
            format!(
                "grant_type=refresh_token&client_id={}&client_secret=nope&refresh_token={}",
                o.client_id, o.refresh_token
            ),
            "invalid_client_secret",
        ),
        (
            format!(
                "grant_type=refresh_token&client_id={}&client_secret={}&refresh_token=nope",
                o.client_id, o.client_secret
            ),
            "invalid_code",
        ),
        ("client_id=x".to_owned(), "unsupported_grant_type"),
        ("grant_type=password".to_owned(), "unsupported_grant_type"),
    ];
    for (form, err) in cases {
        let a = token_call(&c, &fake, &form).await;
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(a.json()["error"], err, "{form}");
    }
    assert_eq!(fake.control().token_requests(), 3);
    assert!(fake.control().issued_tokens().is_empty());

    // Params in the query string, empty body.
    let req = Request::post(format!(
        "{}/oauth/v2/token?{}",
        fake.accounts_url(),
        refresh_form()
    ))
    .body(empty())
    .expect("request");
    let a = send(&c, req).await;
    assert!(a.json()["access_token"].is_string());

    let req = Request::get(format!("{}/other", fake.accounts_url()))
        .body(empty())
        .expect("request");
    assert_eq!(send(&c, req).await.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn grant_code_exchange_is_single_use() {
    let fake = FakeZoho::start().await.expect("start");
    let c = client();
    let o = FakeOptions::default();
    let form = format!(
        "grant_type=authorization_code&client_id={}&client_secret={}&code=1000.fakegrant.0001",
        o.client_id, o.client_secret
    );
    let v = token_call(&c, &fake, &form).await.json();
    assert_eq!(v["refresh_token"], o.refresh_token.as_str());
    assert!(v["access_token"].is_string());
    assert_eq!(v["expires_in"], 3600);
    let v = token_call(&c, &fake, &form).await.json();
    assert_eq!(v["error"], "invalid_code");
    assert_eq!(fake.control().exchange_requests(), 2);
    assert_eq!(fake.control().token_requests(), 0);
    let bad = form.replace(&o.client_id, "other");
    assert_eq!(
        token_call(&c, &fake, &bad).await.json()["error"],
        "invalid_client"
    );
}

#[tokio::test]
async fn sixteenth_token_evicts_the_oldest() {
    let fake = FakeZoho::start().await.expect("start");
    let c = client();
    let mut tokens = Vec::new();
    for _ in 0..16 {
        tokens.push(new_token(&c, &fake).await);
    }
    assert_eq!(fake.control().live_token_count(), 15);
    assert_eq!(
        get(&c, &fake, "/api/v1/organizations", &tokens[0])
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        get(&c, &fake, "/api/v1/organizations", &tokens[1])
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        get(&c, &fake, "/api/v1/organizations", &tokens[15])
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn rate_limit_and_subscribe() {
    let options = FakeOptions {
        enforce_rate_limit: true,
        ..FakeOptions::default()
    };
    let fake = FakeZoho::start_with(options).await.expect("start");
    let mut rx = fake.control().subscribe_token_requests();
    let c = client();
    for _ in 0..10 {
        new_token(&c, &fake).await;
    }
    let a = token_call(&c, &fake, &refresh_form()).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.json()["error"], "Access Denied");
    let n = *rx.wait_for(|n| *n >= 11).await.expect("watch");
    assert_eq!(n, 11);
    assert_eq!(fake.control().issued_tokens().len(), 10);
}

#[tokio::test]
async fn expiry_revocation_and_quirk() {
    let fake = FakeZoho::start().await.expect("start");
    let ctl = fake.control();
    let c = client();
    ctl.set_token_lifetime(Duration::from_millis(300));
    ctl.set_expires_in_ms_quirk(true);
    let a = token_call(&c, &fake, &refresh_form()).await.json();
    assert_eq!(a["expires_in_sec"], 1);
    assert_eq!(a["expires_in"], 1000);
    let short = a["access_token"].as_str().expect("token").to_owned();
    assert_eq!(
        get(&c, &fake, "/api/v1/contacts", &short).await.status,
        StatusCode::OK
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let a = get(&c, &fake, "/api/v1/contacts", &short).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.json()["errorCode"], "INVALID_OAUTH");
    // One credit per call: the second call to Desk leaves 4998 of the day's 5000.
    assert_eq!(a.headers["x-rate-limit-remaining-v3"], "4998");

    ctl.set_token_lifetime(Duration::from_secs(3600));
    ctl.set_expires_in_ms_quirk(false);
    let t = new_token(&c, &fake).await;
    assert_eq!(
        get(&c, &fake, "/api/v1/contacts", &t).await.status,
        StatusCode::OK
    );
    ctl.revoke_all_tokens();
    assert_eq!(ctl.live_token_count(), 0);
    assert_eq!(
        get(&c, &fake, "/api/v1/contacts", &t).await.status,
        StatusCode::UNAUTHORIZED
    );

    // Wrong scheme and no header at all.
    let t = new_token(&c, &fake).await;
    let req = Request::get(format!("{}/api/v1/contacts", fake.desk_url()))
        .header("authorization", format!("Bearer {t}"))
        .body(empty())
        .expect("request");
    assert_eq!(send(&c, req).await.status, StatusCode::UNAUTHORIZED);
    let a = desk(&c, &fake, Method::GET, "/api/v1/contacts", None, empty()).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn accounts_behaviors() {
    let fake = FakeZoho::start().await.expect("start");
    let ctl = fake.control();
    let c = client();

    ctl.set_accounts_behavior(AccountsBehavior::Throttle { status: 200 });
    let a = token_call(&c, &fake, &refresh_form()).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.json()["error"], "Access Denied");

    ctl.set_accounts_behavior(AccountsBehavior::Error {
        status: 500,
        body: "{\"x\":1}".into(),
    });
    let a = token_call(&c, &fake, &refresh_form()).await;
    assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(&a.body[..], b"{\"x\":1}");

    ctl.set_accounts_behavior(AccountsBehavior::Unavailable);
    let a = token_call(&c, &fake, &refresh_form()).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        a.headers["content-type"]
            .to_str()
            .expect("ct")
            .starts_with("text/html")
    );

    ctl.set_accounts_behavior(AccountsBehavior::CloseConnection);
    let req = Request::post(format!("{}/oauth/v2/token", fake.accounts_url()))
        .body(bytes_body(refresh_form()))
        .expect("request");
    assert!(c.request(req).await.is_err());

    ctl.set_accounts_behavior(AccountsBehavior::Normal);
    ctl.set_accounts_delay(Duration::from_millis(200));
    let started = Instant::now();
    new_token(&c, &fake).await;
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(ctl.token_requests(), 5);
    assert_eq!(ctl.issued_tokens().len(), 1);
}

#[tokio::test]
async fn forced_desk_failures_and_recording() {
    let fake = FakeZoho::start().await.expect("start");
    let ctl = fake.control();
    let c = client();
    let t = new_token(&c, &fake).await;
    ctl.fail_next_desk_requests(2, Some("INVALID_OAUTH"));
    let a = desk(
        &c,
        &fake,
        Method::POST,
        "/api/v1/echo?x=1",
        Some(&t),
        bytes_body("abc"),
    )
    .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.json()["errorCode"], "INVALID_OAUTH");
    let a = get(&c, &fake, "/api/v1/tickets", &t).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    ctl.fail_next_desk_requests(1, None);
    let a = get(&c, &fake, "/api/v1/tickets", &t).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert!(a.body.is_empty());
    assert_eq!(
        get(&c, &fake, "/api/v1/tickets", &t).await.status,
        StatusCode::OK
    );

    let recorded = ctl.desk_requests();
    assert_eq!(recorded.len(), 4);
    assert_eq!(ctl.desk_request_count(), 4);
    assert_eq!(recorded[0].method, "POST");
    assert_eq!(recorded[0].path_and_query, "/api/v1/echo?x=1");
    assert_eq!(recorded[0].body_len, 3);
    assert_eq!(recorded[0].version, Version::HTTP_11);
    assert_eq!(
        recorded[0].headers["authorization"],
        format!("Zoho-oauthtoken {t}").as_str()
    );

    ctl.set_desk_delay(Duration::from_millis(200));
    let started = Instant::now();
    assert_eq!(
        get(&c, &fake, "/api/v1/tickets", &t).await.status,
        StatusCode::OK
    );
    assert!(started.elapsed() >= Duration::from_millis(200));
}

#[tokio::test]
async fn echo_over_h1_and_h2c() {
    let fake = FakeZoho::start().await.expect("start");
    let c = client();
    let t = new_token(&c, &fake).await;
    let raw = "/api/v1/echo/a%2Fb/c?q=%20x&q=y+z";
    let req = Request::put(format!("{}{}", fake.desk_url(), raw))
        .header("authorization", format!("Zoho-oauthtoken {t}"))
        .header("x-multi", "1")
        .header("x-multi", "2")
        .body(bytes_body("héllo"))
        .expect("request");
    let v = send(&c, req).await.json();
    assert_eq!(v["method"], "PUT");
    assert_eq!(v["path_and_query"], raw);
    assert_eq!(v["version"], "HTTP/1.1");
    assert_eq!(v["headers"]["x-multi"], serde_json::json!(["1", "2"]));
    assert_eq!(v["body_len"], 6);
    assert_eq!(v["body"], "héllo");

    let h2 = h2_client();
    let big = vec![b'a'; 70_000];
    let a = desk(
        &h2,
        &fake,
        Method::POST,
        "/api/v1/echo",
        Some(&t),
        bytes_body(big),
    )
    .await;
    let v = a.json();
    assert_eq!(v["version"], "HTTP/2.0");
    assert_eq!(v["body_len"], 70_000);
    assert!(v["body"].is_null());
    let recorded = fake.control().desk_requests();
    assert_eq!(recorded.last().expect("recorded").version, Version::HTTP_2);
}

#[tokio::test]
async fn crud_endpoints() {
    let fake = FakeZoho::start().await.expect("start");
    let c = client();
    let t = new_token(&c, &fake).await;
    let page = get(&c, &fake, "/api/v1/tickets?from=1&limit=1", &t)
        .await
        .json();
    assert_eq!(page["data"].as_array().expect("data").len(), 1);
    assert_eq!(page["data"][0]["ticketNumber"], "102");
    let a = get(&c, &fake, "/api/v1/tickets?limit=abc", &t).await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(a.json()["errorCode"], "INVALID_DATA");

    let a = desk(
        &c,
        &fake,
        Method::POST,
        "/api/v1/tickets",
        Some(&t),
        bytes_body(r#"{"subject":"Printer on fire"}"#),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    let created = a.json();
    assert_eq!(created["ticketNumber"], "104");
    assert_eq!(created["status"], "Open");
    let id = created["id"].as_str().expect("id").to_owned();
    assert_eq!(id.len(), 18);
    let fetched = get(&c, &fake, &format!("/api/v1/tickets/{id}"), &t)
        .await
        .json();
    assert_eq!(fetched, created);
    let a = desk(
        &c,
        &fake,
        Method::POST,
        "/api/v1/tickets",
        Some(&t),
        bytes_body("{}"),
    )
    .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    let a = desk(
        &c,
        &fake,
        Method::POST,
        "/api/v1/tickets",
        Some(&t),
        bytes_body("not json"),
    )
    .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    let a = get(&c, &fake, "/api/v1/tickets/123", &t).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(a.json()["errorCode"], "URL_NOT_FOUND");
    assert_eq!(
        get(&c, &fake, "/api/v1/nope", &t).await.status,
        StatusCode::NOT_FOUND
    );

    let contacts = get(&c, &fake, "/api/v1/contacts", &t).await.json();
    assert_eq!(contacts["data"].as_array().expect("data").len(), 2);
    let a = desk(
        &c,
        &fake,
        Method::POST,
        "/api/v1/contacts",
        Some(&t),
        bytes_body(r#"{"lastName":"Doe","email":"d@x.example"}"#),
    )
    .await;
    let contact = a.json();
    assert_eq!(contact["lastName"], "Doe");
    assert!(contact["firstName"].is_null());
    let id = contact["id"].as_str().expect("id");
    assert_eq!(
        get(&c, &fake, &format!("/api/v1/contacts/{id}"), &t)
            .await
            .json(),
        contact
    );
    let a = desk(
        &c,
        &fake,
        Method::POST,
        "/api/v1/contacts",
        Some(&t),
        bytes_body(r#"{"firstName":"X"}"#),
    )
    .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);

    let orgs = get(&c, &fake, "/api/v1/organizations", &t).await.json();
    assert_eq!(orgs["data"][0]["companyName"], "Zylker (fake)");
    assert_eq!(orgs["data"][0]["isDefault"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_download_and_upload() {
    let fake = FakeZoho::start().await.expect("start");
    let c = client();
    let t = new_token(&c, &fake).await;
    for c in [client(), h2_client()] {
        let n: u64 = 3 * 1024 * 1024 + 17;
        let req = Request::get(format!("{}/api/v1/download?bytes={n}", fake.desk_url()))
            .header("authorization", format!("Zoho-oauthtoken {t}"))
            .body(empty())
            .expect("request");
        let resp = c.request(req).await.expect("download");
        assert_eq!(resp.headers()["content-length"], n.to_string().as_str());
        assert_eq!(resp.headers()["content-type"], "application/octet-stream");
        let mut body = resp.into_body();
        let mut seen: u64 = 0;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.expect("frame").into_data() {
                for (i, b) in data.iter().enumerate() {
                    assert_eq!(*b, ((seen + i as u64) % 251) as u8);
                }
                seen += data.len() as u64;
            }
        }
        assert_eq!(seen, n);
    }

    for c in [client(), h2_client()] {
        let size: u64 = 256 * 1024 * 1024;
        let a = desk(
            &c,
            &fake,
            Method::PUT,
            "/api/v1/upload",
            Some(&t),
            PatternBody::new(size).boxed(),
        )
        .await;
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(a.json()["bytes"], size);
        let recorded = fake.control().desk_requests();
        assert_eq!(recorded.last().expect("recorded").body_len, size);
    }
}

#[tokio::test]
async fn gzip_redirect_and_slow_body() {
    let fake = FakeZoho::start().await.expect("start");
    let c = client();
    let t = new_token(&c, &fake).await;
    let a = get(&c, &fake, "/api/v1/gzip", &t).await;
    assert_eq!(a.headers["content-encoding"], "gzip");
    assert_eq!(&a.body[..2], &[0x1f, 0x8b]);

    let a = get(
        &c,
        &fake,
        "/api/v1/redirect?to=https%3A%2F%2Fexample.com%2Fx%3Fy%3D1",
        &t,
    )
    .await;
    assert_eq!(a.status, StatusCode::FOUND);
    assert_eq!(a.headers["location"], "https://example.com/x?y=1");
    assert!(a.body.is_empty());

    let req = Request::get(format!("{}/api/v1/slow-body?ms=300", fake.desk_url()))
        .header("authorization", format!("Zoho-oauthtoken {t}"))
        .body(empty())
        .expect("request");
    let started = Instant::now();
    let resp = c.request(req).await.expect("slow");
    assert!(started.elapsed() < Duration::from_millis(250));
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(&body[..], b"{\"ok\":true}");
}

#[tokio::test]
async fn shutdown_and_drop_close_listeners() {
    let fake = FakeZoho::start().await.expect("start");
    let (acc, desk) = (fake.accounts_url(), fake.desk_url());
    assert_ne!(acc, desk);
    fake.shutdown().await;
    for url in [&acc, &desk] {
        let addr = url.trim_start_matches("http://");
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }

    let fake = FakeZoho::start().await.expect("start");
    let c = client();
    let t = new_token(&c, &fake).await; // leaves a keep-alive connection open
    let desk_addr = fake.desk_url().trim_start_matches("http://").to_owned();
    assert_eq!(
        get(&c, &fake, "/api/v1/tickets", &t).await.status,
        StatusCode::OK
    );
    drop(fake);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(tokio::net::TcpStream::connect(&desk_addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_in_flight_requests() {
    for c in [client(), h2_client()] {
        let fake = FakeZoho::start().await.expect("start");
        let t = new_token(&c, &fake).await;
        fake.control().set_desk_delay(Duration::from_secs(30));
        let req = Request::get(format!("{}/api/v1/tickets", fake.desk_url()))
            .header("authorization", format!("Zoho-oauthtoken {t}"))
            .body(empty())
            .expect("request");
        let pending = tokio::spawn(async move { c.request(req).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        fake.shutdown().await;
        let outcome = tokio::time::timeout(Duration::from_secs(5), pending)
            .await
            .expect("request ended")
            .expect("join");
        assert!(outcome.is_err());
    }
}

/// 1 GiB each way; run with `cargo test -- --ignored` (checks streaming, not speed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: pushes 1 GiB each way"]
async fn one_gib_each_way() {
    let fake = FakeZoho::start().await.expect("start");
    let c = client();
    let t = new_token(&c, &fake).await;
    let size: u64 = 1 << 30;
    let a = desk(
        &c,
        &fake,
        Method::POST,
        "/api/v1/upload",
        Some(&t),
        PatternBody::new(size).boxed(),
    )
    .await;
    assert_eq!(a.json()["bytes"], size);
    let req = Request::get(format!("{}/api/v1/download?bytes={size}", fake.desk_url()))
        .header("authorization", format!("Zoho-oauthtoken {t}"))
        .body(empty())
        .expect("request");
    let mut body = c.request(req).await.expect("download").into_body();
    let mut seen: u64 = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("frame").into_data() {
            seen += data.len() as u64;
        }
    }
    assert_eq!(seen, size);
}

#[tokio::test]
async fn the_ticket_verbs_a_user_will_try() {
    let fake = FakeZoho::start().await.unwrap();
    let c = client();
    let token = new_token(&c, &fake).await;
    let one = format!("/api/v1/tickets/{}", super::FIRST_TICKET_ID);
    let head = desk(&c, &fake, Method::HEAD, &one, Some(&token), empty()).await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    let patched = desk(
        &c,
        &fake,
        Method::PATCH,
        &one,
        Some(&token),
        bytes_body(r#"{"status":"Closed","id":"no"}"#),
    )
    .await;
    assert_eq!(patched.status, StatusCode::OK);
    assert_eq!(patched.json()["status"], "Closed");
    assert_eq!(patched.json()["id"], super::FIRST_TICKET_ID);
    assert_eq!(
        get(&c, &fake, &one, &token).await.json()["status"],
        "Closed"
    );
    let deleted = desk(&c, &fake, Method::DELETE, &one, Some(&token), empty()).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    assert_eq!(
        get(&c, &fake, &one, &token).await.status,
        StatusCode::NOT_FOUND
    );
    let again = desk(&c, &fake, Method::DELETE, &one, Some(&token), empty()).await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
    fake.shutdown().await;
}
