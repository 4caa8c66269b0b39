//! The request path: `handle()` reads as a request's life — method, target, reserved
//! endpoints, access rules, body, token, send, 401 retry, response. Transparent mode's
//! ways in are in `intercepted.rs`, the attempts at Desk in `desk.rs`.

use std::net::SocketAddr;
use std::sync::Arc;

use http::request::Parts;
use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::Semaphore;

use crate::access::AccessPolicy;
use crate::admin;
use crate::body::{BodyError, Captured, RequestBody, ResponseBody, StreamReason, UpstreamBody};
use crate::budget::{ByteBudget, Limit, MAX_H2_HEAD_BYTES, MAX_HEADERS, Reservation};
use crate::concurrency::DeskSlots;
use crate::config::Config;
use crate::error::ProxyError;
use crate::headers;
use crate::intercept::{self, Intercept};
use crate::metrics::Metrics;
use crate::observe::{Lifecycle, RequestId, RequestLog};
use crate::pool::Pool;
use crate::record::{BodyHasher, Lookup, Recorder, Recording, Replay, RequestBodySeen};
use crate::target::{self, Target};
use crate::token::TokenCache;
use crate::token::shared::StoreStatus;

mod desk;
mod desk_answer;
mod intercepted;

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
        // A rule's refusal, with the rule (its message never echoes a query or a secret).
        if matches!(
            err,
            ProxyError::Forbidden(_)
                | ProxyError::Unauthorized(_)
                | ProxyError::MethodNotAllowed { .. }
                | ProxyError::BadRequest(_)
                | ProxyError::HeadersTooLarge(_)
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
        if !headers::transfer_coding_is_chunked(req.headers()) {
            return Err(ProxyError::BadRequest(
                "the request's Transfer-Encoding names a coding other than chunked, which the proxy cannot pass on; send the body chunked, with its own coding in Content-Encoding".into(),
            ));
        }
        if let Some(to) = self.intercepted(&req, peer, via)? {
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
            let recording =
                recording.answered(response.status(), response.headers(), self.current_token());
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
                self.current_token(),
            )
        })
    }

    /// The access token now, for a recording to mask.
    fn current_token(&self) -> Option<Arc<crate::token::Token>> {
        self.tokens.current()
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
                self.note_rate_limit(&answer.headers);
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
            Lookup::Miss {
                request,
                closest,
                cut,
            } => {
                let closest = match closest {
                    _ if cut => "the recording has it, with its body cut at record.max_body_bytes (no body can match one cut): record it again with a larger record.max_body_bytes".to_owned(),
                    // The same line: only the body differs (bodies are compared byte
                    // for byte: a JSON body with its keys in another order is another).
                    Some(closest) if closest == request => format!(
                        "the recording has {closest} with another body (bodies must match byte for byte)"
                    ),
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
}
