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

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::secret::Secret;
use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use sha2::{Digest, Sha256};

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

mod load;
#[cfg(test)]
mod tests;

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
    /// What a recording masks, masked in a request's path and query before it is matched:
    /// a request recorded with a secret or a token in its query is recorded with `***`.
    scrub: crate::record::scrub::Scrubber,
}

impl Replay {
    /// Masks `secrets` (the configuration's, as a recording does) in requests' paths and
    /// queries before they are matched; Zoho-shaped tokens are masked in any case.
    pub fn masking<'a>(mut self, secrets: impl IntoIterator<Item = &'a Secret<String>>) -> Self {
        self.scrub = crate::record::scrub::Scrubber::new(secrets);
        self
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
        // Masked as the recording masked it (only a query with something to mask is
        // copied).
        let masked;
        let path_and_query = if self.scrub.finds(path_and_query.as_bytes()) {
            masked = self.scrub.text(path_and_query.to_owned());
            masked.as_str()
        } else {
            path_and_query
        };
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
