//! `serve --replay FILE.har` (or `zoho-desk-proxy replay FILE.har`): Desk's answers from a
//! recording, with no credentials and no network.
//!
//! A request matches an entry by method, path and query (its parameters in any order),
//! and, for methods that carry a body (`POST`, `PUT`, `PATCH`), by its body byte for byte.
//! Identical requests are answered in the recorded order, the last answer repeating. The
//! file is indexed once at start, so a request costs one hash lookup whatever the
//! recording's size. A request with no match gets 404 `PROXY_REPLAY_MISS` naming the
//! closest recorded request, and is listed when the proxy stops.
//!
//! Any HAR 1.2 file can be replayed: one the proxy recorded (every entry is Desk's), or
//! one from a browser's devtools (only the entries for a Desk host are kept; the others
//! are skipped with one warning). An entry that cannot be used is skipped with a warning
//! naming it; a file that is not HAR is an error naming the line and column.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::har::{self, Entry};

/// The largest recording read.
pub const MAX_FILE_BYTES: u64 = 1 << 30;
/// Misses kept for the list at exit (all are counted).
const MISSES_KEPT: usize = 100;
/// The most entries a recording may hold.
pub const MAX_ENTRIES: usize = 1_000_000;
/// Skipped entries warned about one by one; the rest are counted in one line.
const SKIPS_WARNED: usize = 20;

/// Why a recording cannot be replayed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The file cannot be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_FILE_BYTES`].
    #[error(
        "{path} is over 1 GiB: such recordings are not replayed (split it, or record with a smaller record.max_body_bytes)"
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The file is not JSON, or not HAR.
    #[error("{path}: not a HAR file: {reason}")]
    NotHar {
        /// The file.
        path: PathBuf,
        /// Where and why.
        reason: String,
    },
}

/// A HAR file as far as replay reads it at once: its entries are read one by one.
#[derive(Deserialize)]
struct HarFile<'a> {
    #[serde(borrow)]
    log: HarLog<'a>,
}

#[derive(Deserialize)]
struct HarLog<'a> {
    #[serde(default)]
    creator: HarCreator,
    #[serde(borrow)]
    entries: Vec<&'a serde_json::value::RawValue>,
}

#[derive(Deserialize, Default)]
struct HarCreator {
    #[serde(default)]
    name: String,
}

/// What a request is matched on: its method, path and sorted query, and its body (its
/// SHA-256, so that a client's body is hashed as it streams, never held) for methods
/// that carry one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    line: String,
    body: Option<BodyDigest>,
}

/// The SHA-256 of a request body.
pub type BodyDigest = [u8; 32];

/// Hashes a request body as it arrives, for [`Replay::lookup`].
#[derive(Debug, Default)]
pub struct BodyHasher(Sha256);

impl BodyHasher {
    /// More of the body.
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// The body's digest.
    pub fn finish(self) -> BodyDigest {
        self.0.finalize().into()
    }
}

/// A recorded answer.
#[derive(Debug)]
pub struct Answer {
    /// Its status.
    pub status: StatusCode,
    /// Its headers (hop-by-hop and length headers left out: they are the proxy's).
    pub headers: HeaderMap,
    /// Its body as recorded.
    pub body: Bytes,
    /// Whether the body was cut at `record.max_body_bytes` when recorded.
    pub truncated: bool,
}

/// The answers to one request, in recorded order.
#[derive(Debug)]
struct Sequence {
    answers: Vec<Answer>,
    next: AtomicUsize,
}

/// The outcome of a lookup.
#[derive(Debug)]
pub enum Lookup<'a> {
    /// The recorded answer.
    Hit(&'a Answer),
    /// None; the closest recorded request, when there is any.
    Miss {
        /// The request, as it was matched.
        request: String,
        /// The closest recorded request.
        closest: Option<&'a str>,
        /// Whether the recording has this request with its body cut (longer than
        /// `record.max_body_bytes` when it was recorded): no body can match it.
        cut: bool,
    },
}

/// A recording, indexed for replay.
#[derive(Debug)]
pub struct Replay {
    path: PathBuf,
    index: HashMap<Key, Sequence>,
    /// Every recorded request line, sorted, for naming the closest to a miss.
    lines: Vec<String>,
    /// A request line's method and path (no query) → its first line in `lines`.
    by_path: HashMap<String, usize>,
    /// The request lines of entries skipped for a body cut at `record.max_body_bytes`.
    cut: HashSet<String>,
    entries: usize,
    /// The first misses, for the list at exit: a slot each, taken in turn (no lock).
    misses: Box<[OnceLock<String>]>,
    missed: AtomicU64,
}

impl Replay {
    /// Loads and indexes `path`. Entries of another HAR's hosts are kept only when they
    /// are Desk's: one of `desk_hosts`, or a `desk.zoho…` / `desk.zohocloud…` name. `prefix`
    /// (the upstream's path prefix, if any) is taken off recorded paths.
    pub fn load(path: &Path, desk_hosts: &[String], prefix: &str) -> Result<Self, ReplayError> {
        let io = |source| ReplayError::Io {
            path: path.to_owned(),
            source,
        };
        let too_large = || ReplayError::TooLarge {
            path: path.to_owned(),
        };
        if std::fs::metadata(path).map_err(io)?.len() > MAX_FILE_BYTES {
            return Err(too_large());
        }
        // Read through a bound all the same: a pipe or a device has no size to check.
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|file| file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes))
            .map_err(io)?;
        if bytes.len() as u64 > MAX_FILE_BYTES {
            return Err(too_large());
        }
        let not_har = |reason: String| ReplayError::NotHar {
            path: path.to_owned(),
            reason,
        };
        let text = std::str::from_utf8(&bytes).map_err(|err| {
            not_har(format!(
                "it is not UTF-8 text (at byte {})",
                err.valid_up_to()
            ))
        })?;
        // Entries are kept as raw JSON and read one by one, so that one bad entry is
        // skipped, not the file.
        let repaired;
        let file: HarFile<'_> = match serde_json::from_str(text) {
            Ok(file) => file,
            Err(err) if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() => {
                return Err(not_har(format!(
                    "it has no log.entries list, as HAR has ({err})"
                )));
            }
            Err(err) => {
                // A recording cut short by a crash: its whole entries are replayed.
                let lines = har::entry_lines(text);
                if let Some((_, har::Ending::Damaged(line))) = lines {
                    return Err(not_har(format!(
                        "{}: mend or remove that line",
                        har::damaged(line)
                    )));
                }
                repaired = lines.map(|(entries, _)| har::layout(entries));
                match repaired
                    .as_deref()
                    .and_then(|t| serde_json::from_str(t).ok())
                {
                    Some(file) => {
                        tracing::warn!(file = %path.display(), "replay: the recording was cut short (a crash?); replaying its whole entries");
                        file
                    }
                    None => {
                        return Err(not_har(format!(
                            "line {}, column {}: {err}",
                            err.line(),
                            err.column()
                        )));
                    }
                }
            }
        };
        let ours = file.log.creator.name == har::CREATOR;
        let entries = file.log.entries;
        if entries.len() > MAX_ENTRIES {
            return Err(not_har(format!(
                "it has {} entries; at most {MAX_ENTRIES} are replayed",
                entries.len()
            )));
        }
        let mut replay = Self {
            path: path.to_owned(),
            index: HashMap::with_capacity(entries.len().min(1 << 16)),
            lines: Vec::new(),
            by_path: HashMap::new(),
            cut: HashSet::new(),
            entries: 0,
            misses: (0..MISSES_KEPT).map(|_| OnceLock::new()).collect(),
            missed: AtomicU64::new(0),
        };
        let mut other_hosts: BTreeMap<String, usize> = BTreeMap::new();
        let mut skipped = 0;
        let mut skip = |entry: usize, why: &dyn std::fmt::Display| {
            skipped += 1;
            if skipped <= SKIPS_WARNED {
                tracing::warn!(file = %path.display(), entry, reason = %why, "replay: entry skipped");
            }
        };
        for (i, raw) in entries.iter().enumerate() {
            let entry = match serde_json::from_str::<Entry>(raw.get()) {
                Ok(entry) => entry,
                Err(err) => {
                    skip(i, &err);
                    continue;
                }
            };
            match indexed(&entry, ours, desk_hosts, prefix) {
                Ok((key, answer)) => {
                    let sequence = replay.index.entry(key).or_insert_with_key(|key| {
                        replay.lines.push(key.line.clone());
                        Sequence {
                            answers: Vec::new(),
                            next: AtomicUsize::new(0),
                        }
                    });
                    sequence.answers.push(answer);
                    replay.entries += 1;
                }
                Err(Skip::OtherHost(host)) => *other_hosts.entry(host).or_default() += 1,
                Err(Skip::Unusable(reason)) => skip(i, &reason),
                Err(Skip::Cut(line)) => {
                    skip(
                        i,
                        &"its request body was cut at record.max_body_bytes, so no request can match it",
                    );
                    replay.cut.insert(line);
                }
            }
        }
        if skipped > SKIPS_WARNED {
            tracing::warn!(file = %path.display(), skipped, "replay: more entries skipped than were named (the first {SKIPS_WARNED})");
        }
        replay.lines.sort();
        replay.lines.dedup();
        for (i, line) in replay.lines.iter().enumerate().rev() {
            replay.by_path.insert(without_query(line).to_owned(), i);
        }
        if !other_hosts.is_empty() {
            let hosts: Vec<String> = other_hosts
                .iter()
                .map(|(host, n)| format!("{host} ({n})"))
                .collect();
            tracing::warn!(file = %path.display(), hosts = %hosts.join(", "), "replay: entries for hosts other than Desk's skipped");
        }
        tracing::info!(file = %path.display(), entries = replay.entries, requests = replay.index.len(), "replaying Desk's traffic from a recording");
        Ok(replay)
    }

    /// Whether a method's body is part of its match.
    pub fn matches_body(method: &Method) -> bool {
        [Method::POST, Method::PUT, Method::PATCH].contains(method)
    }

    /// The answer to a request (its canonical path and query, and its body for the
    /// methods whose body is matched).
    pub fn lookup(
        &self,
        method: &Method,
        path_and_query: &str,
        body: Option<BodyDigest>,
    ) -> Lookup<'_> {
        let key = Key {
            line: request_line(method.as_str(), path_and_query),
            body: body.filter(|_| Self::matches_body(method)),
        };
        if let Some(sequence) = self.index.get(&key) {
            let turn = sequence.next.fetch_add(1, Ordering::Relaxed);
            let last = sequence.answers.len().saturating_sub(1);
            if let Some(answer) = sequence.answers.get(turn.min(last)) {
                return Lookup::Hit(answer);
            }
        }
        let closest = self.closest(&key.line);
        Lookup::Miss {
            cut: self.cut.contains(&key.line),
            request: key.line,
            closest,
        }
    }

    /// Notes a miss, for the list at exit.
    pub fn note_miss(&self, request: String) {
        let turn = self.missed.fetch_add(1, Ordering::Relaxed);
        if let Some(slot) = usize::try_from(turn).ok().and_then(|t| self.misses.get(t)) {
            let _ = slot.set(request);
        }
    }

    /// How many requests missed, and the first of them.
    pub fn misses(&self) -> (u64, Vec<String>) {
        let first = self
            .misses
            .iter()
            .filter_map(|m| m.get().cloned())
            .collect();
        (self.missed.load(Ordering::Relaxed), first)
    }

    /// The entries indexed.
    pub fn entries(&self) -> usize {
        self.entries
    }

    /// The recording's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The recorded request closest to `line`: one with the same method and path when
    /// there is one, else one for the nearest of its path's parents (up to 16 segments
    /// up), else the one sharing the longest start with it. Each is a lookup (a hash, a
    /// binary search), so a miss costs about what a hit does, however large the recording
    /// and however long the request. Only a request for the same path is named with its
    /// query: another path's query is no business of this client's.
    fn closest(&self, line: &str) -> Option<&str> {
        let mut path = without_query(line);
        if let Some(&i) = self.by_path.get(path) {
            return self.lines.get(i).map(String::as_str);
        }
        for _ in 0..16 {
            match path.rsplit_once('/') {
                Some((parent, _)) if parent.contains('/') => path = parent,
                _ => break,
            }
            if let Some(&i) = self.by_path.get(path) {
                return self.lines.get(i).map(|l| without_query(l));
            }
        }
        // In sorted order, the line sharing the longest start is next to where `line`
        // would go.
        let at = self.lines.partition_point(|l| l.as_str() < line);
        let shared = |l: &str| {
            l.bytes()
                .zip(line.bytes())
                .take_while(|(a, b)| a == b)
                .count()
        };
        let before = at.checked_sub(1).and_then(|i| self.lines.get(i));
        let after = self.lines.get(at);
        match (before, after) {
            (Some(b), Some(a)) if shared(a) > shared(b) => Some(a),
            (Some(b), _) => Some(b),
            (None, a) => a,
        }
        .map(|l| without_query(l))
    }
}

/// `GET /a?b=1` → `GET /a`.
fn without_query(line: &str) -> &str {
    line.split_once('?').map_or(line, |(path, _)| path)
}

/// Why an entry is not indexed.
enum Skip {
    /// Another site's, in a HAR from a browser.
    OtherHost(String),
    /// Something in it cannot be used.
    Unusable(String),
    /// Its request body was cut at `record.max_body_bytes`: the request line.
    Cut(String),
}

/// An entry's key and answer.
fn indexed(
    entry: &Entry,
    ours: bool,
    desk_hosts: &[String],
    prefix: &str,
) -> Result<(Key, Answer), Skip> {
    let request = &entry.request;
    let uri: Uri = request
        .url
        .parse()
        .map_err(|_| Skip::Unusable("its URL cannot be read".into()))?;
    let host = uri.host().unwrap_or_default().to_ascii_lowercase();
    if !ours && !is_desk_host(&host, desk_hosts) {
        return Err(Skip::OtherHost(host));
    }
    let method = Method::from_bytes(request.method.trim().to_ascii_uppercase().as_bytes())
        .map_err(|_| Skip::Unusable(format!("its method {:?} is not one", request.method)))?;
    let path = uri.path();
    let path = path
        .strip_prefix(prefix)
        .filter(|rest| !prefix.is_empty() && rest.starts_with('/'))
        .unwrap_or(path);
    let path = crate::paths::canonicalize(path)
        .map_err(|e| Skip::Unusable(format!("its path cannot be forwarded: {e}")))?;
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.into_owned(),
    };
    let body = match &request.post_data {
        Some(post) if Replay::matches_body(&method) => {
            if post.truncated {
                return Err(Skip::Cut(request_line(method.as_str(), &path_and_query)));
            }
            let bytes =
                har::body_bytes(&post.text, post.encoding.as_deref()).map_err(Skip::Unusable)?;
            Some(Sha256::digest(&bytes).into())
        }
        None if Replay::matches_body(&method) => Some(Sha256::digest(b"").into()),
        _ => None,
    };
    let response = &entry.response;
    let status = StatusCode::from_u16(response.status)
        .ok()
        // 1xx are not final answers (and a browser's 0 is a request that failed).
        .filter(|s| s.as_u16() >= 200)
        .ok_or_else(|| {
            Skip::Unusable(format!(
                "its status {} is not an answer (a failed request?)",
                response.status
            ))
        })?;
    let content = &response.content;
    let body_bytes = match &content.text {
        Some(text) => har::body_bytes(text, content.encoding.as_deref()).map_err(Skip::Unusable)?,
        None => Vec::new(),
    };
    let mut headers = HeaderMap::new();
    for header in &response.headers {
        let name = header.name.trim().to_ascii_lowercase();
        // HTTP/2 pseudo-headers (browsers list them), and what the proxy sets itself.
        // A browser's HAR holds bodies decoded: their Content-Encoding would lie.
        // A HEAD's Content-Length is Desk's word on the body it did not send: kept.
        let proxy_owned = ["x-request-id", "set-cookie"];
        if name.starts_with(':')
            || proxy_owned.contains(&name.as_str())
            || (name == "content-length" && method != Method::HEAD)
            || (!ours && name == "content-encoding")
        {
            continue;
        }
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(header.value.as_bytes()),
        ) {
            headers.append(name, value);
        }
    }
    // Connection, Keep-Alive, Transfer-Encoding… are the proxy's own on the way out.
    crate::headers::remove_hop_by_hop(&mut headers);
    let key = Key {
        line: request_line(method.as_str(), &path_and_query),
        body,
    };
    Ok((
        key,
        Answer {
            status,
            headers,
            body: Bytes::from(body_bytes),
            truncated: content.truncated,
        },
    ))
}

/// Whether a host is Desk's: one of the configured ones, or one of Zoho's Desk names.
fn is_desk_host(host: &str, desk_hosts: &[String]) -> bool {
    desk_hosts.iter().any(|h| h.eq_ignore_ascii_case(host))
        || host.starts_with("desk.zoho.")
        || host.starts_with("desk.zohocloud.")
}

/// `METHOD path?query`, the query's parameters sorted (decoded and encoded again), so
/// that their order does not matter.
fn request_line(method: &str, path_and_query: &str) -> String {
    let (path, query) = match path_and_query.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path_and_query, None),
    };
    // An escape's hex digits in any case are one character.
    let path = crate::paths::rule_form(path);
    let mut line = format!("{method} {path}");
    if let Some(query) = query.filter(|q| !q.is_empty()) {
        let mut pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        pairs.sort();
        let sorted = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs)
            .finish();
        line.push('?');
        line.push_str(&sorted);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_escape_matches_in_any_case_and_the_query_in_any_order() {
        assert_eq!(
            request_line("GET", "/api/v1/caf%c3%a9?b=2&a=1"),
            request_line("GET", "/api/v1/caf%C3%A9?a=1&b=2")
        );
        assert_ne!(
            request_line("GET", "/api/v1/caf%c3%a9"),
            request_line("GET", "/api/v1/CAF%c3%a9")
        );
    }

    #[test]
    fn queries_match_in_any_order_and_spelling() {
        assert_eq!(
            request_line("GET", "/api/v1/tickets?limit=2&from=0"),
            request_line("GET", "/api/v1/tickets?from=0&limit=2")
        );
        assert_eq!(
            request_line("GET", "/a?q=a+b"),
            request_line("GET", "/a?q=a%20b")
        );
        assert_ne!(request_line("GET", "/a?q=1"), request_line("GET", "/a?q=2"));
        assert_eq!(request_line("GET", "/a?"), "GET /a");
    }

    /// A recording of `n` distinct ticket reads, each answered with a 1 KiB body.
    fn recording(dir: &Path, n: usize) -> PathBuf {
        let body = format!("{{\"data\":\"{}\"}}", "x".repeat(1024));
        let entries: Vec<String> = (0..n)
            .map(|i| {
                let entry = Entry {
                    request: har::Request {
                        method: "GET".into(),
                        url: format!("https://desk.zoho.com/api/v1/tickets/{i}?include=contacts"),
                        ..Default::default()
                    },
                    response: har::Response {
                        status: 200,
                        content: har::Content {
                            text: Some(body.clone()),
                            ..Default::default()
                        },
                        ..Default::default()
                    },
                    ..Default::default()
                };
                serde_json::to_string(&entry).unwrap()
            })
            .collect();
        let path = dir.join(format!("{n}.har"));
        std::fs::write(&path, har::layout(entries.iter().map(String::as_str))).unwrap();
        path
    }

    /// The median time of `lookups` lookups, in nanoseconds, over 5 runs.
    fn lookup_ns(replay: &Replay, requests: &[String]) -> u128 {
        let mut runs: Vec<u128> = (0..5)
            .map(|_| {
                let started = std::time::Instant::now();
                for request in requests {
                    let found = replay.lookup(&Method::GET, request, None);
                    std::hint::black_box(&found);
                }
                started.elapsed().as_nanos() / requests.len() as u128
            })
            .collect();
        runs.sort_unstable();
        runs[2]
    }

    /// 10,000 entries load in well under a second, and a lookup (hit or miss) costs the
    /// same with 10,000 entries as with 100. For the figures: `cargo test --release --lib
    /// a_large_recording -- --nocapture`.
    #[test]
    fn a_large_recording_loads_fast_and_matches_in_constant_time() {
        let dir = tempfile::tempdir().unwrap();
        let small = Replay::load(&recording(dir.path(), 100), &[], "").unwrap();
        let large_file = recording(dir.path(), 10_000);
        let started = std::time::Instant::now();
        let large = Replay::load(&large_file, &[], "").unwrap();
        let load = started.elapsed();
        assert_eq!(large.entries(), 10_000);
        // Unoptimized (`cargo test`), JSON parsing is some ten times slower than in the
        // release binary: `cargo test --release` holds it to half a second.
        let bound = if cfg!(debug_assertions) { 5_000 } else { 500 };
        assert!(
            load < std::time::Duration::from_millis(bound),
            "10,000 entries loaded in {load:?}"
        );

        let hits: Vec<String> = (0..100)
            .map(|i| format!("/api/v1/tickets/{i}?include=contacts"))
            .collect();
        let misses: Vec<String> = (0..100)
            .map(|i| format!("/api/v1/tickets/{i}/threads?from={}", "9".repeat(2000)))
            .collect();
        for (what, requests) in [("hit", &hits), ("miss", &misses)] {
            let (at_100, at_10k) = (lookup_ns(&small, requests), lookup_ns(&large, requests));
            println!("{what}: {at_100} ns with 100 entries, {at_10k} ns with 10,000");
            // A scan of the entries would be ~100× slower; allow for a noisy machine.
            assert!(
                at_10k < at_100.max(1_000) * 5,
                "{what}: {at_100} ns vs {at_10k} ns"
            );
        }
        println!(
            "10,000 entries ({} MiB) loaded in {load:?}",
            std::fs::metadata(&large_file).unwrap().len() >> 20
        );
        // The closest to a miss is still the nearest request.
        for (request, expected) in [
            // Another path's query is not named.
            ("/api/v1/tickets/42/threads", "GET /api/v1/tickets/42"),
            (
                "/api/v1/tickets/42",
                "GET /api/v1/tickets/42?include=contacts",
            ),
            (
                "/api/v1/tickets/42?include=x",
                "GET /api/v1/tickets/42?include=contacts",
            ),
        ] {
            let Lookup::Miss { closest, .. } = large.lookup(&Method::GET, request, None) else {
                panic!("{request} is a miss");
            };
            assert_eq!(closest, Some(expected), "{request}");
        }
        let Lookup::Miss { closest, .. } = large.lookup(&Method::GET, "/api/v2/x", None) else {
            panic!("a miss");
        };
        assert!(
            closest.is_some_and(|c| c.starts_with("GET /api/v1/tickets/")),
            "{closest:?}"
        );
    }

    #[test]
    fn desk_hosts_are_zoho_s_and_the_configured_ones() {
        let configured = vec!["desk.example.com".to_owned()];
        for host in [
            "desk.zoho.com",
            "desk.zoho.eu",
            "desk.zohocloud.ca",
            "desk.example.com",
        ] {
            assert!(is_desk_host(host, &configured), "{host}");
        }
        assert!(!is_desk_host("static.zohocdn.com", &configured));
        assert!(!is_desk_host("accounts.zoho.com", &configured));
    }
}
