//! Canonical paths, and the path rules matched against them.
//!
//! Every path is brought to one canonical form before anything looks at it, and that form
//! is what the access rules see and what is forwarded to Desk: a rule can only be walked
//! around by a spelling that Desk would read differently from the proxy, so there must be
//! no such spelling. The canonical form:
//! - decodes percent-encoded unreserved characters (`%61` → `a`, `%2E` → `.`) and keeps
//!   the other escapes as the client wrote them, so that the rest of the path goes to Desk
//!   byte for byte (the rules compare an escape's hex digits in any case: `%c3%a9` and
//!   `%C3%A9` are one character; and an escaped `:`, `@`, `+` or other sub-delimiter as
//!   that character, which servers that decode before routing read it as: [`rule_form`]
//!   is the form they match);
//! - refuses what some server along the way would read as structure rather than data:
//!   `;` (path parameters; `..;` is a dot-segment to servlet containers), `\`, `%00`,
//!   `%2F`, `%5C`, `%3B`, malformed escapes, dot-segments in any encoding, empty segments
//!   (`//`), and any byte outside visible ASCII.
//!
//! A path rule ([`PathRule`]) covers the path it names and everything below it, on segment
//! boundaries: `/api/v1/agents` covers `/api/v1/agents`, `/api/v1/agents/` and
//! `/api/v1/agents/5`, never `/api/v1/agentsX`. In a rule, `*` (and `?`, `[…]`, `{a,b}`)
//! match within one segment, and a segment `**` matches one or more whole segments.

use std::borrow::Cow;

use globset::{GlobBuilder, GlobMatcher};

/// Why a path cannot be forwarded (answered 400 `PROXY_BAD_REQUEST`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Not an absolute path.
    #[error("the request target must be a path starting with \"/\"")]
    NotAbsolute,
    /// A `;` (path parameters).
    #[error(
        "the path has a \";\" (path parameters, which some servers strip or resolve); Zoho Desk paths never do"
    )]
    Semicolon,
    /// A byte some server would read as a separator or terminator once decoded.
    #[error("the path has {0}, which some servers read as a separator; Zoho Desk paths never do")]
    Separator(&'static str),
    /// `%` not followed by two hex digits.
    #[error("the path has a malformed percent-escape (\"%\" must be followed by two hex digits)")]
    MalformedEscape,
    /// A byte outside visible ASCII.
    #[error("the path has a byte that is not visible ASCII; percent-encode it")]
    Invisible,
    /// `.` or `..` as a segment, however encoded.
    #[error(
        "the path has a dot-segment (\".\" or \"..\", possibly percent-encoded); Zoho Desk paths never do"
    )]
    DotSegment,
    /// `//`.
    #[error("the path has an empty segment (\"//\"); Zoho Desk paths never do")]
    EmptySegment,
}

/// The canonical form of `path` (see the module documentation), borrowed when `path` is
/// already canonical, as nearly every real path is.
pub fn canonicalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    let mut out: Option<Vec<u8>> = None;
    let mut i = 0;
    while i < bytes.len() {
        let byte = bytes[i];
        match byte {
            b';' => return Err(PathError::Semicolon),
            b'\\' => return Err(PathError::Separator("a \"\\\"")),
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathError::MalformedEscape);
                };
                let decoded = hi << 4 | lo;
                match decoded {
                    0 => return Err(PathError::Separator("\"%00\"")),
                    b'/' => return Err(PathError::Separator("an encoded \"/\" (%2F)")),
                    b'\\' => return Err(PathError::Separator("an encoded \"\\\" (%5C)")),
                    b';' => return Err(PathError::Separator("an encoded \";\" (%3B)")),
                    _ => {}
                }
                if is_unreserved(decoded) {
                    out.get_or_insert_with(|| bytes[..i].to_vec()).push(decoded);
                } else if let Some(out) = &mut out {
                    out.extend_from_slice(&bytes[i..i + 3]);
                }
                i += 3;
                continue;
            }
            0x21..=0x7e => {}
            _ => return Err(PathError::Invisible),
        }
        if let Some(out) = &mut out {
            out.push(byte);
        }
        i += 1;
    }
    let canonical = match out {
        // Only ASCII was written: unreserved characters and escapes.
        Some(out) => Cow::Owned(String::from_utf8(out).map_err(|_| PathError::Invisible)?),
        None => Cow::Borrowed(path),
    };
    check_segments(&canonical)?;
    Ok(canonical)
}

/// Refuses empty segments (a trailing `/` aside) and dot-segments.
fn check_segments(path: &str) -> Result<(), PathError> {
    // Split as bytes: a `str` split by a `char` costs several times more on paths this
    // short, and every request's path goes through here.
    let mut segments = path.as_bytes()[1..].split(|&b| b == b'/').peekable();
    while let Some(segment) = segments.next() {
        match segment {
            b"" if segments.peek().is_some() => return Err(PathError::EmptySegment),
            b"." | b".." => return Err(PathError::DotSegment),
            _ => {}
        }
    }
    Ok(())
}

/// A canonical path as the path rules see it: the escapes of the characters a path
/// segment may also carry plain (`:`, `@`, `+`, `,`, `=`, `!`, `$`, `&`, `'`, `(`, `)`)
/// decoded, since a server that decodes before routing reads `a%3Ab` as `a:b`, and the
/// hex digits of the other escapes in upper case. `*` stays escaped, as a rule's glob
/// would read it plain. Borrowed unless one escape changes.
pub fn rule_form(path: &str) -> Cow<'_, str> {
    // One pass; the copy starts at the first escape that changes.
    let mut out = String::new();
    // `path[..done]` is accounted for: in `out` once something changed.
    let mut done = 0;
    let mut search = 0;
    while let Some(found) = path[search..].find('%') {
        let at = search + found;
        search = at + 1;
        // Not an escape (a canonical path has none such): kept as it is.
        let Some((digits, byte)) = path
            .get(at + 1..at + 3)
            .and_then(|d| escaped_byte(d).map(|byte| (d, byte)))
        else {
            continue;
        };
        // Two hex digits: ASCII.
        search = at + 3;
        let plain = is_plain_for_rules(byte);
        if !plain && !digits.bytes().any(|b| b.is_ascii_lowercase()) {
            continue;
        }
        if done == 0 {
            out.reserve(path.len());
        }
        out.push_str(&path[done..at]);
        if plain {
            out.push(char::from(byte));
        } else {
            out.push('%');
            out.push_str(&digits.to_ascii_uppercase());
        }
        done = at + 3;
    }
    if done == 0 {
        return Cow::Borrowed(path);
    }
    out.push_str(&path[done..]);
    Cow::Owned(out)
}

/// The byte two hex digits spell.
fn escaped_byte(digits: &str) -> Option<u8> {
    match digits.as_bytes() {
        &[high, low] => Some(hex(high)? << 4 | hex(low)?),
        _ => None,
    }
}

/// Sub-delimiters, `:` and `@`: what a path segment may carry plain or escaped (RFC 3986
/// `pchar`) and the canonical form keeps escaped, less `;` (refused) and `*` (a glob).
fn is_plain_for_rules(byte: u8) -> bool {
    matches!(
        byte,
        b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'+' | b',' | b'=' | b':' | b'@'
    )
}

fn hex(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

/// RFC 3986 unreserved characters: they mean the same encoded or not.
fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

/// The most segments a rule may have (the matcher keeps one bit per segment).
pub const MAX_RULE_SEGMENTS: usize = 63;

/// Whether a rule compares letters exactly (`allow_paths`) or in any case (`deny_paths`:
/// a deny rule must not be walked around by `/API/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Case {
    /// `A` is not `a`.
    Sensitive,
    /// `A` is `a`.
    Insensitive,
}

/// A path rule, compiled: the rule's segments, each literal, a one-segment glob, or `**`.
#[derive(Debug, Clone)]
pub struct PathRule {
    text: String,
    segments: Vec<RuleSegment>,
    case: Case,
}

#[derive(Debug, Clone)]
enum RuleSegment {
    Literal(String),
    Glob(GlobMatcher),
    /// `**`: one or more whole segments.
    Many,
}

/// Why a configured path rule cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// The rule does not start with `/`.
    #[error("{0:?} must start with \"/\"")]
    NotAbsolute(String),
    /// The rule could never match a canonical path.
    #[error("{rule:?} can never match: {reason}")]
    NotCanonical {
        /// The rule.
        rule: String,
        /// Why.
        reason: PathError,
    },
    /// More segments than a rule may have.
    #[error("{0:?} has more than {MAX_RULE_SEGMENTS} segments")]
    TooLong(String),
    /// A segment is not a valid glob.
    #[error("{rule:?} is not a valid pattern: {reason}")]
    BadGlob {
        /// The rule.
        rule: String,
        /// globset's words.
        reason: String,
    },
}

impl PathRule {
    /// Compiles a rule as written in `allow_paths` / `deny_paths`. The rule is brought to
    /// the canonical form too, so `/api/v1/%61gents` means `/api/v1/agents`.
    pub fn parse(text: &str, case: Case) -> Result<Self, RuleError> {
        let trimmed = text.trim();
        if !trimmed.starts_with('/') {
            return Err(RuleError::NotAbsolute(text.to_owned()));
        }
        let canonical = canonicalize(trimmed).map_err(|reason| RuleError::NotCanonical {
            rule: text.to_owned(),
            reason,
        })?;
        let segments = rule_form(&canonical)
            .trim_end_matches('/')
            .split('/')
            .skip(1)
            .map(|segment| RuleSegment::parse(segment, case))
            .collect::<Result<Vec<_>, String>>()
            .map_err(|reason| RuleError::BadGlob {
                rule: text.to_owned(),
                reason,
            })?;
        if segments.len() > MAX_RULE_SEGMENTS {
            return Err(RuleError::TooLong(text.to_owned()));
        }
        Ok(Self {
            text: trimmed.to_owned(),
            segments,
            case,
        })
    }

    /// The rule as configured.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the rule covers `path`, a canonical path in its [`rule_form`]: the path
    /// itself or anything below it.
    pub fn covers(&self, path: &str) -> bool {
        let path = path.strip_prefix('/').unwrap_or(path);
        // A trailing slash names the same resource for the rules.
        let path = path.strip_suffix('/').unwrap_or(path);
        let last = self.segments.len();
        if last == 0 {
            return true;
        }
        if path.is_empty() {
            return false;
        }
        // An NFA over the rule's segments, one bit per state: bit `i` is set when the
        // first `i` rule segments matched exactly the path segments read so far. `**` at
        // `i` consumes a segment and stays at `i` (more may follow) and moves to `i + 1`
        // (it may end there). Rules have at most `MAX_RULE_SEGMENTS` segments.
        let done = 1u64 << last;
        let mut alive = 1u64;
        for segment in path.split('/') {
            let mut next = 0u64;
            let mut states = alive;
            while states != 0 {
                let i = states.trailing_zeros() as usize;
                states &= states - 1;
                match &self.segments[i] {
                    RuleSegment::Many if !segment.is_empty() => next |= 0b11 << i,
                    other if other.matches(segment, self.case) => next |= 1 << (i + 1),
                    _ => {}
                }
            }
            if next & done != 0 {
                return true;
            }
            if next == 0 {
                return false;
            }
            alive = next;
        }
        false
    }
}

impl RuleSegment {
    fn parse(segment: &str, case: Case) -> Result<Self, String> {
        if segment == "**" {
            return Ok(Self::Many);
        }
        if !segment.contains(['*', '?', '[', '{']) {
            return Ok(Self::Literal(segment.to_owned()));
        }
        let glob = GlobBuilder::new(segment)
            .literal_separator(true)
            .case_insensitive(case == Case::Insensitive)
            .build()
            .map_err(|e| e.kind().to_string())?;
        Ok(Self::Glob(glob.compile_matcher()))
    }

    fn matches(&self, segment: &str, case: Case) -> bool {
        match self {
            Self::Literal(literal) => match case {
                Case::Sensitive => literal == segment,
                Case::Insensitive => literal.eq_ignore_ascii_case(segment),
            },
            Self::Glob(glob) => !segment.is_empty() && glob.is_match(segment),
            Self::Many => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_see_an_escape_s_hex_digits_in_any_case_as_one() {
        assert_eq!(rule_form("/api/v1/caf%c3%a9"), "/api/v1/caf%C3%A9");
        assert!(matches!(rule_form("/api/v1/caf%C3%A9"), Cow::Borrowed(_)));
        assert!(matches!(rule_form("/api/v1/tickets"), Cow::Borrowed(_)));
        for (rule, case) in [
            ("/api/v1/caf%c3%a9", Case::Sensitive),
            ("/api/v1/caf%C3%A9", Case::Sensitive),
            ("/api/v1/caf%C3%a9", Case::Insensitive),
        ] {
            let rule = PathRule::parse(rule, case).unwrap();
            for path in [
                "/api/v1/caf%c3%a9/1",
                "/api/v1/caf%C3%A9",
                "/api/v1/caf%c3%A9",
            ] {
                let canonical = canonicalize(path).unwrap();
                assert!(rule.covers(&rule_form(&canonical)), "{rule:?} {path}");
            }
            assert!(!rule.covers(&rule_form("/api/v1/caf%C3%A8")), "{rule:?}");
        }
    }

    #[test]
    fn rules_see_an_escaped_sub_delimiter_as_the_character() {
        assert_eq!(rule_form("/api/v1/tickets/a%3Ab"), "/api/v1/tickets/a:b");
        assert_eq!(
            rule_form("/a%2bb%40c%2C%2a%c3%a9/%3d"),
            "/a+b@c,%2A%C3%A9/="
        );
        assert!(matches!(rule_form("/a%2A%C3%A9%25"), Cow::Borrowed(_)));
        // Not escapes (a canonical path has none such): left as they are.
        assert_eq!(rule_form("/a%3A%"), "/a:%");
        assert_eq!(rule_form("/a%zz%3a%é"), "/a%zz:%é");
        for (rule, path) in [
            ("/api/v1/tickets/a:b", "/api/v1/tickets/a%3Ab"),
            ("/api/v1/tickets/a%3ab", "/api/v1/tickets/a:b/1"),
            ("/api/v1/contacts/a%2Bb", "/api/v1/contacts/a+b"),
            ("/api/v1/contacts/a+b", "/api/v1/contacts/a%2b%62"),
        ] {
            for case in [Case::Sensitive, Case::Insensitive] {
                let rule = PathRule::parse(rule, case).unwrap();
                let canonical = canonicalize(path).unwrap();
                assert!(rule.covers(&rule_form(&canonical)), "{rule:?} {path}");
            }
        }
        // A glob's star is never spelt by an escape.
        let rule = PathRule::parse("/api/v1/a%2Ab", Case::Sensitive).unwrap();
        assert!(!rule.covers(&rule_form("/api/v1/axyzb")));
        assert!(rule.covers(&rule_form("/api/v1/a%2Ab")));
    }

    #[test]
    fn canonical_forms() {
        let table: &[(&str, Result<&str, PathError>)] = &[
            ("/api/v1/tickets", Ok("/api/v1/tickets")),
            ("/api/v1/tickets/", Ok("/api/v1/tickets/")),
            ("/api/v1/%61gents", Ok("/api/v1/agents")),
            ("/api/v1/%7Euser%2d%5F", Ok("/api/v1/~user-_")),
            ("/api/v1/caf%c3%a9", Ok("/api/v1/caf%c3%a9")),
            ("/api/v1/caf%C3%a9%61", Ok("/api/v1/caf%C3%a9a")),
            ("/api/v1/a%20b", Ok("/api/v1/a%20b")),
            ("/api/v1/100%25", Ok("/api/v1/100%25")),
            ("/api/v1/%252e%252e/x", Ok("/api/v1/%252e%252e/x")),
            ("/api/v1/a..b/.well/...", Ok("/api/v1/a..b/.well/...")),
            ("/", Ok("/")),
            ("", Err(PathError::NotAbsolute)),
            ("api/v1", Err(PathError::NotAbsolute)),
            ("*", Err(PathError::NotAbsolute)),
            ("/api/v1/agents;x=1", Err(PathError::Semicolon)),
            ("/api/v1/tickets/..;/agents", Err(PathError::Semicolon)),
            (
                "/api/v1/%3b",
                Err(PathError::Separator("an encoded \";\" (%3B)")),
            ),
            ("/api/v1/a%00", Err(PathError::Separator("\"%00\""))),
            (
                "/api/v1/a%2fb",
                Err(PathError::Separator("an encoded \"/\" (%2F)")),
            ),
            (
                "/api/v1/a%5Cb",
                Err(PathError::Separator("an encoded \"\\\" (%5C)")),
            ),
            ("/api/v1/a\\b", Err(PathError::Separator("a \"\\\""))),
            ("/api/v1/%zz", Err(PathError::MalformedEscape)),
            ("/api/v1/%4", Err(PathError::MalformedEscape)),
            ("/api/v1/%", Err(PathError::MalformedEscape)),
            ("/api/v1/%u002e", Err(PathError::MalformedEscape)),
            ("/api/v1/a b", Err(PathError::Invisible)),
            ("/api/v1/é", Err(PathError::Invisible)),
            ("/api/v1/../agents", Err(PathError::DotSegment)),
            ("/api/v1/./agents", Err(PathError::DotSegment)),
            ("/api/v1/%2e%2E/agents", Err(PathError::DotSegment)),
            ("/api/v1/.%2e", Err(PathError::DotSegment)),
            ("/api/v1/..", Err(PathError::DotSegment)),
            ("/..", Err(PathError::DotSegment)),
            ("/api/v1//agents", Err(PathError::EmptySegment)),
            ("//api", Err(PathError::EmptySegment)),
        ];
        for (raw, expected) in table {
            let got = canonicalize(raw);
            assert_eq!(got.as_deref().map_err(Clone::clone), *expected, "{raw:?}");
        }
    }

    #[test]
    fn a_canonical_path_is_borrowed() {
        assert!(matches!(
            canonicalize("/api/v1/tickets?x"),
            Ok(Cow::Borrowed(_))
        ));
        assert!(matches!(canonicalize("/a%20b"), Ok(Cow::Borrowed(_))));
        assert!(matches!(canonicalize("/a%2db"), Ok(Cow::Owned(_))));
    }

    fn covers(rule: &str, case: Case, path: &str) -> bool {
        PathRule::parse(rule, case).unwrap().covers(path)
    }

    #[test]
    fn rules_cover_the_path_and_everything_below_it() {
        use Case::{Insensitive as I, Sensitive as S};
        let table: &[(&str, Case, &str, bool)] = &[
            ("/api/v1/agents", S, "/api/v1/agents", true),
            ("/api/v1/agents", S, "/api/v1/agents/", true),
            ("/api/v1/agents", S, "/api/v1/agents/5", true),
            ("/api/v1/agents", S, "/api/v1/agentsX", false),
            ("/api/v1/agents", S, "/api/v1", false),
            ("/api/v1/agents", S, "/API/v1/agents", false),
            ("/api/v1/agents", I, "/API/V1/Agents/5", true),
            ("/api/v1/agents/", S, "/api/v1/agents/5", true),
            ("/api/v1/%61gents", I, "/api/v1/agents", true),
            ("/", S, "/anything/at/all", true),
            (
                "/api/v1/*/attachments",
                I,
                "/api/v1/tickets/attachments",
                true,
            ),
            ("/api/v1/*/attachments", I, "/api/v1/x/attachments/", true),
            (
                "/api/v1/*/attachments",
                I,
                "/api/v1/tickets/attachments/9",
                true,
            ),
            (
                "/api/v1/*/attachments",
                I,
                "/API/v1/Tickets/ATTACHMENTS",
                true,
            ),
            (
                "/api/v1/*/attachments",
                I,
                "/api/v1/tickets/1/attachments",
                false,
            ),
            ("/api/v1/*/attachments", I, "/api/v1/attachments", false),
            (
                "/api/v1/**/attachments",
                I,
                "/api/v1/tickets/1/attachments",
                true,
            ),
            (
                "/api/v1/**/attachments",
                I,
                "/api/v1/tickets/1/attachments/9",
                true,
            ),
            (
                "/api/v1/**/attachments",
                I,
                "/api/v1/a/b/c/attachments",
                true,
            ),
            ("/api/v1/**/attachments", I, "/api/v1/attachments", false),
            (
                "/api/v1/**/attachments",
                I,
                "/api/v1/tickets/1/attachmentsX",
                false,
            ),
            ("/api/v1/**", S, "/api/v1/a/b/comments", true),
            ("/api/v1/**", S, "/api/v1", false),
            ("/api/v1/**", S, "/api/v1/", false),
            ("/api/v1/t*s", S, "/api/v1/tickets/1", true),
            ("/api/v1/t*s", S, "/api/v1/t/s", false),
            ("/api/v1/{tickets,contacts}", S, "/api/v1/contacts/3", true),
            ("/api/v1/ticket?", S, "/api/v1/tickets", true),
            ("/api/**/x/**/y", S, "/api/a/x/b/c/y/z", true),
            ("/api/**/x/**/y", S, "/api/x/b/y", false),
        ];
        for (rule, case, path, expected) in table {
            assert_eq!(
                covers(rule, *case, path),
                *expected,
                "{rule} ({case:?}) on {path}"
            );
        }
    }

    #[test]
    fn many_double_stars_stay_linear() {
        let rule = PathRule::parse(&"/**".repeat(20), Case::Sensitive).unwrap();
        let path = "/a".repeat(10_000);
        assert!(rule.covers(&path));
        let rule =
            PathRule::parse(&format!("{}/never", "/**".repeat(20)), Case::Sensitive).unwrap();
        assert!(!rule.covers(&path));
    }

    #[test]
    fn bad_rules_are_refused() {
        assert!(matches!(
            PathRule::parse("api/v1", Case::Sensitive),
            Err(RuleError::NotAbsolute(_))
        ));
        assert!(matches!(
            PathRule::parse("/api/../v1", Case::Sensitive),
            Err(RuleError::NotCanonical { .. })
        ));
        assert!(matches!(
            PathRule::parse("/api/v1/[", Case::Sensitive),
            Err(RuleError::BadGlob { .. })
        ));
    }
}
