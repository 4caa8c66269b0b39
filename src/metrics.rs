//! The `/_proxy/metrics` registry (Prometheus text format, README "Operations").
//!
//! Counters on the request path are created once at start and bumped as plain atomics:
//! no label lookup and no lock per request (the duration histogram's own short mutex
//! aside).

use std::fmt::Write as _;
use std::time::Duration;

use http::Method;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::budget::Limit;

/// Methods with their own label; the rest count as `OTHER`.
const METHODS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "OTHER",
];
/// Status classes.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    limit: &'static str,
}

/// Kinds of upstream errors.
#[derive(Debug, Clone, Copy)]
pub enum UpstreamErrorKind {
    /// Desk could not be reached.
    Unreachable,
    /// Desk did not answer in time.
    Timeout,
    /// Desk's answer broke off in its body (the client got it cut short).
    Body,
}

impl UpstreamErrorKind {
    /// Every kind, in the order of their metric series.
    const ALL: [UpstreamErrorKind; 3] = [Self::Unreachable, Self::Timeout, Self::Body];

    /// Its name, in the metric's `kind` label.
    fn label(self) -> &'static str {
        match self {
            Self::Unreachable => "unreachable",
            Self::Timeout => "timeout",
            Self::Body => "body",
        }
    }
}

/// Results of a token refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshResult {
    /// A new token.
    Ok,
    /// A transient failure (unreachable, timeout, server error).
    Error,
    /// Accounts throttled.
    Throttled,
    /// Accounts rejected the credentials.
    Rejected,
    /// The refresh guard refused to call Accounts.
    GuardRefused,
}

impl RefreshResult {
    /// Every result, in the order of their metric series.
    const ALL: [RefreshResult; 5] = [
        Self::Ok,
        Self::Error,
        Self::Throttled,
        Self::Rejected,
        Self::GuardRefused,
    ];

    /// Its name, in the metric's `result` label and the log's `result` field.
    pub fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Error => "error",
            Self::Throttled => "throttled",
            Self::Rejected => "rejected",
            Self::GuardRefused => "guard_refused",
        }
    }
}

/// Every series of the proxy.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Vec<Counter>,
    duration: Histogram,
    upstream_errors: [Counter; UpstreamErrorKind::ALL.len()],
    refreshes: [Counter; RefreshResult::ALL.len()],
    token_expiry: Gauge<f64, std::sync::atomic::AtomicU64>,
    retries: Counter,
    in_flight: Gauge,
    store_errors: Counter,
    limits: [Counter; Limit::ALL.len()],
    buffered_bytes: Gauge,
    desk_queue_depth: Gauge,
    desk_in_flight: Gauge,
    desk_429: Counter,
    desk_rate_limit_remaining: Gauge,
    /// Whether Desk has sent a remaining value yet (until then the series is left out).
    desk_rate_limit_known: std::sync::atomic::AtomicBool,
    desk_fleet_fallbacks: Counter,
    record_dropped: Counter,
    replay_misses: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every series, at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("zoho_proxy");

        let requests_family = Family::<RequestLabels, Counter>::default();
        let mut requests = Vec::with_capacity(METHODS.len() * CLASSES.len());
        for method in METHODS {
            for status_class in CLASSES {
                requests.push(requests_family.get_or_create_owned(&RequestLabels {
                    method,
                    status_class,
                }));
            }
        }
        registry.register(
            "requests",
            "Requests answered, by method and status class",
            requests_family,
        );

        let duration = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0,
        ]);
        registry.register_with_unit(
            "request_duration",
            "Time from request received to the end of the response body",
            prometheus_client::registry::Unit::Seconds,
            duration.clone(),
        );

        let errors_family = Family::<KindLabels, Counter>::default();
        let upstream_errors = UpstreamErrorKind::ALL
            .map(|kind| errors_family.get_or_create_owned(&KindLabels { kind: kind.label() }));
        registry.register(
            "upstream_errors",
            "Requests that Desk could not answer, by kind",
            errors_family,
        );

        let refresh_family = Family::<ResultLabels, Counter>::default();
        let refreshes = RefreshResult::ALL.map(|result| {
            refresh_family.get_or_create_owned(&ResultLabels {
                result: result.label(),
            })
        });
        registry.register(
            "token_refreshes",
            "Token refreshes by result",
            refresh_family,
        );

        let token_expiry = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register_with_unit(
            "token_expiry",
            "Seconds until the current access token expires (0 when none is held)",
            prometheus_client::registry::Unit::Seconds,
            token_expiry.clone(),
        );
        let retries = Counter::default();
        registry.register(
            "retries_after_401",
            "Requests retried after a Desk 401",
            retries.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "in_flight_requests",
            "Requests in flight",
            in_flight.clone(),
        );
        let store_errors = Counter::default();
        registry.register(
            "token_store_errors",
            "Failed operations on the shared token store (Redis)",
            store_errors.clone(),
        );

        let limits_family = Family::<LimitLabels, Counter>::default();
        let limits =
            Limit::ALL.map(|l| limits_family.get_or_create_owned(&LimitLabels { limit: l.key() }));
        registry.register(
            "limits_reached",
            "Requests or connections that ran into one of the proxy's bounds, by its key",
            limits_family,
        );

        let buffered_bytes = Gauge::default();
        registry.register_with_unit(
            "buffered_body",
            "Request-body bytes held for 401 retries now (bounded by limits.buffered_body_bytes)",
            prometheus_client::registry::Unit::Bytes,
            buffered_bytes.clone(),
        );

        let desk_queue_depth = Gauge::default();
        registry.register(
            "desk_queue_depth",
            "Requests waiting for one of Desk's concurrent calls (desk.max_concurrent)",
            desk_queue_depth.clone(),
        );
        let desk_in_flight = Gauge::default();
        registry.register(
            "desk_in_flight",
            "Requests at Desk now, from this process",
            desk_in_flight.clone(),
        );
        let desk_429 = Counter::default();
        registry.register(
            "desk_429",
            "Desk answers 429 (Too Many Requests)",
            desk_429.clone(),
        );
        let desk_rate_limit_remaining = Gauge::default();
        registry.register(
            "desk_rate_limit_remaining",
            "The latest remaining value of Desk's X-Rate-Limit-Remaining headers (absent until Desk sent one)",
            desk_rate_limit_remaining.clone(),
        );
        let desk_fleet_fallbacks = Counter::default();
        registry.register(
            "desk_fleet_fallbacks",
            "Times the fleet's Desk concurrency fell back to this replica's share because Redis failed",
            desk_fleet_fallbacks.clone(),
        );

        let record_dropped = Counter::default();
        registry.register(
            "record_dropped",
            "Entries of a recording (serve --record) dropped because the disk could not keep up",
            record_dropped.clone(),
        );
        let replay_misses = Counter::default();
        registry.register(
            "replay_misses",
            "Requests a replay (serve --replay) found no recorded answer for",
            replay_misses.clone(),
        );

        Self {
            registry,
            requests,
            duration,
            upstream_errors,
            refreshes,
            token_expiry,
            retries,
            in_flight,
            store_errors,
            limits,
            buffered_bytes,
            desk_queue_depth,
            desk_in_flight,
            desk_429,
            desk_rate_limit_remaining,
            desk_rate_limit_known: std::sync::atomic::AtomicBool::new(false),
            desk_fleet_fallbacks,
            record_dropped,
            replay_misses,
        }
    }

    /// Counts entries of a recording that were dropped.
    pub fn record_recording_dropped_n(&self, entries: u64) {
        self.record_dropped.inc_by(entries);
    }

    /// Counts a request a replay had no answer for.
    pub fn record_replay_miss(&self) {
        self.replay_misses.inc();
    }

    /// Requests waiting for a Desk call (moved by the Desk queue).
    pub fn desk_queue_depth(&self) -> &Gauge {
        &self.desk_queue_depth
    }

    /// Requests at Desk (moved by the Desk queue).
    pub fn desk_in_flight(&self) -> &Gauge {
        &self.desk_in_flight
    }

    /// Counts a Desk 429.
    pub fn record_desk_429(&self) {
        self.desk_429.inc();
    }

    /// Counts a fall back of the fleet's Desk concurrency to the local share.
    pub fn record_desk_fleet_fallback(&self) {
        self.desk_fleet_fallbacks.inc();
    }

    /// Desk's latest remaining value of its rate limit.
    pub fn set_desk_rate_limit_remaining(&self, remaining: i64) {
        self.desk_rate_limit_remaining.set(remaining);
        self.desk_rate_limit_known
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Desk's latest remaining value, once it sent one.
    pub fn desk_rate_limit_remaining(&self) -> Option<i64> {
        self.desk_rate_limit_known
            .load(std::sync::atomic::Ordering::Acquire)
            .then(|| self.desk_rate_limit_remaining.get())
    }

    /// Counts an answered request.
    pub fn record_request(&self, method: &Method, status: u16, duration: Duration) {
        let m = METHODS
            .iter()
            .position(|m| *m == method.as_str())
            .unwrap_or(METHODS.len() - 1);
        let c = usize::from(status / 100).clamp(1, 5) - 1;
        if let Some(counter) = self.requests.get(m * CLASSES.len() + c) {
            counter.inc();
        }
        self.duration.observe(duration.as_secs_f64());
    }

    /// Counts an upstream error.
    pub fn record_upstream_error(&self, kind: UpstreamErrorKind) {
        self.upstream_errors[kind as usize].inc();
    }

    /// Counts a token refresh.
    pub fn record_refresh(&self, result: RefreshResult) {
        self.refreshes[result as usize].inc();
    }

    /// Counts a retry after a 401.
    pub fn record_retry(&self) {
        self.retries.inc();
    }

    /// Counts a request or connection that ran into `limit`.
    pub fn record_limit(&self, limit: Limit) {
        if let Some(counter) = Limit::ALL
            .iter()
            .position(|l| *l == limit)
            .and_then(|i| self.limits.get(i))
        {
            counter.inc();
        }
    }

    /// Counts a failed operation on the shared token store.
    pub fn record_store_error(&self) {
        self.store_errors.inc();
    }

    /// The in-flight gauge, moved by the request log.
    pub fn in_flight(&self) -> &Gauge {
        &self.in_flight
    }

    /// The exposition, with the token expiry and the request-body bytes held as of now:
    /// OpenMetrics when `openmetrics`, else the classic Prometheus text format. Series
    /// within a family come in a stable order. Returns the text and its content type.
    pub fn encode(
        &self,
        token_expires_in: Option<Duration>,
        buffered_bytes: u64,
        openmetrics: bool,
    ) -> (String, &'static str) {
        self.token_expiry
            .set(token_expires_in.map_or(0.0, |d| d.as_secs_f64()));
        self.buffered_bytes
            .set(i64::try_from(buffered_bytes).unwrap_or(i64::MAX));
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
            let _ = writeln!(text, "# metrics could not be encoded");
        }
        let mut text = sorted(&text);
        if self.desk_rate_limit_remaining().is_none() {
            // Unknown is not zero: the family is listed without a sample.
            text = text
                .lines()
                .filter(|line| !line.starts_with("zoho_proxy_desk_rate_limit_remaining "))
                .map(|line| format!("{line}\n"))
                .collect();
        }
        if openmetrics {
            (text, OPENMETRICS)
        } else {
            (classic(&text), CLASSIC)
        }
    }
}

/// OpenMetrics' content type.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The classic Prometheus text format's.
const CLASSIC: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The exposition with the samples of each counter or gauge family sorted (a family's
/// labelled series come out of a hash map).
fn sorted(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut samples: Vec<&str> = Vec::new();
    let mut sortable = false;
    let flush = |out: &mut String, samples: &mut Vec<&str>, sortable: bool| {
        if sortable {
            samples.sort_unstable();
        }
        for line in samples.drain(..) {
            out.push_str(line);
            out.push('\n');
        }
    };
    for line in text.lines() {
        if line.starts_with('#') {
            flush(&mut out, &mut samples, sortable);
            if line.starts_with("# TYPE ") {
                sortable = line.ends_with(" counter") || line.ends_with(" gauge");
            }
            out.push_str(line);
            out.push('\n');
        } else {
            samples.push(line);
        }
    }
    flush(&mut out, &mut samples, sortable);
    out
}

/// OpenMetrics text turned into the classic Prometheus text format: no `# UNIT` and no
/// `# EOF` lines, and a counter's family named as its samples (`…_total`).
fn classic(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut counters: Vec<String> = Vec::new();
    for line in openmetrics.lines() {
        if let Some(family) = line
            .strip_prefix("# TYPE ")
            .and_then(|rest| rest.strip_suffix(" counter"))
        {
            counters.push(family.to_owned());
        }
    }
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (family, tail) = rest.split_once(' ')?;
            counters
                .iter()
                .any(|c| c == family)
                .then(|| format!("{prefix}{family}_total {tail}"))
        });
        match renamed {
            Some(line) => out.push_str(&line),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_exposed_with_their_labels() {
        let m = Metrics::new();
        m.record_request(&Method::GET, 200, Duration::from_millis(3));
        m.record_request(
            &Method::from_bytes(b"PROPFIND").unwrap(),
            503,
            Duration::from_millis(3),
        );
        m.record_refresh(RefreshResult::Throttled);
        m.record_upstream_error(UpstreamErrorKind::Timeout);
        m.record_retry();
        m.record_limit(Limit::BodyRead);
        m.record_request(&Method::GET, 499, Duration::from_millis(3));
        let (text, content_type) = m.encode(Some(Duration::from_secs(42)), 800, true);
        assert!(content_type.starts_with("application/openmetrics-text"));
        for line in [
            "zoho_proxy_requests_total{method=\"GET\",status_class=\"2xx\"} 1",
            "zoho_proxy_requests_total{method=\"OTHER\",status_class=\"5xx\"} 1",
            "zoho_proxy_token_refreshes_total{result=\"throttled\"} 1",
            "zoho_proxy_upstream_errors_total{kind=\"timeout\"} 1",
            "zoho_proxy_retries_after_401_total 1",
            "zoho_proxy_token_expiry_seconds 42.0",
            "zoho_proxy_request_duration_seconds_count 3",
            "zoho_proxy_in_flight_requests 0",
            "zoho_proxy_limits_reached_total{limit=\"timeouts.body_read_secs\"} 1",
            "zoho_proxy_limits_reached_total{limit=\"limits.buffered_body_bytes\"} 0",
            "zoho_proxy_requests_total{method=\"GET\",status_class=\"4xx\"} 1",
            "zoho_proxy_buffered_body_bytes 800",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn the_classic_format_is_what_prometheus_scrapes_by_default() {
        let m = Metrics::new();
        m.record_request(&Method::GET, 200, Duration::from_millis(3));
        let (text, content_type) = m.encode(None, 0, false);
        assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE zoho_proxy_requests_total counter"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE zoho_proxy_token_expiry_seconds gauge"),
            "{text}"
        );
        assert!(text.contains("zoho_proxy_request_duration_seconds_bucket{le=\"0.005\"} 1"));
    }

    #[test]
    fn series_come_in_a_stable_order() {
        let a = Metrics::new().encode(None, 0, false).0;
        for _ in 0..5 {
            assert_eq!(Metrics::new().encode(None, 0, false).0, a);
        }
        let requests: Vec<&str> = a
            .lines()
            .filter(|l| l.starts_with("zoho_proxy_requests_total{"))
            .collect();
        let mut sorted = requests.clone();
        sorted.sort_unstable();
        assert_eq!(requests, sorted);
        assert_eq!(requests.len(), 40);
    }
}
