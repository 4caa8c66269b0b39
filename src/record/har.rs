//! HAR 1.2, the recording's format (what browsers' devtools export and HAR viewers open):
//! the entries the proxy writes and reads, and the file's layout.
//!
//! A recording is laid out one entry per line, so that it can grow by appending and a
//! file cut short by a crash can be repaired by keeping its whole lines:
//!
//! ```text
//! {"log":{"version":"1.2","creator":{"name":"zoho-desk-proxy",…},"pages":[],"entries":[
//! {…first entry…}
//! ,{…next entry…}
//! ]}}
//! ```
//!
//! Fields HAR has no place for start with `_`, as HAR allows: `_truncated` (a body longer
//! than `record.max_body_bytes`, or one whose end was not seen), `_encoding` (a binary request body, base64) and
//! `_requestId`.

use serde::{Deserialize, Serialize};

/// The creator name of recordings made by the proxy.
pub const CREATOR: &str = "zoho-desk-proxy";
/// The last line of a recording.
pub const TRAILER: &str = "]}}\n";

/// The first line of a recording (up to and with the opening of `entries`).
pub fn header() -> String {
    format!(
        "{{\"log\":{{\"version\":\"1.2\",\"creator\":{{\"name\":\"{CREATOR}\",\"version\":\"{}\"}},\"pages\":[],\"entries\":[\n",
        env!("CARGO_PKG_VERSION")
    )
}

/// One request and its answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Entry {
    /// When the request started (RFC 3339).
    pub started_date_time: String,
    /// Milliseconds from the request to the end of the answer.
    pub time: f64,
    /// The request as forwarded to Desk.
    pub request: Request,
    /// Desk's answer.
    pub response: Response,
    /// Nothing is cached.
    pub cache: serde_json::Map<String, serde_json::Value>,
    /// Where the time went.
    pub timings: Timings,
    /// The proxy's request id.
    #[serde(rename = "_requestId", skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// A header or a query parameter.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct NameValue {
    /// Its name.
    pub name: String,
    /// Its value.
    pub value: String,
}

/// A request.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Request {
    /// The method.
    pub method: String,
    /// The absolute URL, query included.
    pub url: String,
    /// `HTTP/1.1`.
    pub http_version: String,
    /// Never recorded (always empty).
    pub cookies: Vec<serde_json::Value>,
    /// The headers, secrets masked.
    pub headers: Vec<NameValue>,
    /// The query's parameters.
    pub query_string: Vec<NameValue>,
    /// Unknown (-1).
    pub headers_size: i64,
    /// The body's length in bytes (what was sent, not only what was recorded).
    pub body_size: i64,
    /// The body, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub post_data: Option<PostData>,
}

/// A request body.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PostData {
    /// Its content type.
    pub mime_type: String,
    /// The body (base64 when `_encoding` says so).
    pub text: String,
    /// `base64` for a body that is not UTF-8.
    #[serde(rename = "_encoding", skip_serializing_if = "Option::is_none")]
    pub encoding: Option<String>,
    /// Longer than `record.max_body_bytes`, or not seen to its end: only its start is
    /// here.
    #[serde(rename = "_truncated", skip_serializing_if = "is_false")]
    pub truncated: bool,
}

/// An answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The reason phrase.
    pub status_text: String,
    /// `HTTP/1.1`.
    pub http_version: String,
    /// Never recorded (always empty).
    pub cookies: Vec<serde_json::Value>,
    /// The headers, `Set-Cookie` left out.
    pub headers: Vec<NameValue>,
    /// The body.
    pub content: Content,
    /// The `Location` of a redirect.
    #[serde(rename = "redirectURL")]
    pub redirect_url: String,
    /// Unknown (-1).
    pub headers_size: i64,
    /// The body's length in bytes, as sent (compressed when it was).
    pub body_size: i64,
}

/// An answer's body.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Content {
    /// Its length in bytes.
    pub size: i64,
    /// Its content type.
    pub mime_type: String,
    /// The body (base64 when `encoding` says so); absent when empty.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// `base64` for a body that is not UTF-8 (compressed bodies included).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encoding: Option<String>,
    /// Longer than `record.max_body_bytes`, or not seen to its end: only its start is
    /// here.
    #[serde(rename = "_truncated", skip_serializing_if = "is_false")]
    pub truncated: bool,
}

/// Where an entry's time went, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Timings {
    /// Sending the request.
    pub send: f64,
    /// Waiting for the answer's head.
    pub wait: f64,
    /// Receiving the answer's body.
    pub receive: f64,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A body as HAR text: itself when it is UTF-8, else base64 (and `Some("base64")`).
pub fn body_text(bytes: &[u8]) -> (String, Option<String>) {
    use base64::Engine as _;
    match std::str::from_utf8(bytes) {
        Ok(text) => (text.to_owned(), None),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(bytes),
            Some("base64".to_owned()),
        ),
    }
}

/// A body from HAR text and its encoding.
pub fn body_bytes(text: &str, encoding: Option<&str>) -> Result<Vec<u8>, String> {
    use base64::Engine as _;
    match encoding {
        None | Some("") => Ok(text.as_bytes().to_vec()),
        Some(e) if e.eq_ignore_ascii_case("base64") => base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|err| format!("its base64 body does not decode: {err}")),
        Some(other) => Err(format!("unknown body encoding {other:?}")),
    }
}

/// How a recording's text laid out as the proxy writes it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// With [`TRAILER`].
    Whole,
    /// Cut short, as a crash leaves it: nothing whole after the last whole entry.
    Cut,
    /// A line that is not an entry (1-based), with whole entries or the trailer after it:
    /// not what a crash leaves, so not repaired by dropping what follows it.
    Damaged(usize),
}

/// What is wrong with a recording damaged at `line` (see [`Ending::Damaged`]).
pub fn damaged(line: usize) -> String {
    format!(
        "line {line} is not an entry, and whole entries follow it (a crash only ever cuts a recording's end; was it edited or merged?)"
    )
}

/// The whole entries of a recording's text laid out as the proxy writes it, and how it
/// ends. `None` when the text is not laid out that way (another program's HAR).
pub fn entry_lines(text: &str) -> Option<(Vec<&str>, Ending)> {
    let mut lines = text.split_inclusive('\n');
    let first = lines.next()?;
    if !first.starts_with("{\"log\":") || !first.contains(CREATOR) || !first.ends_with("[\n") {
        return None;
    }
    let mut entries = Vec::new();
    while let Some(line) = lines.next() {
        if line == TRAILER {
            return Some((entries, Ending::Whole));
        }
        match entry_of(line, entries.is_empty()) {
            Some(entry) => entries.push(entry),
            None => {
                // A crash leaves its cut at the end: anything whole after this line
                // means the file was damaged some other way.
                let damaged = lines.any(|later| {
                    later == TRAILER || entry_of(later, !later.starts_with(',')).is_some()
                });
                let ending = if damaged {
                    Ending::Damaged(entries.len() + 2)
                } else {
                    Ending::Cut
                };
                return Some((entries, ending));
            }
        }
    }
    Some((entries, Ending::Cut))
}

/// The entry a whole line holds (`{…}`, or `,{…}` after the first): an object with a
/// request and a response (a write cut after its first bytes may leave `,{}`). The file's
/// last line may lack its newline: a write cut just before it left the entry whole (no
/// shorter start of an entry is a whole object).
fn entry_of(line: &str, first: bool) -> Option<&str> {
    #[derive(serde::Deserialize)]
    struct Shape<'a> {
        #[serde(borrow)]
        #[allow(dead_code)]
        request: &'a serde_json::value::RawValue,
        #[serde(borrow)]
        #[allow(dead_code)]
        response: &'a serde_json::value::RawValue,
    }
    let body = line.strip_suffix('\n').unwrap_or(line);
    let body = if first { body } else { body.strip_prefix(',')? };
    serde_json::from_str::<Shape<'_>>(body)
        .is_ok()
        .then_some(body)
}

/// A recording's text with these entries.
pub fn layout<'a>(entries: impl IntoIterator<Item = &'a str>) -> String {
    let mut text = header();
    for (i, entry) in entries.into_iter().enumerate() {
        if i > 0 {
            text.push(',');
        }
        text.push_str(entry);
        text.push('\n');
    }
    text.push_str(TRAILER);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recording_is_valid_json_at_every_entry_and_repairs_when_cut() {
        let entries = [
            r#"{"request":{"a":1},"response":{}}"#,
            r#"{"request":{"b":"x\ny"},"response":{}}"#,
            r#"{"request":{"c":[1,2]},"response":{}}"#,
        ];
        let text = layout(entries);
        let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed["log"]["entries"].as_array().unwrap().len(), 3);
        assert_eq!(parsed["log"]["creator"]["name"], CREATOR);
        assert_eq!(entry_lines(&text), Some((entries.to_vec(), Ending::Whole)));
        // Cut anywhere: the whole entries before the cut are kept.
        for cut in header().len()..text.len() - TRAILER.len() {
            let (kept, ending) = entry_lines(&text[..cut]).unwrap();
            assert_eq!(ending, Ending::Cut, "cut at {cut}");
            assert!(kept.len() <= 3);
            assert_eq!(kept, entries[..kept.len()].to_vec(), "cut at {cut}");
            let repaired = layout(kept.iter().copied());
            assert!(serde_json::from_str::<serde_json::Value>(&repaired).is_ok());
        }
        // Cut just before an entry's newline: that entry is whole, and kept (an audit saw
        // it dropped).
        let third_end = text.len() - TRAILER.len() - 1;
        let (kept, ending) = entry_lines(&text[..third_end]).unwrap();
        assert_eq!((kept, ending), (entries.to_vec(), Ending::Cut));
        // A write cut after its first two bytes (`,{` then `}` of the trailer's place):
        // no entry.
        let junk = format!("{},{{}}\n", &text[..text.len() - TRAILER.len()]);
        assert_eq!(entry_lines(&junk), Some((entries.to_vec(), Ending::Cut)));
        assert_eq!(
            entry_lines(r#"{"log":{"creator":{"name":"Chrome"}}}"#),
            None
        );
    }

    #[test]
    fn damage_with_whole_entries_after_it_is_no_crash_s_cut() {
        let entries = [
            r#"{"request":{"a":1},"response":{}}"#,
            r#"{"request":{"b":2},"response":{}}"#,
            r#"{"request":{"c":3},"response":{}}"#,
        ];
        let text = layout(entries);
        let (b, c) = (format!(",{}", entries[1]), format!(",{}\n", entries[2]));
        let second = text.find(&b).unwrap();
        for damaged in [
            format!("{}<<<<<<< HEAD\n{}", &text[..second], &text[second..]),
            text.replacen(&b, &format!(",{b}"), 1),
            text.replacen(&c, "", 1)
                .replacen(entries[1], r#"{"request":{"b":"#, 1),
        ] {
            let (kept, ending) = entry_lines(&damaged).unwrap();
            assert_eq!(kept, entries[..1].to_vec(), "{damaged}");
            assert_eq!(ending, Ending::Damaged(3), "{damaged}");
        }
    }

    #[test]
    fn binary_bodies_go_as_base64_and_come_back() {
        let bytes = [0u8, 159, 146, 150, 255];
        let (text, encoding) = body_text(&bytes);
        assert_eq!(encoding.as_deref(), Some("base64"));
        assert_eq!(body_bytes(&text, encoding.as_deref()).unwrap(), bytes);
        assert_eq!(body_text(b"{\"a\":1}"), ("{\"a\":1}".to_owned(), None));
        assert!(body_bytes("!!", Some("base64")).is_err());
        assert!(body_bytes("x", Some("rot13")).is_err());
    }
}
