//! Transparent mode (README "Clients that cannot change their URL"): clients hard-wired to
//! https://desk.zoho.com reach Desk through `HTTPS_PROXY`, with the local CA as their only
//! root, over HTTP/1.1 and HTTP/2; Accounts is answered locally with a placeholder; every
//! other target, name or stalled tunnel is refused; and the CA cannot vouch for any other
//! name.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use support::binary::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use zoho_desk_proxy::Secret;
use zoho_desk_proxy::config::Config;
use zoho_desk_proxy::fake_zoho::{FakeOptions, FakeZoho};

const LIMIT: Duration = Duration::from_secs(5);

/// A proxy in transparent mode in front of the fake, with a CA of its own.
struct Transparent {
    s: Scenario,
    ca_dir: tempfile::TempDir,
}

impl Transparent {
    async fn start(tweak: impl FnOnce(&mut Config)) -> Self {
        let ca_dir = tempfile::tempdir().unwrap();
        let dir = ca_dir.path().to_owned();
        let s = Scenario::with(FakeOptions::default(), move |c| {
            c.intercept.enabled = true;
            c.intercept.ca_dir = dir;
            zoho_desk_proxy::ops::ca_init(c, None, false).unwrap();
            tweak(c);
        })
        .await;
        Self { s, ca_dir }
    }

    fn ca(&self) -> PathBuf {
        self.ca_dir.path().join("ca.pem")
    }
}

/// A TLS client that trusts only `ca`, offering `alpn`.
fn connector(ca: &Path, alpn: &[&[u8]]) -> TlsConnector {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

/// `CONNECT target` through the proxy with `headers`; the status line's code and the
/// stream (positioned after the answer's head).
async fn connect(
    proxy: SocketAddr,
    target: &str,
    headers: &[(&str, &str)],
) -> (u16, String, TcpStream) {
    connect_as(proxy, target, "HTTP/1.1", headers).await
}

/// [`connect`], saying `version` on the request line.
async fn connect_as(
    proxy: SocketAddr,
    target: &str,
    version: &str,
    headers: &[(&str, &str)],
) -> (u16, String, TcpStream) {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    // `Host: <target>` unless the caller gives its own.
    let mut head = format!("CONNECT {target} {version}\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        head.push_str(&format!("Host: {target}\r\n"));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    // Read the answer's head (and body, for a refusal) byte by byte: nothing of the
    // tunnel may be consumed.
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    tokio::time::timeout(LIMIT, async {
        while !answer.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                break;
            }
            answer.push(byte[0]);
        }
    })
    .await
    .expect("an answer to CONNECT");
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = raw_status(&text);
    // A refusal leaves the connection open (keep-alive): read its body by length.
    let length = text
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; if status == 200 { 0 } else { length }];
    tokio::time::timeout(LIMIT, stream.read_exact(&mut body))
        .await
        .expect("the refusal's body")
        .unwrap();
    (status, text + &String::from_utf8_lossy(&body), stream)
}

/// A TLS tunnel to `host` through the proxy, trusting only `ca`.
async fn tunnel(
    proxy: SocketAddr,
    host: &str,
    ca: &Path,
    alpn: &[&[u8]],
    headers: &[(&str, &str)],
) -> std::io::Result<TlsStream<TcpStream>> {
    let (status, answer, stream) = connect(proxy, &format!("{host}:443"), headers).await;
    assert_eq!(status, 200, "{answer}");
    let name = ServerName::try_from(host.to_owned()).unwrap();
    connector(ca, alpn).connect(name, stream).await
}

type Body = Full<Bytes>;

/// Sends `request` over `tls`, HTTP/2 when ALPN chose it; status and body.
/// The status of `GET https://desk.zoho.com/api/v1/tickets` through `tls`.
async fn tickets(tls: TlsStream<TcpStream>) -> u16 {
    send(tls, get("https://desk.zoho.com/api/v1/tickets"))
        .await
        .0
}

async fn send(tls: TlsStream<TcpStream>, request: http::Request<Body>) -> (u16, Bytes) {
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = TokioIo::new(tls);
    let response = if h2 {
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
        tokio::spawn(connection);
        sender.send_request(request).await.unwrap()
    } else {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(connection);
        sender.send_request(request).await.unwrap()
    };
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, body)
}

fn get(uri: &str) -> http::Request<Body> {
    http::Request::get(uri)
        .header("host", http::Uri::try_from(uri).unwrap().host().unwrap())
        .header(
            "authorization",
            "Zoho-oauthtoken 1000.zohodeskproxy.placeholder",
        )
        .body(Full::new(Bytes::new()))
        .unwrap()
}

#[tokio::test]
async fn a_client_hard_wired_to_desk_is_served_over_http1_and_http2() {
    let t = Transparent::start(|_| {}).await;
    for alpn in [
        &[b"http/1.1".as_slice()][..],
        &[b"h2".as_slice(), b"http/1.1"],
    ] {
        let tls = tunnel(t.s.proxy.addr, "desk.zoho.com", &t.ca(), alpn, &[])
            .await
            .expect("the client trusts the local CA's leaf for desk.zoho.com");
        let negotiated = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let (status, body) = send(tls, get("https://desk.zoho.com/api/v1/tickets?limit=2")).await;
        assert_eq!(status, 200, "{alpn:?}: {}", String::from_utf8_lossy(&body));
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["data"].as_array().unwrap().len(), 2, "{alpn:?}");
        let seen = t.s.zoho.desk_requests().pop().unwrap();
        assert_eq!(seen.path_and_query, "/api/v1/tickets?limit=2");
        let auth = seen.headers["authorization"].to_str().unwrap();
        assert!(
            auth.starts_with("Zoho-oauthtoken 1000.") && !auth.contains("zohodeskproxy"),
            "the real token replaced the client's placeholder"
        );
        if alpn.len() == 2 {
            assert_eq!(negotiated.as_deref(), Some(b"h2".as_slice()));
        }
    }
}

#[tokio::test]
async fn an_http_1_0_connect_as_python_sends_it_is_tunnelled_too() {
    let t = Transparent::start(|_| {}).await;
    let (status, answer, stream) =
        connect_as(t.s.proxy.addr, "desk.zoho.com:443", "HTTP/1.0", &[]).await;
    assert_eq!(status, 200, "{answer}");
    let name = ServerName::try_from("desk.zoho.com").unwrap();
    let tls = connector(&t.ca(), &[b"http/1.1"])
        .connect(name, stream)
        .await
        .unwrap();
    assert_eq!(tickets(tls).await, 200);
}

#[tokio::test]
async fn accounts_is_answered_locally_with_a_placeholder_and_never_reached() {
    let t = Transparent::start(|_| {}).await;
    let options = FakeOptions::default();
    for grant in [
        "grant_type=client_credentials&client_id=x&client_secret=y&scope=Desk.tickets.READ",
        "grant_type=refresh_token&client_id=x&client_secret=y&refresh_token=z",
    ] {
        let tls = tunnel(
            t.s.proxy.addr,
            "accounts.zoho.com",
            &t.ca(),
            &[b"http/1.1"],
            &[],
        )
        .await
        .unwrap();
        let request = http::Request::post("https://accounts.zoho.com/oauth/v2/token")
            .header("host", "accounts.zoho.com")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(grant)))
            .unwrap();
        let (status, body) = send(tls, request).await;
        assert_eq!(status, 200);
        let text = String::from_utf8_lossy(&body);
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(
            json["access_token"]
                .as_str()
                .unwrap()
                .starts_with("1000.zohodeskproxy")
        );
        assert_eq!(json["expires_in"], 3600);
        assert_eq!(json["token_type"], "Bearer");
        assert_eq!(json["api_domain"], "https://www.zohoapis.com");
        for secret in [&options.client_secret, &options.refresh_token] {
            assert!(!text.contains(secret.as_str()), "{text}");
        }
        for issued in t.s.zoho.issued_tokens() {
            assert!(
                !text.contains(&issued),
                "the real access token leaked: {text}"
            );
        }
    }
    let tls = tunnel(
        t.s.proxy.addr,
        "accounts.zoho.com",
        &t.ca(),
        &[b"http/1.1"],
        &[],
    )
    .await
    .unwrap();
    let revoke = http::Request::post("https://accounts.zoho.com/oauth/v2/token/revoke?token=x")
        .header("host", "accounts.zoho.com")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(tls, revoke).await.0, 200);
    let tls = tunnel(
        t.s.proxy.addr,
        "accounts.zoho.com",
        &t.ca(),
        &[b"http/1.1"],
        &[],
    )
    .await
    .unwrap();
    let (status, body) = send(tls, get("https://accounts.zoho.com/oauth/user/info")).await;
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));
    // The proxy may refresh its own token meanwhile; what must never reach
    // Accounts is anything the client sent.
    if let Some(form) = t.s.zoho.last_token_form() {
        assert!(
            form.iter()
                .all(|(_, value)| !["x", "y", "z"].contains(&value.as_str())),
            "{form:?}"
        );
    }
}

#[tokio::test]
async fn only_zoho_hosts_on_port_443_are_tunnelled() {
    let t = Transparent::start(|_| {}).await;
    for (target, named) in [
        ("evil.example:443", "evil.example"),
        (
            "desk.zoho.com.evil.example:443",
            "desk.zoho.com.evil.example",
        ),
        ("127.0.0.1:443", "127.0.0.1"),
        // One trailing dot names the same host; two name none.
        ("desk.zoho.com..:443", "desk.zoho.com."),
        ("desk.zoho.com:80", "desk.zoho.com:80"),
        ("desk.zoho.com:8443", "desk.zoho.com:8443"),
    ] {
        let (status, answer, _) = connect(t.s.proxy.addr, target, &[]).await;
        assert_eq!(status, 403, "{target}: {answer}");
        assert!(
            answer.contains("PROXY_FORBIDDEN") && answer.contains(named),
            "{target}: {answer}"
        );
    }
    // Without transparent mode, CONNECT stays refused.
    let plain = Scenario::start().await;
    let (status, answer, _) = connect(plain.proxy.addr, "desk.zoho.com:443", &[]).await;
    assert_eq!(status, 405, "{answer}");
    assert_eq!(t.s.zoho.desk_request_count(), 0);
}

#[tokio::test]
async fn a_client_outside_allow_cidrs_learns_nothing_of_the_hosts_served() {
    let t = Transparent::start(|c| {
        c.access.allow_cidrs = vec!["10.9.9.0/24".parse().unwrap()];
    })
    .await;
    for target in ["desk.zoho.com:443", "evil.example:443"] {
        let (status, answer, _) = connect(t.s.proxy.addr, target, &[]).await;
        assert_eq!(status, 403, "{target}: {answer}");
        assert!(answer.contains("access.allow_cidrs"), "{target}: {answer}");
        assert!(!answer.contains("desk.zoho.com"), "{target}: {answer}");
    }
}

#[tokio::test]
async fn a_connect_s_host_is_parsed_as_strictly_as_any() {
    let t = Transparent::start(|_| {}).await;
    let target = "desk.zoho.com:443";
    for hosts in [
        &[("Host", "u@evil.example")][..],
        &[("Host", "[::1]junk")],
        &[("Host", "evil.example:abc")],
        &[("Host", "desk.zoho.com:443"), ("Host", "evil.example")],
    ] {
        let (status, answer, _) = connect(t.s.proxy.addr, target, hosts).await;
        assert_eq!(status, 400, "{hosts:?}: {answer}");
        assert!(answer.contains("PROXY_BAD_REQUEST"), "{hosts:?}: {answer}");
    }
    // Clients differ on sending one: none is accepted, as the target's name is.
    for version in ["HTTP/1.1", "HTTP/1.0"] {
        let mut stream = TcpStream::connect(t.s.proxy.addr).await.unwrap();
        let head = format!("CONNECT {target} {version}\r\n\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut answer = [0u8; 12];
        tokio::time::timeout(LIMIT, stream.read_exact(&mut answer))
            .await
            .expect("an answer")
            .unwrap();
        assert!(answer.ends_with(b" 200"), "{version}: {answer:?}");
    }
}

#[tokio::test]
async fn a_keyed_proxy_takes_the_key_on_the_connect_as_bearer_or_basic() {
    let t = Transparent::start(|c| {
        c.access.api_keys = vec![Secret::new("k-123456".into())];
    })
    .await;
    let (status, answer, _) = connect(t.s.proxy.addr, "desk.zoho.com:443", &[]).await;
    assert_eq!(status, 401, "{answer}");
    let (status, _, _) = connect(
        t.s.proxy.addr,
        "desk.zoho.com:443",
        &[("Proxy-Authorization", "Basic dXNlcjpub3BlCg==")],
    )
    .await;
    assert_eq!(status, 401, "user:nope is not the key");
    // base64("user:k-123456"), as HTTPS_PROXY=http://user:k-123456@host sends it.
    for auth in ["Basic dXNlcjprLTEyMzQ1Ng==", "Bearer k-123456"] {
        let tls = tunnel(
            t.s.proxy.addr,
            "desk.zoho.com",
            &t.ca(),
            &[b"http/1.1"],
            &[("Proxy-Authorization", auth)],
        )
        .await
        .unwrap();
        assert_eq!(tickets(tls).await, 200, "{auth}");
    }
}

#[tokio::test]
async fn every_name_a_request_in_a_tunnel_gives_must_be_the_tunnel_s_host() {
    let t = Transparent::start(|_| {}).await;
    for alpn in [&b"http/1.1"[..], b"h2"] {
        // (the target or `:authority`, the `Host` header, the status)
        for (uri, host, status) in [
            (
                "https://desk.zoho.com:443/api/v1/tickets",
                "desk.zoho.com",
                200,
            ),
            ("https://evil.example/api/v1/tickets", "desk.zoho.com", 403),
            (
                "https://desk.zoho.com:8080/api/v1/tickets",
                "desk.zoho.com",
                403,
            ),
            (
                "https://accounts.zoho.com/oauth/v2/token",
                "desk.zoho.com",
                403,
            ),
            (
                "https://desk.zoho.com/api/v1/tickets",
                "desk.zoho.com:444",
                403,
            ),
        ] {
            let tls = tunnel(t.s.proxy.addr, "desk.zoho.com", &t.ca(), &[alpn], &[])
                .await
                .unwrap();
            let request = http::Request::get(uri)
                .header("host", host)
                .body(Full::new(Bytes::new()))
                .unwrap();
            let (got, body) = send(tls, request).await;
            assert_eq!(
                got,
                status,
                "{uri} Host {host} over {}: {}",
                String::from_utf8_lossy(alpn),
                String::from_utf8_lossy(&body)
            );
        }
    }
    assert_eq!(t.s.zoho.desk_request_count(), 2, "the two 200s only");
}

#[tokio::test]
async fn plain_http_for_zoho_hosts_is_served_as_in_a_tunnel() {
    let t = Transparent::start(|c| {
        c.access.api_keys = vec![Secret::new("k-123456".into())];
        c.access.deny_paths = vec![
            zoho_desk_proxy::rules::PathRule::parse(
                "/api/v1/secret",
                zoho_desk_proxy::rules::Case::Insensitive,
            )
            .unwrap(),
        ];
    })
    .await;
    let addr = t.s.proxy.addr;
    let plain = |line: &str, host: &str, auth: &str| {
        format!(
            "{line} HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 45\r\nConnection: close\r\n\r\ngrant_type=client_credentials&client_secret=y"
        )
    };
    // base64("user:k-123456"), as HTTP_PROXY=http://user:k-123456@host sends it.
    let key = "Proxy-Authorization: Basic dXNlcjprLTEyMzQ1Ng==\r\n";
    // Desk's requests go to the upstream with the real token, under every rule.
    let answer = raw_request(
        addr,
        &plain(
            "GET http://desk.zoho.com/api/v1/tickets",
            "desk.zoho.com",
            key,
        ),
    )
    .await;
    assert_eq!(raw_status(&answer), 200, "{answer}");
    assert!(answer.contains("ticketNumber"), "{answer}");
    assert_eq!(t.s.zoho.desk_request_count(), 1);
    for (request, status) in [
        (
            plain(
                "GET http://desk.zoho.com/api/v1/tickets",
                "desk.zoho.com",
                "",
            ),
            401,
        ),
        (
            plain(
                "GET http://desk.zoho.com/api/v1/secret",
                "desk.zoho.com",
                key,
            ),
            403,
        ),
        (
            plain(
                "GET http://desk.zoho.com/api/v1/tickets",
                "evil.example",
                key,
            ),
            403,
        ),
        (
            plain(
                "GET http://desk.zoho.com:8080/api/v1/tickets",
                "desk.zoho.com",
                key,
            ),
            403,
        ),
        (
            plain(
                "GET http://desk.zoho.com/_proxy/metrics",
                "desk.zoho.com",
                key,
            ),
            403,
        ),
    ] {
        let answer = raw_request(addr, &request).await;
        assert_eq!(raw_status(&answer), status, "{request}: {answer}");
    }
    assert_eq!(t.s.zoho.desk_request_count(), 1);
    // Accounts' are answered here with the placeholder, never reached.
    let answer = raw_request(
        addr,
        &plain(
            "POST http://accounts.zoho.com/oauth/v2/token",
            "accounts.zoho.com",
            key,
        ),
    )
    .await;
    assert_eq!(raw_status(&answer), 200, "{answer}");
    let token = raw_json(&answer);
    assert!(
        token["access_token"]
            .as_str()
            .is_some_and(|t| t.starts_with("1000.zohodeskproxy")),
        "{answer}"
    );
    if let Some(form) = t.s.zoho.last_token_form() {
        assert!(form.iter().all(|(_, value)| value != "y"), "{form:?}");
    }
    // Without transparent mode, only the upstream's own host is taken in absolute-form.
    let plain_proxy = Scenario::start().await;
    let answer = raw_request(
        plain_proxy.proxy.addr,
        &plain(
            "GET http://desk.zoho.com/api/v1/tickets",
            "desk.zoho.com",
            "",
        ),
    )
    .await;
    assert_eq!(raw_status(&answer), 403, "{answer}");
}

#[tokio::test]
async fn access_rules_apply_inside_the_tunnel() {
    let t = Transparent::start(|c| {
        c.access.allow_methods = Some(vec![http::Method::GET]);
    })
    .await;
    let tls = tunnel(
        t.s.proxy.addr,
        "desk.zoho.com",
        &t.ca(),
        &[b"http/1.1"],
        &[],
    )
    .await
    .unwrap();
    let post = http::Request::post("https://desk.zoho.com/api/v1/tickets")
        .header("host", "desk.zoho.com")
        .body(Full::new(Bytes::from("{}")))
        .unwrap();
    assert_eq!(send(tls, post).await.0, 405);
    let tls = tunnel(
        t.s.proxy.addr,
        "desk.zoho.com",
        &t.ca(),
        &[b"http/1.1"],
        &[],
    )
    .await
    .unwrap();
    assert_eq!(
        send(tls, get("https://desk.zoho.com/api/v1/%2e%2e/secrets"))
            .await
            .0,
        400
    );
    // A request naming another host than its tunnel's.
    let tls = tunnel(
        t.s.proxy.addr,
        "desk.zoho.com",
        &t.ca(),
        &[b"http/1.1"],
        &[],
    )
    .await
    .unwrap();
    let mut other = get("https://desk.zoho.com/api/v1/tickets");
    other
        .headers_mut()
        .insert("host", http::HeaderValue::from_static("accounts.zoho.com"));
    assert_eq!(send(tls, other).await.0, 403);
    assert_eq!(t.s.zoho.desk_request_count(), 0);

    // A CONNECT over HTTP/2 is 405 like any other refused method: its Allow names only
    // what the rules allow.
    let tcp = TcpStream::connect(t.s.proxy.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(connection);
    let connect = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri("desk.zoho.com:443")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let answer = sender.send_request(connect).await.unwrap();
    assert_eq!(answer.status(), 405);
    let allow = answer.headers()["allow"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert_eq!(allow, "get", "{allow}");
}

#[tokio::test]
async fn bad_tls_is_refused_and_other_clients_carry_on() {
    let t = Transparent::start(|c| {
        c.timeouts.header_read = Duration::from_millis(500);
    })
    .await;
    // A client that trusts only another CA.
    let other = tempfile::tempdir().unwrap();
    let mut config = support::config_for(&t.s.fake, &FakeOptions::default());
    config.intercept.ca_dir = other.path().to_owned();
    zoho_desk_proxy::ops::ca_init(&config, None, false).unwrap();
    let result = tunnel(
        t.s.proxy.addr,
        "desk.zoho.com",
        &other.path().join("ca.pem"),
        &[b"http/1.1"],
        &[],
    )
    .await;
    assert!(result.is_err(), "a client with another CA refused the leaf");
    // SNI for another name than the CONNECT's, or none.
    let (status, _, stream) = connect(t.s.proxy.addr, "desk.zoho.com:443", &[]).await;
    assert_eq!(status, 200);
    let evil = ServerName::try_from("evil.example").unwrap();
    assert!(connector(&t.ca(), &[]).connect(evil, stream).await.is_err());
    let (_, _, stream) = connect(t.s.proxy.addr, "desk.zoho.com:443", &[]).await;
    let accounts = ServerName::try_from("accounts.zoho.com").unwrap();
    let mismatched = connector(&t.ca(), &[b"http/1.1"])
        .connect(accounts, stream)
        .await;
    if let Ok(tls) = mismatched {
        // The handshake may finish before the proxy closes the tunnel: nothing is served.
        let io = TokioIo::new(tls);
        let served = async {
            let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await.ok()?;
            tokio::spawn(connection);
            sender
                .send_request(get("https://accounts.zoho.com/oauth/v2/token"))
                .await
                .ok()
        };
        assert!(
            served.await.is_none(),
            "a tunnel whose TLS named another host served"
        );
    }
    let (_, _, stream) = connect(t.s.proxy.addr, "desk.zoho.com:443", &[]).await;
    let ip = ServerName::try_from("127.0.0.1").unwrap();
    assert!(
        connector(&t.ca(), &[]).connect(ip, stream).await.is_err(),
        "no SNI"
    );
    // A tunnel that stalls before its hello is closed after the head's time.
    let (_, _, mut stalled) = connect(t.s.proxy.addr, "desk.zoho.com:443", &[]).await;
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(LIMIT, stalled.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    // A tunnel whose TLS is up but that sends no request is closed after the same time,
    // over HTTP/1.1 and HTTP/2 alike.
    for alpn in [b"http/1.1".as_slice(), b"h2".as_slice()] {
        let mut idle = tunnel(t.s.proxy.addr, "desk.zoho.com", &t.ca(), &[alpn], &[])
            .await
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let closed = tokio::time::timeout(LIMIT, async {
            // HTTP/2: the server's SETTINGS (and at the end its GOAWAY) come first.
            loop {
                match idle.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "an idle tunnel ({}) was kept open",
            String::from_utf8_lossy(alpn)
        );
    }
    // Meanwhile and after, a good client is served.
    let tls = tunnel(t.s.proxy.addr, "desk.zoho.com", &t.ca(), &[b"h2"], &[])
        .await
        .unwrap();
    assert_eq!(tickets(tls).await, 200);
}

#[tokio::test]
async fn the_ca_cannot_vouch_for_any_other_name_nor_an_ip_address() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeZoho::start().await.unwrap();
    let mut config = support::config_for(&fake, &FakeOptions::default());
    config.intercept.ca_dir = dir.path().to_owned();
    zoho_desk_proxy::ops::ca_init(&config, None, false).unwrap();
    // Someone with the CA's key signs a leaf for another site.
    let key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(dir.path().join("ca-key.pem")).unwrap())
            .unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(
        &std::fs::read_to_string(dir.path().join("ca.pem")).unwrap(),
        key,
    )
    .unwrap();
    // A name below an intercepted one is refused too: a DNS constraint alone would permit
    // it.
    for name in [
        "evil.example",
        "127.0.0.1",
        "evil.desk.zoho.com",
        "a.b.accounts.zoho.com",
        "desk.zoho.com",
        "accounts.zoho.com",
    ] {
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
        params.use_authority_key_identifier_extension = true;
        let leaf = params.signed_by(&leaf_key, &issuer).unwrap();
        let server_config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
            )
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
        tokio::spawn(async move {
            if let Ok((stream, _)) = listener.accept().await {
                let _ = acceptor.accept(stream).await;
            }
        });
        let stream = TcpStream::connect(addr).await.unwrap();
        let result = connector(&dir.path().join("ca.pem"), &[])
            .connect(ServerName::try_from(name.to_owned()).unwrap(), stream)
            .await;
        match name {
            "desk.zoho.com" | "accounts.zoho.com" => {
                assert!(result.is_ok(), "an intercepted name: {result:?}")
            }
            _ => {
                let err = result
                    .expect_err("the name constraints refuse it")
                    .to_string();
                assert!(err.to_lowercase().contains("name"), "{name}: {err}");
            }
        }
    }
}

#[tokio::test]
async fn ca_init_keeps_the_key_private_and_never_overwrites_by_accident() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let run = |args: &[&str]| {
        let mut cmd = command(dir.path());
        cmd.args(args);
        cmd.output()
    };
    let out = run(&["ca", "init", "--dir", ca.to_str().unwrap()])
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("desk.zoho.com") && stdout.contains("accounts.zoho.com"),
        "{stdout}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |f: &str| std::fs::metadata(ca.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("ca-key.pem"), 0o600);
        assert_eq!(mode("ca.pem"), 0o644);
    }
    let before = std::fs::read(ca.join("ca.pem")).unwrap();
    let out = run(&["ca", "init", "--dir", ca.to_str().unwrap()])
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "refused without --force: a usage error"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    assert_eq!(std::fs::read(ca.join("ca.pem")).unwrap(), before);
    let out = run(&["ca", "init", "--dir", ca.to_str().unwrap(), "--force"])
        .await
        .unwrap();
    assert!(out.status.success());
    assert_ne!(std::fs::read(ca.join("ca.pem")).unwrap(), before);

    // `env` names the CA and the proxy, and never prints a key. It binds nothing; the
    // address it prints is one this test holds (port 0, read back).
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = held.local_addr().unwrap();
    std::fs::write(
        dir.path().join("proxy.toml"),
        format!(
            "listen = \"{listen}\"\n[intercept]\nca_dir = \"{}\"\n[access]\napi_keys = [\"k-secret-key\"]\n",
            ca.display()
        ),
    )
    .unwrap();
    let out = run(&["env"]).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        format!("export HTTPS_PROXY=\"http://proxy:${{ZOHO_PROXY_KEY}}@{listen}\"").as_str(),
        "export SSL_CERT_FILE=",
        "export REQUESTS_CA_BUNDLE=",
        "export CURL_CA_BUNDLE=",
        "export NODE_EXTRA_CA_CERTS=",
    ] {
        assert!(stdout.contains(line), "{line} missing in\n{stdout}");
    }
    assert!(!stdout.contains("k-secret-key"), "{stdout}");
}

#[tokio::test]
async fn curl_with_https_proxy_reaches_desk_through_the_binary() {
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("curl is not installed: skipping the curl client of transparent mode");
        return;
    }
    let fake = FakeZoho::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let config = write_config(
        dir.path(),
        &fake,
        true,
        "",
        &format!(
            "[intercept]\nenabled = true\nca_dir = \"{}\"",
            ca_dir.display()
        ),
    );
    let init = command(dir.path())
        .args(["ca", "init", "--config"])
        .arg(&config)
        .output()
        .await
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let (serving, mut lines) =
        serve_logged(dir.path(), &config, "127.0.0.1:0", &[("RUST_LOG", "trace")]).await;
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "--proxy"])
        .arg(format!("http://{}", serving.addr))
        .arg("--cacert")
        .arg(ca_dir.join("ca.pem"))
        .arg("https://desk.zoho.com/api/v1/tickets?limit=1")
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .output()
        .await
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["data"].as_array().unwrap().len(), 1, "{body}");
    sigterm(&serving.child);
    let _ = serving.child.wait_with_output().await;
    // Nothing secret in the whole log of the session, at trace level.
    let options = FakeOptions::default();
    let mut log = String::new();
    while let Ok(line) = lines.try_recv() {
        log.push_str(&line);
        log.push('\n');
    }
    for secret in [&options.client_secret, &options.refresh_token] {
        assert!(!log.contains(secret.as_str()), "a secret in the log");
    }
    for token in fake.control().issued_tokens() {
        assert!(!log.contains(&token), "an access token in the log");
    }
    assert!(log.contains("tunnel accepted"), "{log}");
}
