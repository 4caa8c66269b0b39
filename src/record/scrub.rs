//! What a recording must never hold, wherever Desk or a client puts it (a header, the URL,
//! a body): the configuration's secrets (client secret, refresh token, proxy keys), the
//! access tokens a request was sent with, and anything shaped as a Zoho OAuth token
//! (`1000.` and two runs of 32 hex digits). Each is replaced by `***` before an entry is
//! written. A body cut at `record.max_body_bytes` in the middle of one loses that start
//! too.

use aho_corasick::{AhoCorasick, MatchKind};

use crate::secret::Secret;

/// Shorter secrets are not searched for: they would mask ordinary text.
pub const MIN_SECRET_LEN: usize = 8;
/// What takes a secret's place.
const MASK: &[u8] = b"***";
/// A Zoho OAuth token: `1000.`, 32 hex digits, `.`, 32 hex digits.
const TOKEN_PREFIX: &[u8] = b"1000.";
const TOKEN_LEN: usize = TOKEN_PREFIX.len() + 32 + 1 + 32;

/// The secrets of one entry, found and masked.
pub struct Scrubber {
    secrets: Vec<Vec<u8>>,
    finder: Option<AhoCorasick>,
}

impl std::fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secrets themselves.
        f.debug_struct("Scrubber")
            .field("secrets", &self.secrets.len())
            .finish_non_exhaustive()
    }
}

impl Scrubber {
    /// Searches for `secrets` (those shorter than [`MIN_SECRET_LEN`] are left out) and for
    /// Zoho tokens.
    pub fn new<'a>(secrets: impl IntoIterator<Item = &'a Secret<String>>) -> Self {
        Self::searching(patterns(secrets))
    }

    /// This search and `more` secrets.
    pub fn with<'a>(&self, more: impl IntoIterator<Item = &'a Secret<String>>) -> Self {
        let mut all = self.secrets.clone();
        all.extend(patterns(more));
        Self::searching(all)
    }

    fn searching(mut secrets: Vec<Vec<u8>>) -> Self {
        secrets.sort();
        secrets.dedup();
        // The longest match first: a secret inside another must not leave the rest of
        // the longer one showing. Building only fails for patterns far larger than any
        // secret; then the token shape still masks tokens, and the configuration's
        // secrets go unsearched (logged).
        let finder = (!secrets.is_empty())
            .then(|| {
                AhoCorasick::builder()
                    .match_kind(MatchKind::LeftmostLongest)
                    .build(&secrets)
            })
            .and_then(|built| {
                built
                    .map_err(|err| {
                        tracing::warn!(error = %err, "recording: the secrets cannot be searched for");
                    })
                    .ok()
            });
        Self { secrets, finder }
    }

    /// `bytes` with every secret masked; `cut` when the bytes were cut short, so that a
    /// secret's start at their end is masked too.
    pub fn bytes(&self, bytes: Vec<u8>, cut: bool) -> Vec<u8> {
        let mut out = match &self.finder {
            Some(finder) if finder.is_match(&bytes) => {
                let masks = vec![MASK; self.secrets.len()];
                finder.replace_all_bytes(&bytes, &masks)
            }
            _ => bytes,
        };
        mask_tokens(&mut out);
        if cut {
            let _ = self.mask_cut_start(&mut out);
        }
        out
    }

    /// Whether `bytes` hold a secret or a token, that [`Scrubber::bytes`] would mask.
    pub fn finds(&self, bytes: &[u8]) -> bool {
        self.finder.as_ref().is_some_and(|f| f.is_match(bytes)) || !tokens_in(bytes).is_empty()
    }

    /// `text` with every secret masked.
    pub fn text(&self, text: String) -> String {
        let mut out = match &self.finder {
            Some(finder) if finder.is_match(&text) => {
                let masks = vec!["***"; self.secrets.len()];
                finder.replace_all(&text, &masks)
            }
            _ => text,
        };
        for at in tokens_in(out.as_bytes()).into_iter().rev() {
            // A token is ASCII: its bounds are those of characters.
            out.replace_range(at..at + TOKEN_LEN, "***");
        }
        out
    }

    /// Masks the end of `bytes` when it is the start of a secret or a token.
    /// Whether it did.
    pub fn mask_cut_start(&self, bytes: &mut Vec<u8>) -> bool {
        let token_start = |tail: &[u8]| {
            tail.len() < TOKEN_LEN
                && (tail.starts_with(TOKEN_PREFIX) || TOKEN_PREFIX.starts_with(tail))
                && tail[tail.len().min(TOKEN_PREFIX.len())..]
                    .iter()
                    .all(|b| b.is_ascii_hexdigit() || *b == b'.')
        };
        let longest = self
            .secrets
            .iter()
            .map(Vec::len)
            .chain([TOKEN_LEN])
            .max()
            .unwrap_or(0);
        // The longest tail that starts a secret: at least 4 bytes, less than a secret.
        let found = (4..longest.min(bytes.len() + 1)).rev().find(|&n| {
            let tail = &bytes[bytes.len() - n..];
            token_start(tail)
                || self
                    .secrets
                    .iter()
                    .any(|s| s.len() > n && s.starts_with(tail))
        });
        if let Some(n) = found {
            bytes.truncate(bytes.len() - n);
            bytes.extend_from_slice(MASK);
        }
        found.is_some()
    }
}

/// What to search for of `secrets`: each as written, percent-encoded as a URL may carry
/// it (hex in either case), and with its `/` escaped as JSON may; those shorter than
/// [`MIN_SECRET_LEN`] left out.
fn patterns<'a>(secrets: impl IntoIterator<Item = &'a Secret<String>>) -> Vec<Vec<u8>> {
    secrets
        .into_iter()
        .map(|s| s.expose().as_bytes())
        .filter(|s| s.len() >= MIN_SECRET_LEN)
        .flat_map(|s| {
            let encoded: String = form_urlencoded::byte_serialize(s).collect();
            let lower = lower_hex_escapes(&encoded);
            // JSON may escape a "/" (as PHP's json_encode does).
            let json_escaped = s
                .contains(&b'/')
                .then(|| String::from_utf8_lossy(s).replace('/', "\\/").into_bytes());
            [
                Some(s.to_vec()),
                Some(encoded.into_bytes()),
                Some(lower.into_bytes()),
                json_escaped,
            ]
        })
        .flatten()
        .collect()
}

/// `text` with the hex digits of its percent-escapes in lower case.
fn lower_hex_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut escape = 0;
    for c in text.chars() {
        if c == '%' {
            escape = 2;
            out.push(c);
        } else if escape > 0 {
            escape -= 1;
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether `bytes` are a Zoho OAuth token, whole.
pub fn is_token(bytes: &[u8]) -> bool {
    bytes.len() == TOKEN_LEN && tokens_in(bytes) == [0]
}

/// Masks everything shaped as a Zoho OAuth token.
fn mask_tokens(bytes: &mut Vec<u8>) {
    for at in tokens_in(bytes).into_iter().rev() {
        bytes.splice(at..at + TOKEN_LEN, MASK.iter().copied());
    }
}

/// Where the Zoho OAuth tokens in `bytes` start.
fn tokens_in(bytes: &[u8]) -> Vec<usize> {
    let is_token = |at: usize| {
        let Some(token) = bytes.get(at..at + TOKEN_LEN) else {
            return false;
        };
        let (first, rest) = token[TOKEN_PREFIX.len()..].split_at(32);
        token.starts_with(TOKEN_PREFIX)
            && first.iter().all(u8::is_ascii_hexdigit)
            && rest[0] == b'.'
            && rest[1..].iter().all(u8::is_ascii_hexdigit)
            // Not the middle of a longer run of digits.
            && bytes.get(at + TOKEN_LEN).is_none_or(|b| !b.is_ascii_hexdigit())
            && (at == 0 || !bytes[at - 1].is_ascii_digit())
    };
    let mut starts: Vec<usize> = Vec::new();
    let candidates = bytes.iter().enumerate().filter(|&(_, &b)| b == b'1');
    for (at, _) in candidates {
        // Never one inside another: masks are put in from the end.
        let clear = starts.last().is_none_or(|&last| at >= last + TOKEN_LEN);
        if clear && is_token(at) {
            starts.push(at);
        }
    }
    starts
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "1000.0123456789abcdef0123456789abcdef.fedcba9876543210fedcba9876543210";

    fn scrubber() -> Scrubber {
        let secrets = [
            Secret::new("client-secret-xyz".to_owned()),
            Secret::new("PROXYKEY-kk5566".to_owned()),
            Secret::new("short".to_owned()),
            Secret::new("k+y/=@:1-and-more".to_owned()),
            Secret::new("PROXYKEY-kk5566-longer".to_owned()),
        ];
        Scrubber::new(&secrets)
    }

    #[test]
    fn a_secret_is_masked_whole_and_in_its_url_forms() {
        let s = scrubber();
        assert_eq!(s.text("a=PROXYKEY-kk5566-longer!".into()), "a=***!");
        assert_eq!(
            s.text("?k=k%2By%2F%3D%40%3A1-and-more&l=k%2by%2f%3d%40%3a1-and-more".into()),
            "?k=***&l=***"
        );
        assert_eq!(s.text("k+y/=@:1-and-more".into()), "***");
        // In JSON that escapes "/".
        assert_eq!(
            s.text(r#"{"k":"k+y\/=@:1-and-more"}"#.into()),
            r#"{"k":"***"}"#
        );
    }

    #[test]
    fn secrets_and_tokens_are_masked_wherever_they_are() {
        let s = scrubber();
        assert_eq!(
            s.text(format!(
                "a=client-secret-xyz&k=PROXYKEY-kk5566&t={TOKEN}&short"
            )),
            "a=***&k=***&t=***&short"
        );
        assert_eq!(
            s.text(format!("Zoho-oauthtoken {TOKEN}")),
            "Zoho-oauthtoken ***"
        );
        assert_eq!(
            s.bytes(format!("\u{0}{TOKEN}\u{ff}").into_bytes(), false),
            b"\0***\xc3\xbf".to_vec()
        );
        // Not a token: too short, or part of a longer run.
        let short = TOKEN[..TOKEN.len() - 1].to_owned();
        assert_eq!(s.text(short.clone()), short);
        let longer = format!("{TOKEN}0");
        assert_eq!(s.text(longer.clone()), longer);
        assert_eq!(s.text("1000.abc".into()), "1000.abc");
        assert!(is_token(TOKEN.as_bytes()));
        assert!(!is_token(short.as_bytes()) && !is_token(longer.as_bytes()));
        // One inside another's digits is part of it.
        let hex = "fedcba9876543210fedcba9876543210";
        let nested = format!("1000.0123456789abcdef0123456789ab1000.{hex}.{hex}");
        assert_eq!(s.text(nested.clone()), format!("***.{hex}"));
        assert_eq!(
            s.bytes(nested.into_bytes(), false),
            format!("***.{hex}").into_bytes()
        );
    }

    #[test]
    fn a_body_cut_in_a_secret_loses_its_start() {
        let s = scrubber();
        assert_eq!(s.bytes(b"key PROXYKEY-kk".to_vec(), true), b"key ***");
        assert_eq!(
            s.bytes(format!("t={}", &TOKEN[..40]).into_bytes(), true),
            b"t=***"
        );
        assert_eq!(s.bytes(b"t=100".to_vec(), true), b"t=100");
        // Whole bodies are left alone at their end.
        assert_eq!(
            s.bytes(b"key PROXYKEY-kk".to_vec(), false),
            b"key PROXYKEY-kk"
        );
    }
}
