//! What a recording keeps of one exchange on its way through ([`Exchange`]: copies, made
//! on the request path), and the HAR entry the writer's thread makes of it: secrets
//! masked, bodies cut at `record.max_body_bytes`, timings.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, Method, StatusCode, Uri, header};

use super::har::{self, Entry, NameValue};
use super::scrub::{Scrubber, is_token};
use crate::body::{Captured, Decoded};
use crate::token::Token;

/// What the recording knows of a request body when the request is sent.
#[derive(Debug)]
pub enum RequestBodySeen {
    /// None.
    Empty,
    /// Read whole before it was sent.
    Whole(Bytes),
    /// The start of a body read whole, and its length.
    Cut(Bytes, u64),
    /// Streamed: its start is captured as it goes.
    Streamed(Arc<Captured>),
}

/// What is kept of one exchange on its way through, copied in as few allocations as it
/// can (a reference to the client's or Desk's bytes would pin hyper's read buffers),
/// and made into a HAR entry by the writer.
#[derive(Debug)]
pub(super) struct Exchange {
    pub(super) started: Instant,
    pub(super) started_at: SystemTime,
    /// When the answer's head came.
    pub(super) answered: Option<Instant>,
    pub(super) ended: Option<Instant>,
    pub(super) method: Method,
    pub(super) url: Uri,
    /// `name:value` lines, secrets left out.
    pub(super) request_headers: String,
    pub(super) request_id: String,
    pub(super) request_body: RequestBodySeen,
    /// The tokens the request may have been sent with: masked wherever they appear.
    pub(super) tokens: Vec<Arc<Token>>,
    pub(super) status: StatusCode,
    /// `name:value` lines, `Set-Cookie` left out.
    pub(super) response_headers: String,
    /// The answer's body, up to the recording's limit.
    pub(super) body: Vec<u8>,
    pub(super) body_total: u64,
    /// The answer's body was seen to its end (not cut off by Desk, the client leaving or
    /// a timeout).
    pub(super) body_complete: bool,
}

impl Exchange {
    /// The bytes it holds, near enough (for the queue's budget).
    pub(super) fn size(&self) -> u64 {
        let request_body = match &self.request_body {
            RequestBodySeen::Empty | RequestBodySeen::Streamed(_) => 0,
            RequestBodySeen::Whole(bytes) | RequestBodySeen::Cut(bytes, _) => bytes.len(),
        };
        // A streamed body's start is held by its `Captured` until the writer takes it;
        // it counts as the most it can be.
        let captured = match &self.request_body {
            RequestBodySeen::Streamed(captured) => captured.max(),
            _ => 0,
        };
        (self.request_headers.len()
            + self.response_headers.len()
            + self.body.capacity()
            + request_body
            + captured
            + 512) as u64
    }

    /// The HAR entry, secrets masked (by `scrub`, the configuration's, and the
    /// request's tokens), bodies cut at `max_body`.
    pub(super) fn into_entry(self, max_body: usize, scrub: &Scrubber) -> Entry {
        // Zoho's tokens are masked by their shape: only another token needs a search of
        // its own (built per entry, on the writer's thread).
        let own;
        let scrub = if self
            .tokens
            .iter()
            .all(|t| is_token(t.access_token.expose().as_bytes()))
        {
            scrub
        } else {
            own = scrub.with(self.tokens.iter().map(|t| &t.access_token));
            &own
        };
        let masked = |pairs: Vec<NameValue>| -> Vec<NameValue> {
            pairs
                .into_iter()
                .map(|pair| NameValue {
                    name: scrub.text(pair.name),
                    value: scrub.text(pair.value),
                })
                .collect()
        };
        let mut request_headers = masked(unflatten(&self.request_headers));
        request_headers.push(NameValue {
            name: "authorization".into(),
            value: "Zoho-oauthtoken ***".into(),
        });
        // Each name and value masked as written, then decoded and masked again: decoded,
        // a secret with a `+` reads with a space (and no longer as the secret), and one
        // written all in escapes reads plain.
        let decoded = |raw: &str| {
            let text = scrub.text(raw.to_owned());
            // As a form decodes it: `+` is a space, then the escapes.
            let text = percent_encoding::percent_decode_str(&text.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned();
            scrub.text(text)
        };
        let query_string = self
            .url
            .query()
            .map(|q| {
                q.split('&')
                    .filter(|pair| !pair.is_empty())
                    .map(|pair| {
                        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                        NameValue {
                            name: decoded(name),
                            value: decoded(value),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        let (bytes, total, complete) = match &self.request_body {
            RequestBodySeen::Empty => (Vec::new(), 0, true),
            RequestBodySeen::Whole(bytes) => (
                bytes[..bytes.len().min(max_body)].to_vec(),
                bytes.len() as u64,
                true,
            ),
            RequestBodySeen::Cut(start, total) => (start.to_vec(), *total, true),
            RequestBodySeen::Streamed(captured) => {
                let seen = captured.taken();
                (seen.start, seen.total, seen.complete)
            }
        };
        // Longer than kept, or not seen to its end (Desk answered first).
        let mut truncated = total > bytes.len() as u64 || !complete;
        let bytes =
            match unmasked_in_compressed(&self.request_headers, &bytes, truncated, max_body, scrub)
            {
                // A secret inside a compressed body: recorded decoded, and masked.
                Some((plain, cut)) => {
                    without_encoding(&mut request_headers);
                    truncated |= cut;
                    plain
                }
                None => scrub.bytes(bytes, truncated),
            };
        let post_data = (total > 0).then(|| {
            let (text, encoding) = har::body_text(&bytes);
            har::PostData {
                mime_type: flattened_value(&self.request_headers, "content-type"),
                text,
                encoding,
                truncated,
            }
        });
        let request = har::Request {
            method: self.method.as_str().to_owned(),
            url: scrub.text(self.url.to_string()),
            http_version: "HTTP/1.1".into(),
            headers: request_headers,
            query_string,
            headers_size: -1,
            body_size: i64::try_from(total).unwrap_or(i64::MAX),
            post_data,
            ..har::Request::default()
        };

        // Longer than kept, or cut off before its end: replay must not take a broken
        // answer for a whole one.
        let mut truncated = self.body_total > self.body.len() as u64 || !self.body_complete;
        let mut response_headers = masked(unflatten(&self.response_headers));
        let body = match unmasked_in_compressed(
            &self.response_headers,
            &self.body,
            truncated,
            max_body,
            scrub,
        ) {
            // A secret inside a compressed body: recorded decoded, and masked.
            Some((plain, cut)) => {
                without_encoding(&mut response_headers);
                truncated |= cut;
                plain
            }
            None => scrub.bytes(self.body, truncated),
        };
        let (text, encoding) = if body.is_empty() {
            (None, None)
        } else {
            let (text, encoding) = har::body_text(&body);
            (Some(text), encoding)
        };
        let size = i64::try_from(self.body_total).unwrap_or(i64::MAX);
        let response = har::Response {
            status: self.status.as_u16(),
            status_text: self.status.canonical_reason().unwrap_or_default().into(),
            http_version: "HTTP/1.1".into(),
            headers: response_headers,
            content: har::Content {
                size,
                mime_type: flattened_value(&self.response_headers, "content-type"),
                text,
                encoding,
                truncated,
            },
            redirect_url: scrub.text(flattened_value(&self.response_headers, "location")),
            headers_size: -1,
            body_size: size,
            ..har::Response::default()
        };
        let ended = self.ended.unwrap_or_else(Instant::now);
        let answered = self.answered.unwrap_or(ended);
        let ms = |from: Instant, to: Instant| to.duration_since(from).as_secs_f64() * 1000.0;
        Entry {
            started_date_time: rfc3339(self.started_at),
            time: ms(self.started, ended),
            request,
            response,
            cache: serde_json::Map::new(),
            timings: har::Timings {
                send: 0.0,
                wait: ms(self.started, answered),
                receive: ms(answered, ended),
            },
            // The client's, when it sent one: it could carry anything.
            request_id: Some(scrub.text(self.request_id)),
        }
    }
}

/// `headers` as `name:value` lines, leaving out those `skip` names: one allocation.
pub(super) fn flatten(headers: &HeaderMap, skip: impl Fn(&HeaderName) -> bool) -> String {
    let mut lines = String::with_capacity(
        headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 2)
            .sum(),
    );
    for (name, value) in headers.iter().filter(|(name, _)| !skip(name)) {
        lines.push_str(name.as_str());
        lines.push(':');
        // A header value never holds a line break.
        lines.push_str(&String::from_utf8_lossy(value.as_bytes()));
        lines.push('\n');
    }
    lines
}

/// [`flatten`]'s lines as HAR's name-value pairs.
fn unflatten(lines: &str) -> Vec<NameValue> {
    lines
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| NameValue {
            name: name.to_owned(),
            value: value.to_owned(),
        })
        .collect()
}

/// The first value of `name` in [`flatten`]'s lines, or "".
fn flattened_value(lines: &str, name: &str) -> String {
    lines
        .lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(n, _)| *n == name)
        .map(|(_, value)| value.to_owned())
        .unwrap_or_default()
}

/// A compressed body (by its `Content-Encoding`), decoded and masked, when its compressed
/// bytes may hold a secret (they cannot be searched as they are): when what they decode
/// to holds one, or ends in the start of one (`cut`: the body was cut at the recording's
/// limit, and a cut compressed body still decodes up to its cut), or decodes to more than
/// the limit (what lies beyond was not searched). `None` when it is not compressed, holds
/// none, or cannot be decoded (its bytes are then searched as they are).
///
/// With the decoded body, whether it is cut short (at the recording's limit, or where its
/// compressed bytes stopped): a recording marks it truncated.
fn unmasked_in_compressed(
    headers: &str,
    body: &[u8],
    cut: bool,
    max_body: usize,
    scrub: &Scrubber,
) -> Option<(Vec<u8>, bool)> {
    let encoding = flattened_value(headers, "content-encoding");
    if encoding.is_empty() {
        return None;
    }
    let (plain, how) = crate::body::decoded_prefix(&encoding, body, max_body)?;
    let cut = cut || how != Decoded::Whole;
    if how == Decoded::Capped || scrub.finds(&plain) {
        return Some((scrub.bytes(plain, cut), cut));
    }
    if !cut {
        return None;
    }
    // A secret's start at the cut, which no search finds (nothing else is there to mask).
    let mut plain = plain;
    scrub.mask_cut_start(&mut plain).then_some((plain, true))
}

/// Headers less what no longer describes a body recorded decoded.
fn without_encoding(headers: &mut Vec<NameValue>) {
    headers.retain(|h| {
        !h.name.eq_ignore_ascii_case("content-encoding")
            && !h.name.eq_ignore_ascii_case("content-length")
    });
}

/// The client's credentials, and a `Set-Cookie` a client sent (meaningless in a request,
/// so forwarded as any header, but a cookie all the same).
pub(super) fn is_never_recorded_in_a_request(name: &HeaderName) -> bool {
    crate::headers::is_client_credential(name) || is_cookie_answer_header(name)
}

/// Cookies Desk sets: never recorded (`Set-Cookie2` is obsolete, but a cookie all the
/// same).
pub(super) fn is_cookie_answer_header(name: &HeaderName) -> bool {
    name == header::SET_COOKIE || name.as_str() == "set-cookie2"
}

/// `at` as RFC 3339 with milliseconds (HAR's `startedDateTime`).
fn rfc3339(at: SystemTime) -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::from(at)
        .format(&format)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    #[test]
    fn a_secret_in_a_compressed_answer_is_recorded_decoded_and_masked() {
        use std::io::Write;
        let secrets = [Secret::new("client-secret-xyz".to_owned())];
        let scrub = Scrubber::new(&secrets);
        let gzip = |text: &[u8]| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), Default::default());
            e.write_all(text).unwrap();
            e.finish().unwrap()
        };
        let headers = "content-type:application/json\ncontent-encoding:gzip\n";
        let leaking = gzip(br#"{"echo":"client-secret-xyz"}"#);
        assert_eq!(
            unmasked_in_compressed(headers, &leaking, false, 1 << 20, &scrub),
            Some((br#"{"echo":"***"}"#.to_vec(), false))
        );
        // Nothing to mask, or not compressed: the body stays as Desk sent it.
        let clean = gzip(br#"{"echo":"nothing"}"#);
        assert_eq!(
            unmasked_in_compressed(headers, &clean, false, 1 << 20, &scrub),
            None
        );
        let plain = br#"{"echo":"client-secret-xyz"}"#;
        assert_eq!(
            unmasked_in_compressed(
                "content-type:application/json\n",
                plain,
                false,
                1 << 20,
                &scrub
            ),
            None
        );
    }

    #[test]
    fn a_compressed_body_cut_at_the_limit_is_searched_as_far_as_it_decodes() {
        use std::io::Write;
        let secrets = [Secret::new("client-secret-xyz".to_owned())];
        let scrub = Scrubber::new(&secrets);
        let noise: String = (0..100_000u32).map(|i| format!("{:x}", i * 7919)).collect();
        let gzip = |text: &str| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), Default::default());
            e.write_all(text.as_bytes()).unwrap();
            e.finish().unwrap()
        };
        let headers = "content-encoding:gzip\n";
        // The secret at the start, the body cut at half its compressed bytes (an audit
        // decoded the token out of such a recording).
        let leaking = gzip(&format!(
            "{{\"echo\":\"client-secret-xyz\",\"pad\":\"{noise}\"}}"
        ));
        let cut = &leaking[..leaking.len() / 2];
        let (plain, cut) = unmasked_in_compressed(headers, cut, true, 1 << 20, &scrub).unwrap();
        assert!(plain.starts_with(br#"{"echo":"***","pad":""#));
        assert!(cut);
        // Nothing in it: kept as Desk sent it.
        let clean = gzip(&noise);
        assert_eq!(
            unmasked_in_compressed(headers, &clean[..clean.len() / 2], true, 1 << 20, &scrub),
            None
        );
        // Decoding to more than the limit: what lies beyond was not searched, so the
        // decoded start is recorded instead, marked truncated (replay must not take it for
        // a whole answer).
        let (capped, cut) = unmasked_in_compressed(headers, &clean, false, 1000, &scrub).unwrap();
        assert_eq!((capped.len(), cut), (1000, true));
    }

    #[test]
    fn a_secret_in_the_query_is_masked_in_the_query_string_too() {
        // Keys made by `openssl rand -base64` hold `+`: decoded, it reads as a space, and
        // the query string had kept "Key/With Plus=001" (audit). One written all in
        // escapes reads plain once decoded.
        let secrets = [Secret::new("Key/With+Plus=001".to_owned())];
        let scrub = Scrubber::new(&secrets);
        let now = Instant::now();
        let exchange = Exchange {
            started: now,
            started_at: SystemTime::now(),
            answered: Some(now),
            ended: Some(now),
            method: Method::GET,
            url: "https://desk.zoho.com/api/v1/echo?pk=Key/With+Plus=001&k=%4B%65%79%2F%57%69%74%68%2B%50%6C%75%73%3D%30%30%31&plain=a+b"
                .parse()
                .unwrap(),
            request_headers: String::new(),
            request_id: "id".into(),
            request_body: RequestBodySeen::Empty,
            tokens: Vec::new(),
            status: StatusCode::OK,
            response_headers: String::new(),
            body: Vec::new(),
            body_total: 0,
            body_complete: true,
        };
        let entry = exchange.into_entry(1 << 20, &scrub);
        let pairs: Vec<(&str, &str)> = entry
            .request
            .query_string
            .iter()
            .map(|p| (p.name.as_str(), p.value.as_str()))
            .collect();
        assert_eq!(pairs, [("pk", "***"), ("k", "***"), ("plain", "a b")]);
    }

    #[test]
    fn no_cookie_or_key_header_is_recorded() {
        let mut answer = HeaderMap::new();
        for (name, value) in [
            ("set-cookie", "a=1"),
            ("set-cookie2", "b=2; Version=1"),
            ("x-rate-limit-remaining", "9"),
        ] {
            answer.append(HeaderName::from_static(name), value.parse().unwrap());
        }
        assert_eq!(
            flatten(&answer, is_cookie_answer_header),
            "x-rate-limit-remaining:9\n"
        );
        let mut request = HeaderMap::new();
        for name in [
            "authorization",
            "cookie",
            "cookie2",
            "proxy-authorization",
            "x-proxy-key",
            "set-cookie",
            "accept",
        ] {
            request.append(HeaderName::from_static(name), "v".parse().unwrap());
        }
        assert_eq!(
            flatten(&request, is_never_recorded_in_a_request),
            "accept:v\n"
        );
    }
}
