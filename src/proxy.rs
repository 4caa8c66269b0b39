//! The request path: `handle()` reads as a request's life — method, target, reserved
//! endpoints, access rules, body, token, send, 401 retry, response.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, HeaderName, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio::time::error::Elapsed;

use crate::access::AccessPolicy;
use crate::admin;
use crate::body::{
    BodyError, BodyOutcome, Captured, DeskBody, RequestBody, ResponseBody, StreamReason,
    UpstreamBody,
};
use crate::budget::{ByteBudget, Limit, MAX_H2_HEAD_BYTES, MAX_HEADERS, Reservation};
use crate::concurrency::{DeskSlots, HeldCall, UpstreamSlot};
use crate::config::Config;
use crate::error::ProxyError;
use crate::headers;
use crate::intercept::{self, Intercept};
use crate::metrics::{Metrics, UpstreamErrorKind};
use crate::observe::{Lifecycle, RequestId, RequestLog};
use crate::pool::{Pool, SendError, Sent};
use crate::record::{BodyHasher, Lookup, Recorder, Recording, Replay, RequestBodySeen};
use crate::target::{self, Target};
use crate::token::shared::StoreStatus;
use crate::token::{Token, TokenCache, TokenError};

/// The client's answer on its way up the request path, boxed: a response with its body's
/// state is about 490 bytes, and each level of the path (the exchange, forward, route,
/// handle, the service) would otherwise copy it again (README "Performance").
pub type ClientResponse = Box<Response<ResponseBody>>;

/// Marks an answer after which the client's connection is closed (its request's body was
/// left unread, so nothing after it can be trusted to start a request).
#[derive(Debug, Clone, Copy)]
pub struct CloseConnection;

/// How a request reached the proxy.
#[derive(Debug, Clone)]
pub enum Via {
    /// Sent to the proxy itself (reverse mode).
    Direct,
    /// Inside a tunnel of transparent mode, to `host` (lower case), which is `service`.
    Tunnel {
        /// The host the client's CONNECT and TLS named.
        host: Arc<str>,
        /// What that host is.
        service: intercept::Service,
    },
}

/// A host transparent mode serves, as a request came for it: inside a tunnel (port 443),
/// or as a plain `http://` request (its scheme's port).
#[derive(Clone, Copy)]
struct Intercepted<'a> {
    /// The host, lower case.
    host: &'a str,
    /// The port the request's names may give.
    port: u16,
    /// What that host is.
    service: intercept::Service,
}

/// Carried by the 200 to an accepted `CONNECT` (an answer's extensions must be `Clone`, so
/// the tunnel is in a shared cell the serving layer takes it from).
#[derive(Clone)]
pub struct TunnelRequest(Arc<std::sync::Mutex<Option<Tunnel>>>);

impl TunnelRequest {
    /// The tunnel, once (later calls get `None`).
    pub fn take(&self) -> Option<Tunnel> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

/// What the serving layer needs to run a tunnel once the 200 to its `CONNECT` is sent.
pub struct Tunnel {
    /// The connection, once hyper hands it over.
    pub upgrade: hyper::upgrade::OnUpgrade,
    /// The host the client asked for (lower case).
    pub host: Arc<str>,
    /// What that host is.
    pub service: intercept::Service,
    /// The TLS configuration that ends the tunnel.
    pub tls: Arc<rustls::ServerConfig>,
}

/// The largest Desk 401 body read to find its `errorCode` (real ones are ~100 bytes).
const MAX_401_BODY: usize = 64 * 1024;

/// A serving thread's way to Desk: its own connection pool, so that a request and its
/// upstream connection are driven by the same thread, and its share of
/// `limits.max_upstream_requests`.
pub struct Upstream {
    pool: Arc<Pool<UpstreamBody>>,
    slots: Arc<Semaphore>,
}

/// Everything a request needs, shared by all connections and serving threads.
pub struct Proxy {
    pub(crate) config: Config,
    pub(crate) tokens: Arc<TokenCache>,
    pub(crate) access: AccessPolicy,
    pub(crate) lifecycle: Arc<Lifecycle>,
    pub(crate) metrics: Arc<Metrics>,
    /// Open client connections, bounded by `limits.max_connections`.
    pub(crate) connections: Arc<std::sync::atomic::AtomicUsize>,
    /// Request-head bytes of HTTP/2 requests in progress, bounded by [`MAX_H2_HEAD_BYTES`]
    /// (one count for the process: one connection's 256 streams cannot fill it).
    h2_heads: Arc<ByteBudget>,
    /// Request-body bytes held for 401 retries, bounded by `limits.buffered_body_bytes`.
    pub(crate) buffered: Arc<ByteBudget>,
    /// The shared token store's health, when there is one.
    pub(crate) store: Option<Arc<StoreStatus>>,
    /// Transparent mode, when enabled.
    pub(crate) intercept: Option<Arc<Intercept>>,
    /// Desk's concurrent calls (`desk.max_concurrent`), shared by the serving threads.
    pub(crate) desk: Arc<DeskSlots>,
    /// Where Desk's traffic is recorded (`serve --record`).
    recorder: Option<Arc<Recorder>>,
    /// The recording answers are taken from instead of Desk (`serve --replay`).
    pub(crate) replay: Option<Arc<Replay>>,
}

impl Proxy {
    /// Builds the proxy around its token cache.
    pub fn new(config: Config, tokens: Arc<TokenCache>, metrics: Arc<Metrics>) -> Self {
        let access = AccessPolicy::new(&config.access, config.listen);
        let buffered = ByteBudget::new(config.buffered_body_bytes);
        let h2_heads = ByteBudget::new(MAX_H2_HEAD_BYTES);
        let desk = Arc::new(DeskSlots::local(
            config.desk.max_concurrent,
            config.max_upstream_requests,
            &metrics,
        ));
        Self {
            desk,
            recorder: None,
            replay: None,
            config,
            tokens,
            access,
            lifecycle: Arc::default(),
            metrics,
            connections: Arc::default(),
            buffered,
            h2_heads,
            store: None,
            intercept: None,
        }
    }

    /// Reports the shared token store's health in `/_proxy/ready`.
    pub fn with_store_status(mut self, store: Option<Arc<StoreStatus>>) -> Self {
        self.store = store;
        self
    }

    /// Counts Desk's concurrent calls with `desk` (the fleet's, with a `token_store`).
    pub fn with_desk_slots(mut self, desk: Arc<DeskSlots>) -> Self {
        self.desk = desk;
        self
    }

    /// Records Desk's traffic with `recorder`.
    pub fn with_recorder(mut self, recorder: Option<Arc<Recorder>>) -> Self {
        self.recorder = recorder;
        self
    }

    /// Answers from `replay` instead of Desk.
    pub fn with_replay(mut self, replay: Option<Arc<Replay>>) -> Self {
        self.replay = replay;
        self
    }

    /// Ends `CONNECT` tunnels to Zoho's hosts (transparent mode).
    pub fn with_intercept(mut self, intercept: Option<Arc<Intercept>>) -> Self {
        self.intercept = intercept;
        self
    }

    /// What the proxy's own endpoints report from.
    fn status(&self) -> admin::Status<'_> {
        admin::Status {
            lifecycle: &self.lifecycle,
            tokens: &self.tokens,
            metrics: &self.metrics,
            buffered: &self.buffered,
            store: self.store.as_deref(),
            desk: &self.desk,
            replay: self.replay.as_deref(),
        }
    }

    /// The lifecycle shared with the server (draining, in flight).
    pub fn lifecycle(&self) -> &Arc<Lifecycle> {
        &self.lifecycle
    }

    /// The way to Desk of serving thread `index` of `workers`.
    pub fn upstream(&self, index: usize, workers: usize) -> Upstream {
        let share = upstream_share(self.config.max_upstream_requests, index, workers);
        let connector =
            crate::client::connector(self.config.timeouts.connect, &self.config.extra_roots);
        Upstream {
            pool: Pool::new(
                connector,
                &self.config.upstream,
                share,
                self.config.timeouts.idle,
            ),
            slots: Arc::new(Semaphore::new(share)),
        }
    }

    /// Starts a request's record (its id, and its log line when it ends). Called as soon
    /// as the request arrives, so that a request whose client leaves before it is ever
    /// looked at is still logged (status 499).
    pub fn start_log<B>(&self, req: &Request<B>) -> RequestLog {
        RequestLog::new(
            RequestId::of_request(req.headers()),
            req.method().clone(),
            // A clone of the URI shares its bytes: no allocation for the log's path.
            req.uri().clone(),
            self.lifecycle.enter(),
            Arc::clone(&self.metrics),
        )
    }

    /// Answers one request, sending it to Desk through `upstream`; never fails (errors
    /// become Zoho-shaped answers). The request comes boxed and the log lent: an async
    /// fn keeps what it is given for as long as it runs, in the future of every request,
    /// so what is passed down the request path is kept small. [`Proxy::logged`] hands
    /// the log to the answer's body.
    pub async fn handle(
        &self,
        upstream: &Upstream,
        req: Box<Request<Incoming>>,
        peer: SocketAddr,
        log: &mut RequestLog,
        via: &Via,
    ) -> ClientResponse {
        let mut response = match self.route(upstream, req, peer, log, via).await {
            Ok(response) => response,
            Err(err) => self.refusal(err, log),
        };
        log.set_status(response.status().as_u16());
        response
            .headers_mut()
            .insert(headers::REQUEST_ID.clone(), log.id().header_value());
        response
    }

    /// The answer of [`Proxy::handle`], its log written when its body ends.
    pub fn logged(mut response: ClientResponse, log: RequestLog) -> ClientResponse {
        response.body_mut().log_to(log);
        response
    }

    /// Counts an HTTP/2 request's head against [`MAX_H2_HEAD_BYTES`] until the
    /// reservation drops; past it, 503.
    fn hold_h2_head<B>(&self, req: &Request<B>) -> Result<Reservation, ProxyError> {
        let uri = req.uri();
        let target = uri.path_and_query().map_or(0, |p| p.as_str().len())
            + uri.authority().map_or(0, |a| a.as_str().len());
        let fields: usize = req
            .headers()
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 32)
            .sum();
        self.h2_heads
            .reserve((target + fields) as u64)
            .ok_or_else(|| {
                self.metrics.record_limit(Limit::H2Heads);
                tracing::debug!(
                    budget = Limit::H2Heads.key(),
                    held = self.h2_heads.held(),
                    "request refused: the HTTP/2 requests in progress hold the most request-head bytes allowed"
                );
                ProxyError::Overloaded(format!(
                    "the proxy holds as many HTTP/2 request heads as it allows ({} MiB); retry shortly",
                    MAX_H2_HEAD_BYTES >> 20
                ))
            })
    }

    /// The answer for a request the proxy refused or could not forward.
    fn refusal(&self, err: ProxyError, log: &mut RequestLog) -> ClientResponse {
        log.set_error_code(err.code());
        if matches!(
            err,
            ProxyError::Forbidden(_)
                | ProxyError::Unauthorized(_)
                | ProxyError::MethodNotAllowed { .. }
        ) {
            tracing::warn!(request_id = %log.id(), error_code = err.code(), rule = %err, "request refused");
        }
        let mut response = err.to_response();
        if err.closes_connection() {
            response.extensions_mut().insert(CloseConnection);
        }
        Box::new(response)
    }

    async fn route(
        &self,
        upstream: &Upstream,
        req: Box<Request<Incoming>>,
        peer: SocketAddr,
        log: &mut RequestLog,
        via: &Via,
    ) -> Result<ClientResponse, ProxyError> {
        if req.method() == http::Method::CONNECT
            && matches!(via, Via::Direct)
            && let Some(intercept) = &self.intercept
        {
            return self.connect(intercept, *req, peer).map(Box::new);
        }
        // Held until the request is answered (its head is gone by then). The proxy's own
        // endpoints answer at once, and stay reachable when the budget is full.
        let _head = match req.version() {
            http::Version::HTTP_2 if !admin::is_local(req.uri().path()) => {
                Some(self.hold_h2_head(&req)?)
            }
            _ => None,
        };
        self.access.check_method_is_forwardable(req.method())?;
        if req.headers().len() > MAX_HEADERS {
            self.metrics.record_limit(Limit::Headers);
            return Err(ProxyError::HeadersTooLarge(format!(
                "the request has more than {MAX_HEADERS} header fields"
            )));
        }
        target::check_host_syntax(req.uri(), req.version(), req.headers())?;
        if let Via::Tunnel { host, service } = via {
            let to = Intercepted {
                host,
                port: 443,
                service: *service,
            };
            return Box::pin(self.tunneled(upstream, req, peer, log, to)).await;
        }
        if let Some((host, port, service)) = self.intercepted(&req) {
            // A plain `http://` request for a host transparent mode serves, sent to the
            // proxy as to an HTTP proxy: served as inside a tunnel to that host, with the
            // checks of the `CONNECT` it did not make.
            self.access.check_connect(&req, peer)?;
            let to = Intercepted {
                host: &host,
                port,
                service,
            };
            return Box::pin(self.tunneled(upstream, req, peer, log, to)).await;
        }
        let target = target::resolve(req.uri(), req.version(), &self.config.upstream)?;
        if let Some(name) = admin::reserved_name(target.path()) {
            let endpoint = admin::Endpoint::parse(name)?;
            if endpoint.is_public() {
                self.access.check_peer(peer)?;
            } else {
                self.access.check_private(&req, peer)?;
            }
            return admin::answer(&self.status(), endpoint, &req).map(Box::new);
        }
        self.access.check(&req, peer, &target)?;
        self.forward(upstream, req, &target, log).await
    }

    /// Accepts a `CONNECT` to an intercepted Zoho host on port 443 (403 naming the host
    /// for any other: this is no open tunnel), under the access rules, with the client's
    /// key as `Proxy-Authorization`. The 200 carries the tunnel for the serving layer.
    fn connect(
        &self,
        intercept: &Intercept,
        mut req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        // Python's http.client still says HTTP/1.0 on its CONNECT.
        if !matches!(req.version(), Version::HTTP_11 | Version::HTTP_10) {
            return Err(self
                .access
                .method_not_allowed("intercept: CONNECT is taken over HTTP/1.x only".into()));
        }
        let authority = req
            .uri()
            .authority()
            .cloned()
            .ok_or_else(|| ProxyError::BadRequest("CONNECT needs a host:port target".into()))?;
        let host = target::host_name(authority.as_str())?.to_ascii_lowercase();
        let intercepted = || intercept.hosts().join(", ");
        let Some(service) = intercept.service(&host) else {
            return Err(ProxyError::Forbidden(format!(
                "intercept: CONNECT to {host} refused: this proxy tunnels only to {} (it is not an open proxy)",
                intercepted()
            )));
        };
        if authority.port_u16() != Some(443) {
            return Err(ProxyError::Forbidden(format!(
                "intercept: CONNECT to {} refused: only port 443 of {} is tunnelled",
                authority.as_str(),
                intercepted()
            )));
        }
        self.access.check_connect(&req, peer)?;
        let upgrade = hyper::upgrade::on(&mut req);
        tracing::info!(%peer, %host, "intercept: tunnel accepted");
        let mut response = Response::new(ResponseBody::full(Bytes::new()));
        response
            .extensions_mut()
            .insert(TunnelRequest(Arc::new(std::sync::Mutex::new(Some(
                Tunnel {
                    upgrade,
                    host: host.into(),
                    service,
                    tls: Arc::clone(&intercept.tls),
                },
            )))));
        Ok(response)
    }

    /// The host, port and service of an absolute-form HTTP/1 request, on its scheme's
    /// default port, for a host transparent mode serves.
    fn intercepted<B>(&self, req: &Request<B>) -> Option<(String, u16, intercept::Service)> {
        let intercept = self.intercept.as_ref()?;
        let uri = req.uri();
        let authority = uri
            .authority()
            .filter(|_| req.version() != Version::HTTP_2)?;
        let default_port = match uri.scheme_str()? {
            "http" => 80,
            "https" => 443,
            _ => return None,
        };
        if authority
            .port_u16()
            .is_some_and(|port| port != default_port)
        {
            return None;
        }
        let host = target::host_name(authority.as_str()).ok()?;
        let service = intercept.service(host)?;
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        Some((host, default_port, service))
    }

    /// A request inside a tunnel: it must name the tunnel's host; Accounts' requests are
    /// answered here, Desk's go through the access rules (the client's key was checked on
    /// the CONNECT) and are forwarded as any other.
    async fn tunneled(
        &self,
        upstream: &Upstream,
        req: Box<Request<Incoming>>,
        peer: SocketAddr,
        log: &mut RequestLog,
        to: Intercepted<'_>,
    ) -> Result<ClientResponse, ProxyError> {
        let Intercepted {
            host,
            port,
            service,
        } = to;
        // Every name the request gives (`Host`, the target's or `:authority`'s) must be
        // the host it came for, on that port or none.
        let names = req
            .headers()
            .get_all(http::header::HOST)
            .iter()
            .map(|h| h.to_str().unwrap_or(""))
            .chain(req.uri().authority().map(|a| a.as_str()));
        for named in names {
            let name = target::host_name(named)?;
            let port_ok = named
                .rsplit_once(':')
                .filter(|(_, p)| !p.ends_with(']'))
                .is_none_or(|(_, p)| p.parse::<u16>().is_ok_and(|p| p == port));
            if !name.trim_end_matches('.').eq_ignore_ascii_case(host) || !port_ok {
                return Err(ProxyError::Forbidden(format!(
                    "intercept: a request for {host} names another host ({})",
                    named.chars().take(64).collect::<String>()
                )));
            }
        }
        let target = target::resolve(req.uri(), Version::HTTP_2, &self.config.upstream)?;
        if admin::reserved_name(target.path()).is_some() {
            return Err(ProxyError::Forbidden(format!(
                "intercept: {} is the proxy's own, not {host}'s",
                admin::PREFIX
            )));
        }
        match service {
            intercept::Service::Accounts => {
                self.access.check_peer(peer)?;
                let api_domain = self.intercept.as_ref().map_or("", |i| i.api_domain());
                let Some((status, body)) =
                    intercept::accounts::answer(req.method(), target.path(), api_domain)
                else {
                    return Err(ProxyError::Forbidden(format!(
                        "intercept: {host} is answered here for token requests only (POST /oauth/v2/token, /oauth/v2/token/revoke)"
                    )));
                };
                // The form (client id, secret, grant) is read and dropped: it is never
                // needed, and never forwarded.
                let _ = Limited::new(req.into_body(), MAX_401_BODY).collect().await;
                let mut text = body.to_string();
                text.push('\n');
                let mut response = Response::new(ResponseBody::full(Bytes::from(text)));
                *response.status_mut() = status;
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json;charset=UTF-8"),
                );
                Ok(Box::new(response))
            }
            intercept::Service::Desk => {
                self.access.check_tunneled(&req, peer, &target)?;
                self.forward(upstream, req, &target, log).await
            }
        }
    }

    /// Sends the request to Desk with a usable token. On a 429, retries once after Desk's
    /// `Retry-After` when the request is idempotent and its body can be replayed; on a
    /// 401 that says the token is bad, retries once (with a token newer than the rejected
    /// one) when the body can be replayed.
    async fn forward(
        &self,
        upstream: &Upstream,
        req: Box<Request<Incoming>>,
        target: &Target,
        log: &mut RequestLog,
    ) -> Result<ClientResponse, ProxyError> {
        let (mut parts, body) = (*req).into_parts();
        // What is moved into the exchange lives in this block only, so that the request's
        // future does not keep a second copy of it while Desk answers.
        let (exchange, recording) = {
            let mut body = self.read_body(body, log).await?;
            if let Some(replay) = &self.replay {
                return Box::pin(self.replayed(replay, &parts, body, target, log)).await;
            }
            let uri = self.upstream_uri(target)?;
            headers::prepare_request(&mut parts.headers, self.config.org_id.as_ref());
            parts
                .headers
                .insert(headers::REQUEST_ID.clone(), log.id().header_value());
            let recording = self.recording(&parts, &uri, &mut body, log);
            let exchange = self.exchange(upstream, &mut parts, body, uri, target, log);
            (exchange, recording)
        };
        let mut response = exchange.await?;
        if let Some(recording) = recording {
            let recording = recording.answered(response.status(), response.headers());
            response.body_mut().tap(recording);
        }
        Ok(response)
    }

    /// The start of a recording of this exchange, when recording (`serve --record`).
    fn recording(
        &self,
        parts: &Parts,
        uri: &Uri,
        body: &mut RequestBody,
        log: &RequestLog,
    ) -> Option<Box<Recording>> {
        self.recorder.as_ref().and_then(|recorder| {
            let seen = match body {
                RequestBody::Replayable(bytes, _) if bytes.is_empty() => RequestBodySeen::Empty,
                RequestBody::Replayable(bytes, _) => RequestBodySeen::Whole(bytes.clone()),
                RequestBody::Streaming(client) => {
                    let captured = Arc::new(Captured::new(recorder.max_body()));
                    client.capture_into(Arc::clone(&captured));
                    RequestBodySeen::Streamed(captured)
                }
            };
            recorder.start(
                &parts.method,
                uri,
                &parts.headers,
                &log.id().to_string(),
                seen,
            )
        })
    }

    /// The answer from the recording being replayed.
    async fn replayed(
        &self,
        replay: &Replay,
        parts: &Parts,
        body: RequestBody,
        target: &Target,
        log: &mut RequestLog,
    ) -> Result<ClientResponse, ProxyError> {
        // The body is matched by its digest, hashed as it arrives: nothing is held.
        let body = if Replay::matches_body(&parts.method) {
            let mut hasher = BodyHasher::default();
            match body {
                RequestBody::Replayable(bytes, _) => hasher.update(&bytes),
                RequestBody::Streaming(mut client) => {
                    while let Some(frame) = client.frame().await {
                        match frame {
                            Ok(frame) => {
                                if let Some(data) = frame.data_ref() {
                                    hasher.update(data);
                                }
                            }
                            Err(err) => {
                                return Err(self.body_failed(matches!(err, BodyError::Stalled(_))));
                            }
                        }
                    }
                }
            }
            Some(hasher.finish())
        } else {
            None
        };
        match replay.lookup(&parts.method, target.path_and_query.as_str(), body) {
            Lookup::Hit(answer) => {
                // Desk's credits and 429s as the recording has them, as when serving.
                if let Some(remaining) = rate_limit_remaining(&answer.headers) {
                    self.metrics.set_desk_rate_limit_remaining(remaining);
                }
                if answer.status == StatusCode::TOO_MANY_REQUESTS {
                    self.metrics.record_desk_429();
                }
                if answer.truncated {
                    tracing::warn!(request_id = %log.id(), method = %parts.method, path = %target.path(), "replay: the recorded answer is incomplete (over record.max_body_bytes, or cut off); what was recorded is sent");
                }
                let mut response = Response::new(ResponseBody::full(answer.body.clone()));
                *response.status_mut() = answer.status;
                *response.headers_mut() = answer.headers.clone();
                if answer.truncated {
                    response.headers_mut().insert(
                        http::HeaderName::from_static("x-proxy-replay-truncated"),
                        http::HeaderValue::from_static("true"),
                    );
                }
                Ok(Box::new(response))
            }
            Lookup::Miss { request, closest } => {
                let closest = match closest {
                    Some(closest) => format!("the closest recorded request is {closest}"),
                    None => "the recording has no requests".to_owned(),
                };
                Err(self.replay_miss(
                    replay,
                    parts,
                    target,
                    &format!("no recorded answer for {request}; {closest}"),
                ))
            }
        }
    }

    /// A request the replay has no answer for: counted, noted for the list at exit
    /// (method and path only: queries are never logged), and answered 404.
    fn replay_miss(
        &self,
        replay: &Replay,
        parts: &Parts,
        target: &Target,
        why: &str,
    ) -> ProxyError {
        self.metrics.record_replay_miss();
        replay.note_miss(format!("{} {}", parts.method, target.path()));
        tracing::warn!(method = %parts.method, path = %target.path(), file = %replay.path().display(), "replay: no recorded answer");
        ProxyError::ReplayMiss(format!("replay of {}: {why}", replay.path().display()))
    }

    /// One attempt at Desk: sent with a token, and its answer read.
    async fn attempt(
        &self,
        upstream: &Upstream,
        attempt: Attempt,
        log: &mut RequestLog,
    ) -> Result<(Answer, Arc<Token>), ProxyError> {
        let (response, slot, token) = self.send(upstream, attempt, log).await?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok((self.answer(response, slot), token));
        }
        // Boxed: reading a 401 is rare, and every request waiting for a slot would
        // otherwise hold room for it.
        let answer = Box::pin(self.unauthorized(response, slot, &token)).await?;
        Ok((answer, token))
    }

    /// The request's attempts at Desk: the first, a retry after a 429 and one after a
    /// 401 that said the token was bad, each when allowed.
    async fn exchange(
        &self,
        upstream: &Upstream,
        parts: &mut Parts,
        body: RequestBody,
        uri: Uri,
        target: &Target,
        log: &mut RequestLog,
    ) -> Result<ClientResponse, ProxyError> {
        let (upstream_body, outcome, replay) = body.into_parts();
        // The first attempt takes the request's own headers and a retry the copy: a
        // copy is allocated to its exact size and would grow again to take the token,
        // where the map hyper built has room to spare (README "Performance").
        let first_headers = if replay.is_some() {
            let copy = parts.headers.clone();
            std::mem::replace(&mut parts.headers, copy)
        } else {
            std::mem::take(&mut parts.headers)
        };
        let first = Attempt::new(
            &parts.method,
            first_headers,
            uri,
            (upstream_body, outcome),
            Want::Usable,
        );
        let (mut answer, mut token) = self.attempt(upstream, first, log).await?;
        // Once retried after a 429, the request's answer is due within its response time
        // counted from its arrival, a retry after a 401 included.
        let mut due = None;
        if let Answer::Throttled(response, wait) = answer {
            // Desk's concurrency or rate limit: once, when the request can be sent again
            // unchanged and Desk's wait fits in the time the request has.
            let by = Instant::from_std(log.arrived()) + self.config.timeouts.response;
            let again = replay
                .as_ref()
                .filter(|_| is_idempotent(&parts.method) && Instant::now() + wait < by);
            let Some(replay) = again else {
                return Ok(response);
            };
            drop(response);
            let retry = Attempt::new(
                &parts.method,
                parts.headers.clone(),
                self.upstream_uri(target)?,
                (UpstreamBody::buffered(replay.bytes.clone()), None),
                Want::Usable,
            )
            .retry(Retry::After429);
            due = Some(by);
            // The rare paths are boxed: the request's future does not carry their size.
            (answer, token) = Box::pin(async {
                tokio::time::sleep(wait).await;
                self.attempt(upstream, retry.due(due), log).await
            })
            .await?;
        }
        let desk_401 = match answer {
            Answer::Pass(response) | Answer::Throttled(response, _) => return Ok(response),
            Answer::TokenRejected(desk_401) => desk_401,
        };
        // Without a replayable body Desk's 401 goes back; the refresh happens anyway, for
        // the requests after it.
        let Some(replay) = replay else {
            return Ok(desk_401);
        };
        let retry = Attempt::new(
            &parts.method,
            std::mem::take(&mut parts.headers),
            self.upstream_uri(target)?,
            (UpstreamBody::buffered(replay.bytes.clone()), None),
            Want::NewerThan(token.generation),
        )
        .retry(Retry::After401)
        .due(due);
        // A second 401 goes to the client as Desk sent it (its token marked rejected too).
        match Box::pin(self.attempt(upstream, retry, log)).await?.0 {
            Answer::Pass(response)
            | Answer::TokenRejected(response)
            | Answer::Throttled(response, _) => Ok(response),
        }
    }

    /// Desk's answer, other than a 401, for the client. A 429 is counted, with the wait
    /// Desk asks for.
    fn answer(&self, response: Response<DeskBody>, slot: UpstreamSlot) -> Answer {
        self.note_rate_limit(&response);
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            self.metrics.record_desk_429();
            let wait = retry_after(response.headers()).unwrap_or(DEFAULT_RETRY_AFTER);
            return Answer::Throttled(into_client_response(response, slot), wait);
        }
        Answer::Pass(into_client_response(response, slot))
    }

    /// Desk's remaining credits, when its answer tells them.
    fn note_rate_limit(&self, response: &Response<DeskBody>) {
        if let Some(remaining) = rate_limit_remaining(response.headers()) {
            self.metrics.set_desk_rate_limit_remaining(remaining);
        }
    }

    /// Desk's 401 for the client. One that says the token itself is bad is read whole,
    /// and the token marked rejected before the upstream slot is freed, so that the
    /// request taking the slot never sends it.
    async fn unauthorized(
        &self,
        response: Response<DeskBody>,
        slot: UpstreamSlot,
        token: &Token,
    ) -> Result<Answer, ProxyError> {
        self.note_rate_limit(&response);
        let (parts, body) = response.into_parts();
        let desk_401 = Limited::new(body, MAX_401_BODY)
            .collect()
            .await
            .map_err(|_| {
                ProxyError::UpstreamUnreachable("Zoho Desk's 401 answer could not be read".into())
            })?
            .to_bytes();
        if !token_is_invalid(&desk_401) {
            // SCOPE_MISMATCH and friends: the token is fine, the answer is the client's.
            return Ok(Answer::Pass(rebuild(parts, desk_401)));
        }
        self.tokens.mark_rejected(token);
        drop(slot);
        Ok(Answer::TokenRejected(rebuild(parts, desk_401)))
    }

    /// Reads the client's body whole when it can be replayed after a 401 and the
    /// process-wide budget has room; otherwise it streams.
    async fn read_body(&self, body: Incoming, log: &RequestLog) -> Result<RequestBody, ProxyError> {
        let read = RequestBody::read(
            body,
            self.config.timeouts.body_read,
            self.config.replay_body_bytes,
            &self.buffered,
        )
        .await;
        match read {
            Ok((body, reason)) => {
                if reason == Some(StreamReason::Budget) {
                    self.metrics.record_limit(Limit::BufferedBodyBytes);
                    tracing::info!(
                        request_id = %log.id(),
                        budget = Limit::BufferedBodyBytes.key(),
                        held = self.buffered.held(),
                        "request body streams without a 401 retry: the budget for held bodies is spent"
                    );
                }
                Ok(body)
            }
            Err(err) => Err(self.body_failed(matches!(err, BodyError::Stalled(_)))),
        }
    }

    /// The answer for a client body that stalled or broke.
    fn body_failed(&self, stalled: bool) -> ProxyError {
        if stalled {
            self.metrics.record_limit(Limit::BodyRead);
            ProxyError::RequestTimeout(format!(
                "the request body stalled: nothing arrived for {} s (timeouts.body_read_secs); nothing more was sent to Zoho Desk",
                self.config.timeouts.body_read.as_secs_f64()
            ))
        } else {
            ProxyError::BrokenBody(
                "the request body could not be read (broken chunked framing, or the client ended it early)".into(),
            )
        }
    }

    /// Desk's URL for the target (built again for a retry rather than kept: retries are
    /// rare, requests are not).
    fn upstream_uri(&self, target: &Target) -> Result<Uri, ProxyError> {
        self.config
            .upstream
            .join_pq(target.path_and_query.clone())
            .map_err(|_| ProxyError::BadRequest("the request target cannot be forwarded".into()))
    }

    /// Sends one request to Desk once a slot is free, with the token chosen at that
    /// moment; the slot is held until the response body is done. The wait for a slot and
    /// Desk's answer count against `timeouts.response_secs`; the wait for a token has its
    /// own bound (an Accounts call) and does not. A failure caused by the client's
    /// streamed body is the client's error, not Desk's.
    async fn send(
        &self,
        upstream: &Upstream,
        attempt: Attempt,
        log: &mut RequestLog,
    ) -> Result<(Response<DeskBody>, UpstreamSlot, Arc<Token>), ProxyError> {
        // The attempt's request is boxed (see `Attempt`): an async fn keeps its arguments
        // for its whole life, and every request waiting for a slot holds this future at
        // its largest.
        let started = Instant::now();
        let timeout = self.config.timeouts.response;
        let due = attempt
            .due
            .map_or(started + timeout, |due| due.min(started + timeout));
        // The clock is read again only after a wait (for a slot, for a token): about
        // 23 ns a read, and the request's path used to read it 17 times (README
        // "Performance"). Desk's call first (shared by the serving threads, in arrival
        // order), then the serving thread's own slot: at once when both are free (no
        // timer is made), else in line within the response's time.
        let (slot, free) = match self.slot_now(upstream) {
            Some(slot) => (Ok(Ok(slot)), started),
            None => {
                let slot = tokio::time::timeout_at(due, async {
                    let desk = self.desk.acquire().await;
                    let _waiting = self.desk.waiting_for_thread();
                    let worker = Arc::clone(&upstream.slots).acquire_owned().await;
                    worker.map(|worker| UpstreamSlot::new(desk, worker))
                })
                .await;
                (slot, Instant::now())
            }
        };
        let answered = match slot {
            // The semaphore is never closed.
            Ok(Ok(slot)) => {
                // Chosen now, not when the request was queued: a token Desk rejected while
                // it waited is never sent.
                let (token, sent) = match attempt.token {
                    Want::Usable => match self.tokens.usable_at(free) {
                        Some(token) => (Ok(token), free),
                        None => (self.tokens.usable().await, Instant::now()),
                    },
                    Want::NewerThan(generation) => {
                        (self.tokens.refresh_after(generation).await, Instant::now())
                    }
                };
                let token = token.map_err(token_error)?;
                // A retry is one once it goes out (not when a token or the client failed
                // it before).
                match attempt.retry {
                    Some(Retry::After401) => log.set_retried(),
                    Some(Retry::After429) => log.set_retried_after_429(),
                    None => {}
                }
                let (request, outcome) = attempt.into_request(&token);
                // Desk's latency, in the log, starts once a slot and a token are in hand;
                // the wait for a token does not count against the response's time.
                let deadline = due + (sent - free);
                // A call Desk still works on when its client leaves or its deadline
                // passes keeps its slot (Desk still counts it) until Desk answers: for
                // twice the response time from when it was sent, and at least the
                // response time more (after a long upload).
                let wait = Wait {
                    deadline,
                    response: timeout,
                    body: outcome.as_deref(),
                    held_until: sent + 2 * timeout,
                };
                let response = call_desk(upstream, request, wait, slot).await;
                if response.is_err()
                    && let Some(outcome) = &outcome
                {
                    // The client gets a 504: the rest of a streamed body stays here.
                    outcome.abandon();
                }
                log.set_upstream_latency(sent.elapsed());
                response.map(|(response, slot)| (slot, token, response, outcome))
            }
            Ok(Err(_closed)) => {
                return Err(ProxyError::UpstreamUnreachable(
                    "the proxy is shutting down".into(),
                ));
            }
            // Never sent: Desk took no time (the log has no `upstream_ms`).
            Err(elapsed) => Err(elapsed),
        };
        let err = match answered {
            // No request asks for one (`Upgrade` is never forwarded), and the client
            // would be left on a connection switched to nothing.
            Ok((_, _, Ok(response), _)) if response.status() == StatusCode::SWITCHING_PROTOCOLS => {
                ProxyError::UpstreamUnreachable(
                    "Zoho Desk answered 101 Switching Protocols, and the proxy forwards no protocol upgrade".into(),
                )
            }
            Ok((slot, token, Ok(response), _)) => return Ok((response, slot, token)),
            Ok((_, _, Err(_), outcome))
                if let Some(stalled) = outcome.as_deref().and_then(BodyOutcome::stalled) =>
            {
                // Desk never had the whole request: the client's body was at fault.
                return Err(self.body_failed(stalled));
            }
            Ok((_, _, Err(err), _)) if err.is_connect_timeout() => {
                ProxyError::UpstreamTimeout(format!(
                    "Zoho Desk could not be connected to within {} s (timeouts.connect_secs)",
                    self.config.timeouts.connect.as_secs_f64()
                ))
            }
            Ok((_, _, Err(err), _)) => {
                ProxyError::UpstreamUnreachable(format!("Zoho Desk could not be reached: {err}"))
            }
            Err(_) => ProxyError::UpstreamTimeout(format!(
                "Zoho Desk did not answer within {} s (timeouts.response_secs)",
                timeout.as_secs_f64()
            )),
        };
        self.metrics.record_upstream_error(match err {
            ProxyError::UpstreamTimeout(_) => UpstreamErrorKind::Timeout,
            _ => UpstreamErrorKind::Unreachable,
        });
        Err(err)
    }

    /// A place at Desk free at once: one of Desk's calls and one of the serving thread's
    /// slots, neither taken from anyone in line.
    fn slot_now(&self, upstream: &Upstream) -> Option<UpstreamSlot> {
        let desk = self.desk.try_acquire()?;
        let worker = Arc::clone(&upstream.slots).try_acquire_owned().ok()?;
        Some(UpstreamSlot::new(desk, worker))
    }
}

/// One attempt at Desk: its request, without the token yet (boxed once, as the pool
/// takes it: the futures that carry it keep 8 bytes for it, not the request's size),
/// what its body will tell of its end, and which token it needs.
struct Attempt {
    request: Box<Request<UpstreamBody>>,
    outcome: Option<Arc<BodyOutcome>>,
    token: Want,
    /// When Desk's answer must have begun by, if sooner than `timeouts.response_secs`
    /// from the attempt's start (a retry after a 429 has what is left of the request's).
    due: Option<Instant>,
    /// Which retry this is, if one.
    retry: Option<Retry>,
}

/// A retry of a request, logged (a 401's also counted) once it is sent.
#[derive(Debug, Clone, Copy)]
enum Retry {
    /// With a newer token, after Desk's 401.
    After401,
    /// After Desk's 429 and the wait it asked for.
    After429,
}

impl Attempt {
    /// An attempt at `uri` with the client's method, these headers and this body (and
    /// what a streamed one will tell of its end).
    fn new(
        method: &http::Method,
        headers: HeaderMap,
        uri: Uri,
        (body, outcome): (UpstreamBody, Option<Arc<BodyOutcome>>),
        token: Want,
    ) -> Self {
        let mut request = Box::new(Request::new(body));
        *request.method_mut() = method.clone();
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        Self {
            request,
            outcome,
            token,
            due: None,
            retry: None,
        }
    }

    /// The attempt, its answer due by `due` at the latest (when given).
    fn due(self, due: Option<Instant>) -> Self {
        Self { due, ..self }
    }

    /// The attempt as this retry.
    fn retry(self, retry: Retry) -> Self {
        Self {
            retry: Some(retry),
            ..self
        }
    }

    /// The request for Desk, with `token`, and what its body will tell of its end.
    fn into_request(self, token: &Token) -> (Box<Request<UpstreamBody>>, Option<Arc<BodyOutcome>>) {
        let Attempt {
            mut request,
            outcome,
            ..
        } = self;
        request
            .headers_mut()
            .insert(http::header::AUTHORIZATION, token.header.clone());
        (request, outcome)
    }
}

/// How long an attempt waits for Desk's answer.
struct Wait<'a> {
    /// When the answer must have begun by.
    deadline: Instant,
    /// `timeouts.response_secs`.
    response: Duration,
    /// A streamed body's progress: while it moves, Desk is not late. Its answer is then
    /// due `response` after the last 64 KiB of it went out (see [`BodyOutcome`]).
    body: Option<&'a BodyOutcome>,
    /// How long a call left behind is held (see [`HeldCall`]): until then, and at least
    /// `response` more.
    held_until: Instant,
}

/// Desk's call with `slot`: a connection first (given up, nothing sent, if the client
/// leaves meanwhile), then the request on it, held until Desk is done with it even if
/// the client leaves or the wait ends ([`HeldCall`], for a time: see [`Wait`]). A
/// waiting connection that had closed as it was taken gets the request again on a new
/// one. One timer bounds the wait for the answer; a streamed body that still moved when
/// it fired moves it on.
async fn call_desk(
    upstream: &Upstream,
    request: Box<Request<UpstreamBody>>,
    wait: Wait<'_>,
    slot: UpstreamSlot,
) -> Result<(Result<Response<DeskBody>, SendError>, UpstreamSlot), Elapsed> {
    let held = (wait.held_until, wait.response);
    let call = async move {
        let (mut request, mut slot, mut fresh) = (request, slot, false);
        loop {
            let ready = match upstream.pool.connection(fresh).await {
                Ok(ready) => ready,
                Err(err) => return (Err(err), slot),
            };
            let pool = Arc::clone(&upstream.pool);
            let call = HeldCall::new(async move { pool.send(ready, request).await }, held, slot);
            match call.await {
                (Sent::Answered(answered), held) => return (answered, held),
                (Sent::Unsent(unsent), held) => {
                    request = unsent;
                    slot = held;
                    fresh = true;
                }
            }
        }
    };
    let mut call = std::pin::pin!(call);
    let mut deadline = wait.deadline;
    loop {
        match tokio::time::timeout_at(deadline, call.as_mut()).await {
            Ok(answered) => return Ok(answered),
            Err(elapsed) => {
                let moved_on = wait.body.map(|body| body.last_moved() + wait.response);
                match moved_on.filter(|later| *later > Instant::now()) {
                    Some(later) => deadline = later,
                    None => return Err(elapsed),
                }
            }
        }
    }
}

/// The token an attempt is sent with, chosen once its upstream slot is free.
#[derive(Debug, Clone, Copy)]
enum Want {
    /// The current token, while it is usable.
    Usable,
    /// A usable token newer than this generation (Desk rejected it).
    NewerThan(u64),
}

/// Desk's answer to one attempt.
enum Answer {
    /// For the client as it is.
    Pass(ClientResponse),
    /// A 401 saying the token is bad (read whole; the token marked rejected).
    TokenRejected(ClientResponse),
    /// A 429, for the client as it is unless retried after the wait Desk asks for.
    Throttled(ClientResponse, Duration),
}

/// The wait after a 429 that says nothing of one.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Methods a 429 may be retried for: sending them twice does no more than once.
fn is_idempotent(method: &http::Method) -> bool {
    use http::Method;
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::PUT,
        Method::DELETE,
    ]
    .contains(method)
}

/// The wait a `Retry-After` asks for: seconds, or an HTTP date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// The remaining value of Desk's rate limit, when its answer carries one
/// (`X-Rate-Limit-Remaining-v3`, or `X-Rate-Limit-Remaining`).
fn rate_limit_remaining(headers: &HeaderMap) -> Option<i64> {
    // Ready names: a lookup by `&str` would parse the name on every answer.
    static NAMES: [HeaderName; 2] = [
        HeaderName::from_static("x-rate-limit-remaining-v3"),
        HeaderName::from_static("x-rate-limit-remaining"),
    ];
    NAMES
        .iter()
        .find_map(|name| headers.get(name))
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.trim().parse().ok())
}

/// Whether a Desk 401 body says the token itself is bad (`INVALID_OAUTH`, or no
/// `errorCode` at all), as opposed to a valid token lacking rights.
pub fn token_is_invalid(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct DeskError {
        #[serde(rename = "errorCode")]
        error_code: Option<String>,
    }
    match serde_json::from_slice::<DeskError>(body) {
        Ok(DeskError {
            error_code: Some(code),
        }) => code == "INVALID_OAUTH",
        _ => true,
    }
}

/// Serving thread `index`'s part of `limits.max_upstream_requests`: the limit split as
/// evenly as it goes, so the parts add up to it (there are never more threads than slots:
/// [`Config::worker_threads`]). Requests beyond a part wait for a slot rather than open
/// more connections; as many stay pooled. A slot is never borrowed from another thread:
/// a waiter woken on the other thread costs more than it saves (README "Performance").
fn upstream_share(limit: usize, index: usize, workers: usize) -> usize {
    let workers = workers.max(1);
    (limit / workers + usize::from(index < limit % workers)).max(1)
}

fn into_client_response(response: Response<DeskBody>, slot: UpstreamSlot) -> ClientResponse {
    let (mut parts, body) = response.into_parts();
    headers::prepare_response(&mut parts.headers);
    Box::new(Response::from_parts(
        parts,
        ResponseBody::stream(body, slot),
    ))
}

fn rebuild(mut parts: http::response::Parts, body: Bytes) -> ClientResponse {
    headers::prepare_response(&mut parts.headers);
    Box::new(Response::from_parts(parts, ResponseBody::full(body)))
}

fn token_error(err: TokenError) -> ProxyError {
    match err {
        TokenError::Unavailable {
            reason,
            retry_after,
        } => ProxyError::TokenUnavailable {
            message: format!("no valid Zoho access token: {reason}"),
            retry_after,
        },
        TokenError::Rejected(reason) => ProxyError::AuthRejected(format!(
            "Zoho Accounts rejected the proxy's credentials; an operator must act: {reason}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_upstream_limit_is_split_into_even_parts_that_add_up_to_it() {
        for (limit, workers, parts) in [
            (64, 2, vec![32, 32]),
            (3, 2, vec![2, 1]),
            (10, 4, vec![3, 3, 2, 2]),
        ] {
            let got: Vec<usize> = (0..workers)
                .map(|i| upstream_share(limit, i, workers))
                .collect();
            assert_eq!(got, parts, "{limit} over {workers}");
        }
    }

    #[test]
    fn desks_remaining_credits_are_read_from_the_v3_header_first() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.append(*name, http::HeaderValue::from_static(value));
            }
            map
        };
        let v3 = "x-rate-limit-remaining-v3";
        let v2 = "x-rate-limit-remaining";
        assert_eq!(rate_limit_remaining(&headers(&[])), None);
        assert_eq!(rate_limit_remaining(&headers(&[(v2, "7")])), Some(7));
        assert_eq!(
            rate_limit_remaining(&headers(&[(v2, "7"), (v3, "9")])),
            Some(9)
        );
        assert_eq!(
            rate_limit_remaining(&headers(&[(v3, " 9 "), (v2, "7")])),
            Some(9)
        );
        assert_eq!(
            rate_limit_remaining(&headers(&[(v3, "9"), (v3, "1")])),
            Some(9)
        );
        assert_eq!(rate_limit_remaining(&headers(&[(v3, "many")])), None);
    }

    #[test]
    fn which_401s_cost_a_refresh() {
        let table: &[(&str, bool)] = &[
            (
                r#"{"errorCode":"INVALID_OAUTH","message":"The OAuth Token you provided is invalid."}"#,
                true,
            ),
            ("", true),
            ("<html>Unauthorized</html>", true),
            (r#"{"message":"no code"}"#, true),
            (r#"{"errorCode":"SCOPE_MISMATCH","message":"…"}"#, false),
            (r#"{"errorCode":"OAUTH_ORG_MISMATCH","message":"…"}"#, false),
            (r#"{"errorCode":"UNAUTHORIZED","message":"…"}"#, false),
        ];
        for (body, refresh) in table {
            assert_eq!(token_is_invalid(body.as_bytes()), *refresh, "{body}");
        }
    }
}
