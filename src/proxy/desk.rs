//! The attempts at Desk: a slot in Desk's line and the serving thread's, a token, the
//! call held until Desk is done with it, and what Desk's answer asks of the request (a
//! retry after a 429, or after a 401 with a newer token).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Limited};
use tokio::time::Instant;
use tokio::time::error::Elapsed;

use super::desk_answer::{
    DEFAULT_RETRY_AFTER, is_idempotent, rate_limit_remaining, retry_after, token_is_invalid,
};
use super::{ClientResponse, MAX_401_BODY, Proxy, Upstream};
use crate::body::{BodyOutcome, DeskBody, RequestBody, ResponseBody, UpstreamBody};
use crate::concurrency::{HeldCall, UpstreamSlot};
use crate::error::ProxyError;
use crate::headers;
use crate::metrics::UpstreamErrorKind;
use crate::observe::RequestLog;
use crate::pool::{SendError, Sent};
use crate::target::Target;
use crate::token::{Token, TokenError};

impl Proxy {
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
    /// 401 that said the token was bad, each when allowed, at most once, in either order.
    pub(super) async fn exchange(
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
        let mut retried_after_401 = false;
        loop {
            answer = match answer {
                Answer::Pass(response) => return Ok(response),
                Answer::Throttled(response, wait) => {
                    // Desk's concurrency or rate limit: once, when the request can be sent
                    // again unchanged and Desk's wait fits in the time the request has.
                    let by = Instant::from_std(log.arrived()) + self.config.timeouts.response;
                    let again = replay.as_ref().filter(|_| {
                        due.is_none()
                            && is_idempotent(&parts.method, &parts.headers)
                            && Instant::now() + wait < by
                    });
                    let Some(replay) = again else {
                        return Ok(response);
                    };
                    drop(response);
                    let retry =
                        self.again(parts, target, &replay.bytes, Want::Usable, Retry::After429)?;
                    due = Some(by);
                    // The rare paths are boxed: the request's future does not carry their
                    // size.
                    let retried;
                    (retried, token) = Box::pin(async {
                        tokio::time::sleep(wait).await;
                        self.attempt(upstream, retry.due(due), log).await
                    })
                    .await?;
                    retried
                }
                Answer::TokenRejected(desk_401) => {
                    // Without a replayable body Desk's 401 goes back; the refresh happens
                    // anyway, for the requests after it. A second 401 goes to the client
                    // as Desk sent it (its token marked rejected too).
                    let Some(replay) = replay.as_ref().filter(|_| !retried_after_401) else {
                        return Ok(desk_401);
                    };
                    retried_after_401 = true;
                    let newer = Want::NewerThan(token.generation);
                    let retry = self
                        .again(parts, target, &replay.bytes, newer, Retry::After401)?
                        .due(due);
                    let retried;
                    (retried, token) = Box::pin(self.attempt(upstream, retry, log)).await?;
                    retried
                }
            };
        }
    }

    /// The request sent again as a `retry`, its body from the replay buffer, with the
    /// `token` it needs. Its URI is made again (rarely needed: not kept for every request).
    fn again(
        &self,
        parts: &Parts,
        target: &Target,
        body: &Bytes,
        token: Want,
        retry: Retry,
    ) -> Result<Attempt, ProxyError> {
        let attempt = Attempt::new(
            &parts.method,
            parts.headers.clone(),
            self.upstream_uri(target)?,
            (UpstreamBody::buffered(body.clone()), None),
            token,
        );
        Ok(attempt.retry(retry))
    }

    /// Desk's answer, other than a 401, for the client. A 429 is counted, with the wait
    /// Desk asks for.
    fn answer(&self, response: Response<DeskBody>, slot: UpstreamSlot) -> Answer {
        self.note_rate_limit(response.headers());
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            self.metrics.record_desk_429();
            let wait = retry_after(response.headers()).unwrap_or(DEFAULT_RETRY_AFTER);
            let answer = into_client_response(response, slot, self.config.timeouts.response);
            return Answer::Throttled(answer, wait);
        }
        Answer::Pass(into_client_response(
            response,
            slot,
            self.config.timeouts.response,
        ))
    }

    /// Desk's remaining credits, when its answer's headers tell them (a recorded
    /// answer's too).
    pub(super) fn note_rate_limit(&self, headers: &HeaderMap) {
        if let Some(remaining) = rate_limit_remaining(headers) {
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
        self.note_rate_limit(response.headers());
        let (parts, body) = response.into_parts();
        // Its body is part of the answer the client waits for: Desk has the response's
        // time to send it, once more.
        let timeout = self.config.timeouts.response;
        let read = tokio::time::timeout(timeout, Limited::new(body, MAX_401_BODY).collect());
        // What the client gets when the request is not sent again.
        let for_client = match read.await {
            Ok(Ok(body)) => {
                let desk_401 = body.to_bytes();
                let readable = parts
                    .headers
                    .get(http::header::CONTENT_ENCODING)
                    .and_then(|encoding| encoding.to_str().ok())
                    .and_then(|encoding| crate::body::decoded(encoding, &desk_401, MAX_401_BODY));
                if !token_is_invalid(readable.as_deref().unwrap_or(&desk_401)) {
                    // SCOPE_MISMATCH and friends: the token is fine, the answer is the
                    // client's.
                    return Ok(Answer::Pass(rebuild(parts, desk_401)));
                }
                rebuild(parts, desk_401)
            }
            Ok(Err(err)) if err.is::<http_body_util::LengthLimitError>() => {
                self.metrics.record_upstream_error(UpstreamErrorKind::Body);
                // Desk's own 401s are a few hundred bytes: a larger one has no errorCode
                // the proxy can read, so it says the token failed (a refresh, and a
                // retry when the request can be sent again); it is not held whole to be
                // passed on, so a client with no retry gets a 502 that says so.
                let err = ProxyError::UpstreamUnreachable(format!(
                    "Zoho Desk answered 401 with a body larger than {} KiB, more than any error of Zoho Desk; the token was renewed, and the request could not be sent again",
                    MAX_401_BODY / 1024
                ));
                Box::new(err.to_response())
            }
            Ok(Err(err)) => {
                self.metrics.record_upstream_error(UpstreamErrorKind::Body);
                return Err(ProxyError::UpstreamUnreachable(format!(
                    "Zoho Desk's 401 answer broke off: {}",
                    crate::client::innermost(err.as_ref())
                )));
            }
            Err(_) => {
                self.metrics
                    .record_upstream_error(UpstreamErrorKind::Timeout);
                return Err(ProxyError::UpstreamTimeout(format!(
                    "Zoho Desk did not send its 401 answer's body within {} s (timeouts.response_secs)",
                    timeout.as_secs_f64()
                )));
            }
        };
        self.tokens.mark_rejected(token);
        drop(slot);
        Ok(Answer::TokenRejected(for_client))
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
        let due_from_arrival = attempt.due.is_some();
        // The clock is read again only after a wait (for a slot, for a token): about
        // 23 ns a read, and the request's path used to read it 17 times (README
        // "Performance"). Desk's call first (shared by the serving threads, in arrival
        // order), then the serving thread's own slot: at once when both are free (no
        // timer is made), else in line within the response's time.
        let (slot, free) = match self.slot_now(upstream) {
            Some(slot) => (Ok(Ok(slot)), started),
            None => {
                let mut had_desk_call = false;
                let slot = tokio::time::timeout_at(due, async {
                    let desk = self.desk.acquire().await;
                    had_desk_call = true;
                    let _waiting = self.desk.waiting_for_thread();
                    let worker = Arc::clone(&upstream.slots).acquire_owned().await;
                    worker.map(|worker| UpstreamSlot::new(desk, worker))
                })
                .await;
                let slot = slot.map_err(|_| {
                    let limit = if had_desk_call {
                        "this serving thread's share of limits.max_upstream_requests".to_string()
                    } else {
                        format!("desk.max_concurrent, {}", self.desk.limit())
                    };
                    // A retry after a 429 had what was left of its request's time.
                    ProxyError::UpstreamTimeout(format!(
                        "no call to Zoho Desk came free within {} s (timeouts.response_secs, from the request's arrival for a retry): the calls allowed at once ({limit}) were all busy, and the request was never sent",
                        due.saturating_duration_since(started).as_secs_f64()
                    ))
                });
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
                // the wait for a token does not count against the response's time. Once
                // sent, Desk has its whole response time, whatever the wait in line took:
                // a request Desk will answer in time is never given up for that wait (its
                // client would see a 504 for work Desk did). A retry after a 429 keeps
                // the time of its request, counted from the arrival.
                let deadline = if due_from_arrival {
                    due + (sent - free)
                } else {
                    sent + timeout
                };
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
            Err(in_line) => {
                self.metrics
                    .record_upstream_error(UpstreamErrorKind::Timeout);
                return Err(in_line);
            }
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

/// Desk's answer for the client, streamed; Desk has `timeouts.response_secs` for each
/// part of it the client waits for.
fn into_client_response(
    response: Response<DeskBody>,
    slot: UpstreamSlot,
    silence: Duration,
) -> ClientResponse {
    let (mut parts, body) = response.into_parts();
    headers::prepare_response(&mut parts.headers);
    Box::new(Response::from_parts(
        parts,
        ResponseBody::stream(body, slot, silence),
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
