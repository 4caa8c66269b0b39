//! Property tests of the forwarding rules (README "How requests are forwarded" and
//! "Security model"): which request targets may be forwarded and in which canonical form
//! (`target::resolve`, `paths`), which of them the path rules let through
//! (`access::AccessPolicy`), and which headers reach Desk (`headers::prepare_request`).
//!
//! Each property runs proptest's default 256 cases; `.ci/run` runs them with
//! `PROPTEST_CASES=20000` as a bounded fuzz run of the request-target parser and the path
//! normaliser.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use http::{HeaderMap, HeaderName, HeaderValue, Request, Uri, Version};
use proptest::prelude::*;
use proptest::sample::select;
use zoho_desk_proxy::config::Config;
use zoho_desk_proxy::rules::{
    AccessPolicy, canonicalize, check_path, prepare_request, resolve, rule_form,
};
use zoho_desk_proxy::{BaseUrl, ProxyError};

const UPSTREAM: &str = "https://desk.zoho.com";

fn upstream() -> BaseUrl {
    BaseUrl::parse(UPSTREAM).expect("upstream")
}

fn resolve_target(
    target: &str,
    version: Version,
) -> Result<zoho_desk_proxy::rules::Target, ProxyError> {
    let uri: Uri = target
        .parse()
        .unwrap_or_else(|e| panic!("{target:?} is a valid request target: {e}"));
    resolve(&uri, version, &upstream())
}

// ---------------------------------------------------------------------------------------
// Paths

/// `%XX` with a random case of the hex digits.
fn pct(byte: u8, upper: bool) -> String {
    if upper {
        format!("%{byte:02X}")
    } else {
        format!("%{byte:02x}")
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Bytes whose escape is refused: they would be a separator or a terminator once decoded.
const REFUSED_ESCAPES: [u8; 4] = [0, b'/', b'\\', b';'];

/// One canonical piece of a segment that is never refused: an unreserved character, a
/// sub-delimiter other than `;`, or an upper-case escape of a byte that must stay encoded.
fn safe_atom() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => "[A-Za-z0-9_~-]",
        2 => Just(".".to_owned()),
        2 => "[!$&'()*+,=:@]",
        2 => any::<u8>()
            .prop_filter("unreserved or refused", |b| {
                !is_unreserved(*b) && !REFUSED_ESCAPES.contains(b)
            })
            .prop_map(|b| pct(b, true)),
    ]
}

/// A non-empty canonical segment that is not a dot-segment (`..x`, `...`, `a.b` are fine).
fn safe_segment() -> impl Strategy<Value = String> {
    prop::collection::vec(safe_atom(), 1..8)
        .prop_map(|atoms| atoms.concat())
        .prop_filter("a dot-segment", |s| s != "." && s != "..")
}

fn safe_segments(range: std::ops::Range<usize>) -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(safe_segment(), range)
}

/// An optional query: anything goes there, dots, slashes, `;` and escapes included.
fn query() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[A-Za-z0-9._~!$&'()*+,;=:@/?-]{0,24}".prop_map(|q| format!("?{q}")),
        Just("?q=../..//%2e%2E/./;%00%2f".to_owned()),
    ]
}

/// `.` written as is or percent-encoded in either case.
fn dot() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(".".to_owned()),
        Just("%2e".to_owned()),
        Just("%2E".to_owned())
    ]
}

/// `.` or `..`, each dot possibly encoded.
fn dots() -> impl Strategy<Value = String> {
    prop_oneof![dot(), (dot(), dot()).prop_map(|(a, b)| format!("{a}{b}"))]
}

/// A byte sequence that is refused wherever it stands in a path.
fn refused_piece() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(";".to_owned()),
        Just(";x=1".to_owned()),
        Just("..;".to_owned()),
        Just("\\".to_owned()),
        (select(REFUSED_ESCAPES.to_vec()), any::<bool>()).prop_map(|(b, upper)| pct(b, upper)),
        // Malformed escapes (whatever follows them).
        "%[g-zG-Z]",
        "%[0-9a-fA-F][g-zG-Z]",
    ]
}

/// `/` + segments, with an optional trailing `/`.
fn join(segments: &[String], trailing_slash: bool) -> String {
    let mut path = format!("/{}", segments.join("/"));
    if trailing_slash && !segments.is_empty() {
        path.push('/');
    }
    path
}

/// Another spelling of a canonical path that means the same to Desk: some unreserved
/// characters percent-encoded (either hex case), some escapes written in lower case.
fn respell(path: &str, choices: &[u8]) -> String {
    let mut out = String::new();
    let bytes = path.as_bytes();
    let mut i = 0;
    let mut choice = choices.iter().cycle();
    while i < bytes.len() {
        let c = *choice.next().unwrap_or(&0);
        if bytes[i] == b'%' {
            let escape = &path[i..i + 3];
            out.push_str(&if c.is_multiple_of(2) {
                escape.to_ascii_lowercase()
            } else {
                escape.to_owned()
            });
            i += 3;
        } else {
            let b = bytes[i];
            if is_unreserved(b) && c.is_multiple_of(3) {
                out.push_str(&pct(b, c.is_multiple_of(2)));
            } else {
                out.push(b as char);
            }
            i += 1;
        }
    }
    out
}

/// What the proxy forwards of a spelling: its escapes of unreserved characters decoded,
/// the other escapes as written.
fn decoded_unreserved(spelled: &str) -> String {
    let mut out = String::new();
    let mut rest = spelled;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let escape = &rest[at..at + 3];
        match u8::from_str_radix(&escape[1..], 16) {
            Ok(b) if is_unreserved(b) => out.push(b as char),
            _ => out.push_str(escape),
        }
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    out
}

fn assert_bad_request(result: Result<impl std::fmt::Debug, ProxyError>, what: &str) {
    match result {
        Err(err) => {
            assert_eq!(err.code(), "PROXY_BAD_REQUEST", "{what}: {err}");
            assert_eq!(err.status(), 400, "{what}");
        }
        Ok(ok) => panic!("{what} was accepted: {ok:?}"),
    }
}

proptest! {
    /// A path with a dot-segment, however it is encoded, is refused with 400
    /// PROXY_BAD_REQUEST, in origin-form, absolute-form and over h2.
    #[test]
    fn dot_segments_are_refused(
        before in safe_segments(0..4),
        dotted in dots(),
        after in safe_segments(0..4),
        trailing_slash in any::<bool>(),
        query in query(),
    ) {
        let mut segments = before;
        segments.push(dotted);
        segments.extend(after);
        let path = join(&segments, trailing_slash);
        assert_bad_request(check_path(&path), &path);
        let target = format!("{path}{query}");
        assert_bad_request(resolve_target(&target, Version::HTTP_11), &target);
        assert_bad_request(resolve_target(&target, Version::HTTP_2), &target);
        let absolute = format!("{UPSTREAM}{target}");
        assert_bad_request(resolve_target(&absolute, Version::HTTP_11), &absolute);
    }

    /// `;`, `\`, `%00`, `%2F`, `%5C`, `%3B` and malformed escapes are refused anywhere in
    /// a path.
    #[test]
    fn separators_and_parameters_are_refused_anywhere(
        segments in safe_segments(1..5),
        at in any::<prop::sample::Index>(),
        offset in any::<prop::sample::Index>(),
        piece in refused_piece(),
        query in query(),
    ) {
        let mut segments = segments;
        let i = at.index(segments.len());
        let segment = &mut segments[i];
        // Between two atoms: never inside an escape.
        let cut = (0..=segment.len())
            .filter(|&c| segment.is_char_boundary(c) && !segment[..c].ends_with('%')
                && !(c >= 2 && segment.as_bytes()[c - 2] == b'%'))
            .collect::<Vec<_>>();
        let cut = cut[offset.index(cut.len())];
        segment.insert_str(cut, &piece);
        let path = join(&segments, false);
        let target = format!("{path}{query}");
        assert_bad_request(resolve_target(&target, Version::HTTP_11), &target);
        assert_bad_request(resolve_target(&target, Version::HTTP_2), &target);
    }

    /// An empty segment (`//`) anywhere in the path is refused with 400.
    #[test]
    fn empty_segments_are_refused(
        segments in safe_segments(1..6),
        at in any::<prop::sample::Index>(),
        query in query(),
    ) {
        // An empty segment before any of the segments, or a trailing `//`.
        let mut segments = segments;
        let at = at.index(segments.len() + 1);
        let path = if at < segments.len() {
            segments.insert(at, String::new());
            join(&segments, false)
        } else {
            join(&segments, true) + "/"
        };
        assert_bad_request(check_path(&path), &path);
        // `//x` would be read as a scheme-relative authority; the proxy's HTTP server
        // only ever hands an origin-form path here.
        if !path.starts_with("//") {
            let target = format!("{path}{query}");
            assert_bad_request(resolve_target(&target, Version::HTTP_11), &target);
        }
    }

    /// A canonical path is accepted and forwarded byte for byte, with its query, in
    /// origin-form, absolute-form and over h2.
    #[test]
    fn canonical_paths_are_kept_byte_for_byte(
        segments in safe_segments(0..6),
        trailing_slash in any::<bool>(),
        query in query(),
    ) {
        let path = join(&segments, trailing_slash);
        prop_assert!(check_path(&path).is_ok(), "{path}: {:?}", check_path(&path));
        let target_text = format!("{path}{query}");

        let target = resolve_target(&target_text, Version::HTTP_11)
            .unwrap_or_else(|e| panic!("{target_text}: {e}"));
        prop_assert_eq!(&target.path_and_query, &target_text);
        prop_assert_eq!(target.path(), path.as_str());
        prop_assert!(!target.absolute_form);

        let target = resolve_target(&format!("{UPSTREAM}{target_text}"), Version::HTTP_11)
            .unwrap_or_else(|e| panic!("absolute {target_text}: {e}"));
        prop_assert_eq!(&target.path_and_query, &target_text);
        prop_assert!(target.absolute_form);

        // Over h2 every request has an authority; it is not absolute-form.
        let target = resolve_target(&format!("http://127.0.0.1:8080{target_text}"), Version::HTTP_2)
            .unwrap_or_else(|e| panic!("h2 {target_text}: {e}"));
        prop_assert_eq!(&target.path_and_query, &target_text);
        prop_assert!(!target.absolute_form);
    }

    /// Every spelling of a path that means the same to Desk is forwarded with its
    /// unreserved characters decoded and its other escapes as written, which the rules see
    /// as the one canonical path (an escape's hex digits in any case are one character),
    /// the query untouched.
    #[test]
    fn every_spelling_is_forwarded_canonical(
        segments in safe_segments(0..6),
        trailing_slash in any::<bool>(),
        choices in prop::collection::vec(any::<u8>(), 1..16),
        query in query(),
    ) {
        let path = join(&segments, trailing_slash);
        let spelled = respell(&path, &choices);
        let target = resolve_target(&format!("{spelled}{query}"), Version::HTTP_11)
            .unwrap_or_else(|e| panic!("{spelled}: {e}"));
        prop_assert_eq!(
            target.path_and_query.as_str(),
            format!("{}{query}", decoded_unreserved(&spelled))
        );
        prop_assert_eq!(rule_form(target.path()), rule_form(&path));
        // Canonical is a fixed point.
        let again = canonicalize(target.path()).expect("canonical");
        prop_assert_eq!(again.as_ref(), target.path());
    }

    /// Absolute-form requests go to the upstream's host (any case, no port or its port)
    /// and nowhere else: 403 PROXY_FORBIDDEN.
    #[test]
    fn absolute_form_only_names_the_upstream(
        host in prop_oneof![
            "[a-z][a-z0-9-]{0,12}(\\.[a-z][a-z0-9-]{0,12}){0,3}",
            Just("desk.zoho.com.evil.example".to_owned()),
            Just("evil.desk.zoho.com".to_owned()),
            Just("desk.zoho.co".to_owned()),
            Just("127.0.0.1".to_owned()),
        ],
        upstream_case in prop::collection::vec(any::<bool>(), 13),
        port in prop_oneof![Just(None), Just(Some(443u16)), any::<u16>().prop_map(Some)],
        segments in safe_segments(1..4),
    ) {
        let path = join(&segments, false);
        let port_text = port.map_or(String::new(), |p| format!(":{p}"));
        prop_assume!(!host.eq_ignore_ascii_case("desk.zoho.com"));
        let foreign = format!("http://{host}{port_text}{path}");
        match resolve_target(&foreign, Version::HTTP_11) {
            Err(err) => prop_assert_eq!(err.code(), "PROXY_FORBIDDEN", "{}: {}", foreign, err),
            Ok(t) => prop_assert!(false, "{} was accepted: {:?}", foreign, t),
        }

        let upstream_host: String = "desk.zoho.com"
            .chars()
            .zip(upstream_case)
            .map(|(c, up)| if up { c.to_ascii_uppercase() } else { c })
            .collect();
        let ours = format!("http://{upstream_host}{port_text}{path}");
        let result = resolve_target(&ours, Version::HTTP_11);
        if port.is_none_or(|p| p == 443) {
            let target = result.unwrap_or_else(|e| panic!("{ours}: {e}"));
            prop_assert_eq!(&target.path_and_query, &path);
            prop_assert!(target.absolute_form);
        } else {
            prop_assert_eq!(result.map_err(|e| e.code()).unwrap_err(), "PROXY_FORBIDDEN");
        }
    }

    /// The request-target parser never panics on any target http accepts, and what it
    /// forwards is canonical.
    #[test]
    fn resolve_is_total(
        target in prop_oneof![
            "/[ -~]{0,40}",
            "https?://[a-zA-Z0-9.:@\\[\\]-]{0,20}/[ -~]{0,20}",
            "[ -~]{0,40}",
        ],
        h2 in any::<bool>(),
    ) {
        if let Ok(uri) = target.parse::<Uri>() {
            let version = if h2 { Version::HTTP_2 } else { Version::HTTP_11 };
            if let Ok(t) = resolve(&uri, version, &upstream()) {
                let canonical = canonicalize(t.path()).expect("forwarded paths are canonical");
                prop_assert_eq!(canonical.as_ref(), t.path());
            }
        }
    }

    /// The strict host parser never panics, and a name it accepts has no userinfo, no
    /// path and a numeric port at most.
    #[test]
    fn host_parser_is_total(value in "[ -~]{0,30}") {
        if let Ok(name) = zoho_desk_proxy::rules::host_name(&value) {
            prop_assert!(!name.contains(['@', '/', ' ', '?', '#']), "{}", name);
        }
    }

    /// The path checks never panic, and what they accept has the shape they promise.
    #[test]
    fn check_path_is_total(path in any::<String>()) {
        if let Ok(canonical) = canonicalize(&path) {
            prop_assert!(canonical.starts_with('/'));
            prop_assert!(!canonical.contains("//"));
            prop_assert!(!canonical.contains(';'));
            prop_assert!(canonical.bytes().all(|b| (0x21..=0x7e).contains(&b)));
            prop_assert!(check_path(&path).is_ok());
        }
    }
}

// ---------------------------------------------------------------------------------------
// Path rules

/// A rule segment: a literal, `*` (one segment) or `**` (one or more segments).
#[derive(Debug, Clone)]
enum RuleSeg {
    Literal(String),
    Star,
    Many,
}

fn rule_segment() -> impl Strategy<Value = RuleSeg> {
    prop_oneof![
        4 => "[a-z][a-z0-9]{0,7}".prop_map(RuleSeg::Literal),
        1 => Just(RuleSeg::Star),
        1 => Just(RuleSeg::Many),
    ]
}

fn rule_text(rule: &[RuleSeg]) -> String {
    let mut text = String::new();
    for seg in rule {
        text.push('/');
        text.push_str(match seg {
            RuleSeg::Literal(l) => l,
            RuleSeg::Star => "*",
            RuleSeg::Many => "**",
        });
    }
    text
}

/// A path the rule covers: each `*` filled with a segment, each `**` with one to three,
/// then zero to two segments below.
fn covered_path(rule: Vec<RuleSeg>) -> impl Strategy<Value = Vec<String>> {
    let parts: Vec<BoxedStrategy<Vec<String>>> = rule
        .into_iter()
        .map(|seg| match seg {
            RuleSeg::Literal(l) => Just(vec![l]).boxed(),
            RuleSeg::Star => safe_segment().prop_map(|s| vec![s]).boxed(),
            RuleSeg::Many => safe_segments(1..4).boxed(),
        })
        .collect();
    (parts, safe_segments(0..3))
        .prop_map(|(parts, below)| parts.into_iter().flatten().chain(below).collect())
}

/// The policy of a proxy with one deny rule.
fn deny_policy(rule: &str) -> AccessPolicy {
    let config = Config::from_toml(&format!(
        "[oauth]\nclient_id = \"i\"\nclient_secret = \"s\"\n[access]\ndeny_paths = [{rule:?}]\n"
    ))
    .expect("config");
    AccessPolicy::new(&config.access, config.listen)
}

/// What the proxy does with a GET of `target`: `Ok(forwarded path)`, or the refusal.
fn verdict(policy: &AccessPolicy, target: &str) -> Result<String, ProxyError> {
    let t = resolve_target(target, Version::HTTP_11)?;
    let request = Request::get(target)
        .header("host", "127.0.0.1")
        .body(())
        .expect("request");
    let peer: SocketAddr = "127.0.0.1:40000".parse().expect("peer");
    policy.check(&request, peer, &t)?;
    Ok(t.path().to_owned())
}

/// Random letters of `text` in upper case (escapes keep their meaning in any case).
fn recase(text: &str, choices: &[bool]) -> String {
    text.chars()
        .zip(choices.iter().cycle())
        .map(|(c, up)| if *up { c.to_ascii_uppercase() } else { c })
        .collect()
}

proptest! {
    /// A path a deny rule covers is never forwarded, however it is spelled: encoded
    /// unreserved characters, any letter case, a trailing `/`, segments below it, path
    /// parameters or dot-segments (those are refused outright).
    #[test]
    fn a_denied_path_is_never_forwarded_in_any_spelling(
        (rule, segments) in prop::collection::vec(rule_segment(), 1..5)
            .prop_flat_map(|rule| (Just(rule.clone()), covered_path(rule))),
        trailing_slash in any::<bool>(),
        encodings in prop::collection::vec(any::<u8>(), 1..16),
        cases in prop::collection::vec(any::<bool>(), 1..16),
        trick in prop_oneof![
            4 => Just(String::new()),
            1 => Just(";x=1".to_owned()),
            1 => Just("/..;/x".to_owned()),
            1 => Just("/%2e%2e/x".to_owned()),
            1 => Just("/./x".to_owned()),
        ],
        query in query(),
    ) {
        let rule_text = rule_text(&rule);
        let policy = deny_policy(&rule_text);
        let path = join(&segments, trailing_slash);
        let spelled = format!("{}{trick}{query}", recase(&respell(&path, &encodings), &cases));
        // Upper-casing an escape's letters keeps its meaning; upper-casing other letters
        // changes the path, which a deny rule still covers (deny rules ignore case).
        match verdict(&policy, &spelled) {
            Ok(forwarded) => prop_assert!(
                false,
                "{} forwarded as {} despite deny rule {}", spelled, forwarded, rule_text
            ),
            Err(err) => prop_assert!(
                matches!(err.code(), "PROXY_FORBIDDEN" | "PROXY_BAD_REQUEST"),
                "{}: {}", spelled, err
            ),
        }
    }

    /// Allow rules compare letters exactly and cover what is below them: a path under an
    /// allowed prefix is forwarded in any spelling of its unreserved characters; the same
    /// path in upper case is not.
    #[test]
    fn allow_rules_are_exact_and_cover_what_is_below(
        prefix in prop::collection::vec("[a-z0-9_~-]{1,8}", 1..3),
        below in safe_segments(0..3),
        encodings in prop::collection::vec(any::<u8>(), 1..16),
    ) {
        let rule = join(&prefix, false);
        let config = Config::from_toml(&format!(
            "[oauth]\nclient_id = \"i\"\nclient_secret = \"s\"\n[access]\nallow_paths = [{rule:?}]\n"
        ))
        .expect("config");
        let policy = AccessPolicy::new(&config.access, config.listen);
        let mut all = prefix.clone();
        all.extend(below);
        let path = join(&all, false);
        let spelled = respell(&path, &encodings);
        let forwarded = verdict(&policy, &spelled)
            .unwrap_or_else(|e| panic!("{spelled} under {rule}: {e}"));
        prop_assert_eq!(forwarded, decoded_unreserved(&spelled));
        let upper = path.to_ascii_uppercase();
        if canonicalize(&upper).is_ok_and(|u| !u.starts_with(rule.as_str())) {
            let refused = verdict(&policy, &upper);
            prop_assert!(refused.is_err(), "{} allowed by {}", upper, rule);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Headers

/// Hop-by-hop headers (README "How requests are forwarded").
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Names the generator favours: everything the rules single out, and plain ones.
const NAMES: [&str; 24] = [
    "authorization",
    "cookie",
    "host",
    "connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "x-proxy-key",
    "expect",
    "orgid",
    "content-type",
    "content-length",
    "content-encoding",
    "accept-encoding",
    "accept",
    "user-agent",
    "x-custom",
    "x-hop",
    "x-rate-limit-remaining-v3",
    "set-cookie",
];

/// A header name in random case (names are case-insensitive).
fn header_name() -> impl Strategy<Value = String> {
    let name = prop_oneof![
        3 => select(NAMES.to_vec()).prop_map(str::to_owned),
        1 => "x-[a-z0-9-]{1,10}",
    ];
    (name, prop::collection::vec(any::<bool>(), 32)).prop_map(|(name, upper)| {
        name.chars()
            .zip(upper.into_iter().chain(std::iter::repeat(false)))
            .map(|(c, up)| if up { c.to_ascii_uppercase() } else { c })
            .collect()
    })
}

fn header_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => "[ -~]{0,24}".prop_map(String::into_bytes),
        // obs-text is allowed in values; hyper passes it on.
        1 => prop::collection::vec(
            prop_oneof![0x20u8..0x7f, 0x80u8..=0xff, Just(b'\t')],
            1..16
        )
        .prop_map(|mut v| {
            // No leading or trailing whitespace: parsers trim it anyway.
            v.retain(|b| *b != b' ' && *b != b'\t');
            v
        }),
    ]
}

/// A `Connection` value: a list of names (options), with random spacing and case.
fn connection_value() -> impl Strategy<Value = String> {
    let sep = select(vec![",", ", ", " , ", ",\t", ",,"]);
    prop::collection::vec((header_name(), sep), 1..4).prop_map(|items| {
        let mut value = String::new();
        for (i, (name, sep)) in items.into_iter().enumerate() {
            if i > 0 {
                value.push_str(sep);
            }
            value.push_str(&name);
        }
        value
    })
}

type Pairs = Vec<(String, Vec<u8>)>;

fn header_map(pairs: &Pairs) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).expect("valid name"),
            HeaderValue::from_bytes(value).expect("valid value"),
        );
    }
    map
}

/// Values by lower-case name, in order.
fn by_name(map: &HeaderMap) -> BTreeMap<String, Vec<Vec<u8>>> {
    let mut out: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    for (name, value) in map {
        out.entry(name.as_str().to_owned())
            .or_default()
            .push(value.as_bytes().to_vec());
    }
    out
}

/// Names listed in the `Connection` values (comma-separated options).
fn nominated(connection_values: &[Vec<u8>]) -> BTreeSet<String> {
    connection_values
        .iter()
        .flat_map(|v| v.split(|b| *b == b','))
        .map(|option| String::from_utf8_lossy(option).trim().to_ascii_lowercase())
        .filter(|option| !option.is_empty())
        .collect()
}

/// Checks `prepare_request` on `pairs` against the header rules (README "How requests are forwarded"), written out
/// independently of the implementation.
fn check_prepare_request(
    pairs: &Pairs,
    token: &str,
    org_id: Option<&str>,
) -> Result<(), TestCaseError> {
    let token = HeaderValue::from_str(token).expect("token");
    let org = org_id.map(|o| HeaderValue::from_str(o).expect("org"));
    let mut headers = header_map(pairs);
    prepare_request(&mut headers, org.as_ref());
    // The client's Authorization is gone; the token goes in when the request is sent.
    prop_assert!(!headers.contains_key("authorization"), "{:?}", headers);
    headers.insert(http::header::AUTHORIZATION, token.clone());

    let input = by_name(&header_map(pairs));
    let connection_values = input.get("connection").cloned().unwrap_or_default();
    let nominated = nominated(&connection_values);
    let output = by_name(&headers);

    // Exactly one Authorization: the token.
    let auth: Vec<_> = headers.get_all("authorization").iter().collect();
    prop_assert_eq!(auth.len(), 1, "authorization: {:?}", auth);
    prop_assert_eq!(auth[0], &token);

    // What never reaches Desk.
    for gone in ["cookie", "host", "x-proxy-key", "expect"]
        .into_iter()
        .chain(HOP_BY_HOP)
    {
        prop_assert!(
            !output.contains_key(gone),
            "{} reached Desk: {:?}",
            gone,
            headers
        );
    }
    for gone in &nominated {
        if gone != "authorization" && !(gone == "orgid" && org.is_some()) {
            prop_assert!(
                !output.contains_key(gone.as_str()),
                "{} was named in Connection {:?} but reached Desk: {:?}",
                gone,
                connection_values,
                headers
            );
        }
    }

    // Everything else is unchanged, values and their order; orgId is added when
    // configured and absent.
    let removed = |name: &str| {
        name == "authorization"
            || ["cookie", "host", "x-proxy-key", "expect"].contains(&name)
            || HOP_BY_HOP.contains(&name)
            || nominated.contains(name)
    };
    let mut expected: BTreeMap<String, Vec<Vec<u8>>> = input
        .into_iter()
        .filter(|(name, _)| !removed(name))
        .collect();
    if let Some(org) = &org
        && !expected.contains_key("orgid")
    {
        expected.insert("orgid".into(), vec![org.as_bytes().to_vec()]);
    }
    expected.insert("authorization".into(), vec![token.as_bytes().to_vec()]);
    prop_assert_eq!(output, expected);
    Ok(())
}

fn token() -> impl Strategy<Value = String> {
    "1000\\.[0-9a-f]{8,32}\\.[0-9a-f]{8,32}".prop_map(|t| format!("Zoho-oauthtoken {t}"))
}

proptest! {
    /// (c) Random header maps, random `Connection` lists: one Authorization with the
    /// token; no Cookie, Host, Expect, proxy key, hop-by-hop header or header named in
    /// Connection; every other header unchanged.
    #[test]
    fn prepare_request_follows_the_header_rules(
        mut pairs in prop::collection::vec((header_name(), header_value()), 0..16),
        connection in prop::collection::vec(connection_value(), 0..3),
        token in token(),
        org_id in prop::option::of("[0-9]{1,12}"),
    ) {
        // Connection values are lists of names: keep those readable.
        pairs.retain(|(name, _)| !name.eq_ignore_ascii_case("connection"));
        pairs.extend(connection.into_iter().map(|v| ("Connection".to_owned(), v.into_bytes())));
        check_prepare_request(&pairs, &token, org_id.as_deref())?;
    }
}

proptest! {
    /// A `Connection` value that is not plain ASCII (obs-text is legal in values, and
    /// hyper accepts it) still removes the valid names it lists.
    #[test]
        fn connection_values_with_obs_text_still_remove_what_they_name(
        mut pairs in prop::collection::vec((header_name(), header_value()), 0..12),
        connection in connection_value(),
        junk in prop::collection::vec(0x80u8..=0xff, 1..4),
        token in token(),
    ) {
        pairs.retain(|(name, _)| !name.eq_ignore_ascii_case("connection"));
        // The headers it names are present.
        for name in nominated(&[connection.clone().into_bytes()]) {
            pairs.push((name, b"hop".to_vec()));
        }
        let mut value = connection.into_bytes();
        value.extend_from_slice(b", ");
        value.extend_from_slice(&junk);
        pairs.push(("connection".to_owned(), value));
        check_prepare_request(&pairs, &token, None)?;
    }
}

/// The example that once failed the property above, as one plain case.
#[test]
fn connection_with_obs_text_example() {
    let pairs: Pairs = vec![
        ("x-hop".into(), b"must go".to_vec()),
        ("connection".into(), b"x-hop, \xff".to_vec()),
    ];
    check_prepare_request(&pairs, "Zoho-oauthtoken 1000.a.b", None).unwrap();
}
