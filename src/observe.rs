//! What the proxy tells its operator: one log line per request, and the count of requests
//! in flight that graceful shutdown waits for.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::Method;
use tokio::sync::Notify;

use crate::metrics::{Metrics, UpstreamErrorKind};

/// The process' lifecycle as requests see it: draining after SIGTERM, and in flight.
#[derive(Debug, Default)]
pub struct Lifecycle {
    draining: AtomicBool,
    /// The shutdown's grace period is over: requests still in flight are cut.
    grace_over: AtomicBool,
    in_flight: AtomicUsize,
    idle: Notify,
}

impl Lifecycle {
    /// Whether SIGTERM/SIGINT was received (`/_proxy/ready` answers 503).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Starts draining.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Ends the shutdown's grace period: the requests still in flight are cut by the
    /// proxy, and logged so.
    pub fn end_grace(&self) {
        self.grace_over.store(true, Ordering::Release);
    }

    /// Requests whose response has not ended yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Resolves once no request is in flight.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Counts a request in flight until the guard drops.
    pub fn enter(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(self))
    }
}

/// One request in flight.
#[derive(Debug)]
pub struct InFlight(Arc<Lifecycle>);

impl InFlight {
    /// Whether the proxy is cutting the requests still in flight (the shutdown's grace
    /// period is over).
    fn cut_by_shutdown(&self) -> bool {
        self.0.grace_over.load(Ordering::Acquire)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Milliseconds with microsecond precision, for log lines.
fn millis(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}

/// A request's id: the client's `X-Request-Id` when it is 1–128 visible ASCII
/// characters, else 16 random hex digits. It is in the request's log line, on its answer,
/// and on the request forwarded to Desk; held as the header value it is sent as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(http::HeaderValue);

/// The longest `X-Request-Id` taken from a client.
const MAX_CLIENT_ID: usize = 128;

impl RequestId {
    /// A new random id.
    pub fn new() -> Self {
        // One allocation holding the digits, shared by the request's copies (the log,
        // Desk's request, the answer): copied into a `Vec`, the value's first clone
        // would allocate again to share it.
        let digits = bytes::Bytes::from_owner(hex(fastrand::u64(..)));
        // Hex digits are always a valid header value.
        Self(
            http::HeaderValue::from_maybe_shared(digits)
                .unwrap_or(http::HeaderValue::from_static("0")),
        )
    }

    /// The client's id when it sent exactly one that is sane, else a new one.
    pub fn of_request(headers: &http::HeaderMap) -> Self {
        let mut ids = headers.get_all(&crate::headers::REQUEST_ID).iter();
        match (ids.next(), ids.next()) {
            (Some(id), None) if is_sane(id.as_bytes()) => Self(id.clone()),
            _ => Self::new(),
        }
    }

    /// As a header value (shares its bytes).
    pub fn header_value(&self) -> http::HeaderValue {
        self.0.clone()
    }
}

fn is_sane(id: &[u8]) -> bool {
    (1..=MAX_CLIENT_ID).contains(&id.len()) && id.iter().all(|b| (0x21..=0x7e).contains(b))
}

fn hex(n: u64) -> [u8; 16] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = HEX[((n >> (60 - 4 * i)) & 0xf) as usize];
    }
    out
}

impl Default for RequestId {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Checked to be visible ASCII, or made of hex digits.
        f.write_str(self.0.to_str().unwrap_or("-"))
    }
}

/// The status logged and counted for a request whose client went away before its answer
/// began, as nginx does.
pub const CLIENT_CLOSED_REQUEST: u16 = 499;

/// The status logged and counted for a request the proxy cut before its answer began,
/// at the end of the shutdown's grace period: the proxy was not available to finish it.
pub const CUT_BY_SHUTDOWN: u16 = 503;

/// The record of one request, written as one log line when its response ends (or the
/// client goes away). Never holds a query string, token or secret.
#[derive(Debug)]
pub struct RequestLog {
    id: RequestId,
    method: Method,
    uri: http::Uri,
    status: u16,
    started: Instant,
    upstream_latency: Option<Duration>,
    retried: bool,
    error_code: Option<&'static str>,
    bytes: u64,
    complete: bool,
    body_error: bool,
    metrics: Arc<Metrics>,
    _in_flight: InFlight,
}

impl RequestLog {
    /// Starts the record; only the path of `uri` is ever logged, never its query.
    pub fn new(
        id: RequestId,
        method: Method,
        uri: http::Uri,
        in_flight: InFlight,
        metrics: Arc<Metrics>,
    ) -> Self {
        metrics.in_flight().inc();
        Self {
            id,
            method,
            uri,
            status: 0,
            started: Instant::now(),
            upstream_latency: None,
            retried: false,
            error_code: None,
            bytes: 0,
            complete: false,
            body_error: false,
            metrics,
            _in_flight: in_flight,
        }
    }

    /// The request id.
    pub fn id(&self) -> &RequestId {
        &self.id
    }

    /// Records the status sent to the client.
    pub fn set_status(&mut self, status: u16) {
        self.status = status;
    }

    /// When the request arrived.
    pub fn arrived(&self) -> Instant {
        self.started
    }

    /// Records the time Desk took to send response headers.
    pub fn set_upstream_latency(&mut self, latency: Duration) {
        self.upstream_latency = Some(latency);
    }

    /// Records that the request was retried after a 401.
    pub fn set_retried(&mut self) {
        self.retried = true;
        self.metrics.record_retry();
    }

    /// Records that the request was sent again after a Desk 429.
    pub fn set_retried_after_429(&mut self) {
        self.retried = true;
    }

    /// Records the proxy's own error code.
    pub fn set_error_code(&mut self, code: &'static str) {
        self.error_code = Some(code);
    }

    /// Counts response body bytes sent.
    pub fn add_bytes(&mut self, n: u64) {
        self.bytes += n;
    }

    /// The body ended normally.
    pub fn mark_complete(&mut self) {
        self.complete = true;
    }

    /// Desk's body broke off.
    pub fn mark_body_error(&mut self) {
        if !self.body_error {
            self.metrics.record_upstream_error(UpstreamErrorKind::Body);
        }
        self.body_error = true;
    }
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        let cut_by_shutdown = self._in_flight.cut_by_shutdown();
        if self.status == 0 {
            // Dropped before an answer was chosen: the client went away, or the proxy's
            // shutdown cut it.
            self.status = if cut_by_shutdown {
                CUT_BY_SHUTDOWN
            } else {
                CLIENT_CLOSED_REQUEST
            };
        }
        let duration = self.started.elapsed();
        self.metrics.in_flight().dec();
        self.metrics
            .record_request(&self.method, self.status, duration);
        let duration_ms = millis(duration);
        let upstream_ms = self.upstream_latency.map(millis);
        tracing::info!(
            target: "zoho_desk_proxy::request",
            request_id = %self.id,
            method = %self.method,
            path = self.uri.path(),
            status = self.status,
            upstream_ms,
            duration_ms,
            bytes = self.bytes,
            retried = self.retried,
            error_code = self.error_code,
            complete = self.complete,
            upstream_body_error = self.body_error,
            cut_by_shutdown = cut_by_shutdown.then_some(true),
            "request"
        );
    }
}
