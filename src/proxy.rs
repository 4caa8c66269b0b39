//! The request path: `handle()` reads as a request's life — method, target, reserved
//! endpoints, access rules, body, token, send, 401 retry, response.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::access::AccessPolicy;
use crate::body::{BodyError, BodyOutcome, RequestBody, ResponseBody, StreamReason, UpstreamBody};
use crate::budget::{ByteBudget, Limit, MAX_HEADERS};
use crate::client::{Connector, describe_client_error};
use crate::config::Config;
use crate::error::ProxyError;
use crate::headers;
use crate::metrics::{Metrics, UpstreamErrorKind};
use crate::observe::{Lifecycle, RequestId, RequestLog};
use crate::target::{self, Target};
use crate::token::shared::StoreStatus;
use crate::token::{Token, TokenCache, TokenError};

/// Marks an answer after which the client's connection is closed (its request's body was
/// left unread, so nothing after it can be trusted to start a request).
#[derive(Debug, Clone, Copy)]
pub struct CloseConnection;

/// The largest Desk 401 body read to find its `errorCode` (real ones are ~100 bytes).
const MAX_401_BODY: usize = 64 * 1024;

/// A serving thread's way to Desk: its own connection pool, so that a request and its
/// upstream connection are driven by the same thread, and its share of
/// `limits.max_upstream_requests`.
pub struct Upstream {
    client: Client<Connector, UpstreamBody>,
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
    /// Request-body bytes held for 401 retries, bounded by `limits.buffered_body_bytes`.
    pub(crate) buffered: Arc<ByteBudget>,
    /// The shared token store's health, when there is one.
    pub(crate) store: Option<Arc<StoreStatus>>,
}

impl Proxy {
    /// Builds the proxy around its token cache.
    pub fn new(config: Config, tokens: Arc<TokenCache>, metrics: Arc<Metrics>) -> Self {
        let access = AccessPolicy::new(&config);
        let buffered = ByteBudget::new(config.buffered_body_bytes);
        Self {
            config,
            tokens,
            access,
            lifecycle: Arc::default(),
            metrics,
            connections: Arc::default(),
            buffered,
            store: None,
        }
    }

    /// Reports the shared token store's health in `/_proxy/ready`.
    pub fn with_store_status(mut self, store: Option<Arc<StoreStatus>>) -> Self {
        self.store = store;
        self
    }

    /// The lifecycle shared with the server (draining, in flight).
    pub fn lifecycle(&self) -> &Arc<Lifecycle> {
        &self.lifecycle
    }

    /// The way to Desk of serving thread `index` of `workers`.
    pub fn upstream(&self, index: usize, workers: usize) -> Upstream {
        let share = upstream_share(self.config.max_upstream_requests, index, workers);
        Upstream {
            client: crate::client::build(
                self.config.timeouts.connect,
                self.config.timeouts.idle,
                share,
                &self.config.extra_roots,
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
    /// become Zoho-shaped answers).
    pub async fn handle(
        &self,
        upstream: &Upstream,
        req: Request<Incoming>,
        peer: SocketAddr,
        mut log: RequestLog,
    ) -> Response<ResponseBody> {
        let mut response = match self.route(upstream, req, peer, &mut log).await {
            Ok(response) => response,
            Err(err) => self.refusal(err, &mut log),
        };
        log.set_status(response.status().as_u16());
        response
            .headers_mut()
            .insert(headers::REQUEST_ID.clone(), log.id().header_value());
        let (parts, body) = response.into_parts();
        Response::from_parts(parts, body.with_log(log))
    }

    /// The answer for a request the proxy refused or could not forward.
    fn refusal(&self, err: ProxyError, log: &mut RequestLog) -> Response<ResponseBody> {
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
        response
    }

    async fn route(
        &self,
        upstream: &Upstream,
        req: Request<Incoming>,
        peer: SocketAddr,
        log: &mut RequestLog,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        self.access.check_method_is_forwardable(req.method())?;
        if req.headers().len() > MAX_HEADERS {
            self.metrics.record_limit(Limit::Headers);
            return Err(ProxyError::HeadersTooLarge(format!(
                "the request has more than {MAX_HEADERS} header fields"
            )));
        }
        target::check_host_syntax(req.uri(), req.headers())?;
        let target = target::resolve(req.uri(), req.version(), &self.config.upstream)?;
        if let Some(endpoint) = target.path().strip_prefix(crate::admin::PREFIX) {
            self.access.check_admin(&req, peer, endpoint)?;
            return crate::admin::answer(self, &req, endpoint);
        }
        self.access.check(&req, peer, &target)?;
        self.forward(upstream, req, &target, log).await
    }

    /// Sends the request to Desk with a valid token; on a 401 that says the token is bad,
    /// refreshes once (shared with every request that saw the same token fail) and retries
    /// when the body can be replayed.
    async fn forward(
        &self,
        upstream: &Upstream,
        req: Request<Incoming>,
        target: &Target,
        log: &mut RequestLog,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let (mut parts, body) = req.into_parts();
        let uri = self.upstream_uri(target)?;
        let body = self.read_body(body, log).await?;
        let token = self.tokens.usable().await.map_err(token_error)?;
        headers::prepare_request(
            &mut parts.headers,
            &token.header,
            self.config.org_id.as_ref(),
        );
        parts
            .headers
            .insert(headers::REQUEST_ID.clone(), log.id().header_value());

        let (upstream_body, outcome, replay) = body.into_parts();
        let first_headers = if replay.is_some() {
            parts.headers.clone()
        } else {
            std::mem::take(&mut parts.headers)
        };
        let (response, slot) = self
            .send(
                upstream,
                &parts,
                first_headers,
                uri,
                (upstream_body, outcome),
                log,
            )
            .await?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(into_client_response(response, slot));
        }

        let (resp_parts, resp_body) = response.into_parts();
        let desk_401 = Limited::new(resp_body, MAX_401_BODY)
            .collect()
            .await
            .map_err(|_| {
                ProxyError::UpstreamUnreachable("Zoho Desk's 401 answer could not be read".into())
            })?
            .to_bytes();
        drop(slot);
        if !token_is_invalid(&desk_401) {
            // SCOPE_MISMATCH and friends: the token is fine, the answer is the client's.
            return Ok(rebuild(resp_parts, desk_401));
        }
        // Requests arriving from now on wait for the new token instead of using this one.
        self.tokens.mark_rejected(token.generation);
        let Some(replay) = replay else {
            self.refresh_in_background(&token);
            return Ok(rebuild(resp_parts, desk_401));
        };
        let fresh = self
            .tokens
            .refresh_after(token.generation)
            .await
            .map_err(token_error)?;
        parts
            .headers
            .insert(http::header::AUTHORIZATION, fresh.header.clone());
        log.set_retried();
        let headers = std::mem::take(&mut parts.headers);
        let (response, slot) = self
            .send(
                upstream,
                &parts,
                headers,
                self.upstream_uri(target)?,
                (UpstreamBody::buffered(replay.bytes.clone()), None),
                log,
            )
            .await?;
        Ok(into_client_response(response, slot))
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

    /// Sends one request to Desk once a slot is free (waiting counts against
    /// `timeouts.response_secs`); the slot is held until the response body is done. A
    /// failure caused by the client's streamed body (`outcome`) is the client's error,
    /// not Desk's.
    async fn send(
        &self,
        upstream: &Upstream,
        parts: &Parts,
        headers: HeaderMap,
        uri: Uri,
        (body, outcome): (UpstreamBody, Option<Arc<BodyOutcome>>),
        log: &mut RequestLog,
    ) -> Result<(Response<Incoming>, UpstreamSlot), ProxyError> {
        let mut request = Request::new(body);
        *request.method_mut() = parts.method.clone();
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        // The pool speaks HTTP/2 or HTTP/1.1 as ALPN decided; an inbound h2 request must
        // not ask for h2 on an HTTP/1 connection.
        *request.version_mut() = Version::HTTP_11;

        let started = Instant::now();
        let timeout = self.config.timeouts.response;
        let result = tokio::time::timeout(timeout, async {
            let slot = Arc::clone(&upstream.slots).acquire_owned().await;
            // Desk's latency, in the log, starts once a slot is free.
            let sent = Instant::now();
            let response = upstream.client.request(request).await;
            log.set_upstream_latency(sent.elapsed());
            (slot, response)
        })
        .await;
        if result.is_err() {
            log.set_upstream_latency(started.elapsed());
        }
        let result = match result {
            // The semaphore is never closed.
            Ok((Err(_closed), _)) => Err(ProxyError::UpstreamUnreachable(
                "the proxy is shutting down".into(),
            )),
            Ok((Ok(slot), Ok(response))) => Ok((response, slot)),
            Ok((_, Err(_)))
                if let Some(stalled) = outcome.as_deref().and_then(BodyOutcome::stalled) =>
            {
                // Desk never had the whole request: the client's body was at fault.
                return Err(self.body_failed(stalled));
            }
            Ok((_, Err(err))) if is_connect_timeout(&err) => {
                Err(ProxyError::UpstreamTimeout(format!(
                    "Zoho Desk could not be connected to within {} s (timeouts.connect_secs)",
                    self.config.timeouts.connect.as_secs_f64()
                )))
            }
            Ok((_, Err(err))) => Err(ProxyError::UpstreamUnreachable(format!(
                "Zoho Desk could not be reached: {}",
                describe_client_error(&err)
            ))),
            Err(_) => Err(ProxyError::UpstreamTimeout(format!(
                "Zoho Desk did not answer within {} s (timeouts.response_secs)",
                timeout.as_secs_f64()
            ))),
        };
        match &result {
            Err(ProxyError::UpstreamTimeout(_)) => self
                .metrics
                .record_upstream_error(UpstreamErrorKind::Timeout),
            Err(_) => self
                .metrics
                .record_upstream_error(UpstreamErrorKind::Unreachable),
            Ok(_) => {}
        }
        result
    }

    /// A non-replayable request got Desk's 401: it goes back as is, and the token is still
    /// renewed for the requests after it. The refresh runs in its own task.
    fn refresh_in_background(&self, failed: &Token) {
        let tokens = Arc::clone(&self.tokens);
        let generation = failed.generation;
        tokio::spawn(async move {
            let _ = tokens.refresh_after(generation).await;
        });
    }
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
/// more connections; as many stay pooled. A slot is never borrowed from another thread: a
/// process-wide semaphore measured 0.68–0.74× nginx at 1000 connections against
/// 1.03–1.16× with parts, waking waiters across threads.
fn upstream_share(limit: usize, index: usize, workers: usize) -> usize {
    let workers = workers.max(1);
    (limit / workers + usize::from(index < limit % workers)).max(1)
}

/// One of a worker's `limits.max_upstream_requests` slots.
type UpstreamSlot = OwnedSemaphorePermit;

fn into_client_response(
    response: Response<Incoming>,
    slot: UpstreamSlot,
) -> Response<ResponseBody> {
    let (mut parts, body) = response.into_parts();
    headers::prepare_response(&mut parts.headers);
    Response::from_parts(parts, ResponseBody::stream(body, slot))
}

fn rebuild(mut parts: http::response::Parts, body: Bytes) -> Response<ResponseBody> {
    headers::prepare_response(&mut parts.headers);
    Response::from_parts(parts, ResponseBody::full(body))
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

fn is_connect_timeout(err: &hyper_util::client::legacy::Error) -> bool {
    let text = describe_client_error(err);
    err.is_connect() && (text.contains("timed out") || text.contains("timeout"))
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
