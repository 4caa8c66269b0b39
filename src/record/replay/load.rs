//! Reading a recording into the index: the file within its bounds, a recording cut short
//! by a crash mended, and each entry made a key and an answer, or skipped with the reason.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{
    Answer, Key, MAX_ENTRIES, MAX_FILE_BYTES, MISSES_KEPT, Replay, ReplayError, SKIPS_WARNED,
    Sequence, request_line, without_query,
};
use crate::record::har::{self, Entry};

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

impl Replay {
    /// Loads and indexes `path`. Entries of another HAR's hosts are kept only when they
    /// are Desk's: one of `desk_hosts`, or the Desk host of one of Zoho's data centres. `prefix`
    /// (the upstream's path prefix, if any) is taken off recorded paths.
    pub fn load(path: &Path, desk_hosts: &[String], prefix: &str) -> Result<Self, ReplayError> {
        let text = read(path)?;
        let mut repaired = None;
        let file = parsed(path, &text, &mut repaired)?;
        let not_har = |reason: String| ReplayError::NotHar {
            path: path.to_owned(),
            reason,
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
            scrub: crate::record::scrub::Scrubber::new(std::iter::empty()),
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
}

/// The text of the recording at `path`, within [`MAX_FILE_BYTES`].
fn read(path: &Path) -> Result<String, ReplayError> {
    let io = |source| ReplayError::Io {
        path: path.to_owned(),
        source,
    };
    let too_large = || ReplayError::TooLarge {
        path: path.to_owned(),
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    // A pipe or a device would be read for ever, or to the bound.
    if !meta.is_file() {
        return Err(ReplayError::NotHar {
            path: path.to_owned(),
            reason: "it is not a regular file (a pipe, a device or a directory)".into(),
        });
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(too_large());
    }
    // Read through a bound all the same: the file may grow after its size was read.
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(io)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(too_large());
    }
    String::from_utf8(bytes).map_err(|err| ReplayError::NotHar {
        path: path.to_owned(),
        reason: format!(
            "it is not UTF-8 text (at byte {})",
            err.utf8_error().valid_up_to()
        ),
    })
}

/// The recording in `text` as HAR, its entries kept as raw JSON to be read one by one (so
/// that one bad entry is skipped, not the file). A recording cut short by a crash is
/// mended into `repaired` and its whole entries replayed; one damaged before its end is
/// refused, naming the line.
fn parsed<'a>(
    path: &Path,
    text: &'a str,
    repaired: &'a mut Option<String>,
) -> Result<HarFile<'a>, ReplayError> {
    let not_har = |reason: String| ReplayError::NotHar {
        path: path.to_owned(),
        reason,
    };
    let err = match serde_json::from_str(text) {
        Ok(file) => return Ok(file),
        Err(err) => err,
    };
    if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() {
        return Err(not_har(format!(
            "it has no log.entries list, as HAR has ({err})"
        )));
    }
    let unreadable = || {
        not_har(format!(
            "line {}, column {}: {err}",
            err.line(),
            err.column()
        ))
    };
    let entries = match har::entry_lines(text) {
        None => return Err(unreadable()),
        Some((_, har::Ending::Damaged(line))) => {
            return Err(not_har(format!(
                "{}: mend or remove that line",
                har::damaged(line)
            )));
        }
        Some((entries, _)) => entries,
    };
    let mended: &'a str = repaired.insert(har::layout(entries));
    let file = serde_json::from_str(mended).map_err(|_| unreadable())?;
    tracing::warn!(file = %path.display(), "replay: the recording was cut short (a crash?); replaying its whole entries");
    Ok(file)
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

/// Whether a host is Desk's: one of the configured ones, or the Desk host of one of
/// Zoho's data centres.
pub(super) fn is_desk_host(host: &str, desk_hosts: &[String]) -> bool {
    desk_hosts.iter().any(|h| h.eq_ignore_ascii_case(host))
        || crate::config::DATA_CENTRES.iter().any(|(_, _, desk)| {
            desk.strip_prefix("https://")
                .is_some_and(|name| name.eq_ignore_ascii_case(host))
        })
}
