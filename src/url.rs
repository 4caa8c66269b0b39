//! Base URLs of Desk and Accounts: scheme, host, port and an optional path prefix, and
//! how a request's path and query join them byte for byte.

use http::Uri;
use http::uri::PathAndQuery;

/// Why a URL cannot be a base URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UrlError(String);

/// A base URL: scheme, host, port and an optional path prefix (no query).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    /// `http` or `https`.
    pub scheme: http::uri::Scheme,
    /// Host and port as written (`desk.zoho.com`, `127.0.0.1:9000`).
    pub authority: http::uri::Authority,
    /// Path prefix without a trailing slash (`""` for none).
    pub prefix: String,
    /// `scheme://authority/`: where connections go.
    origin: Uri,
    /// The `Host` of requests to it: the authority, without the port when it is the
    /// scheme's default.
    host_header: http::HeaderValue,
}

/// `text` with any user information masked (`https://***@host/…`): a password must not
/// be shown, even in an error. Everything up to the last `@` goes, since a password may
/// hold a `/` or a `?` where a parser would end the authority: masking a little too much
/// of a URL in an error costs nothing.
fn without_userinfo(text: &str) -> std::borrow::Cow<'_, str> {
    let start = text.find("://").map_or(0, |at| at + 3);
    match text[start..].rfind('@') {
        Some(at) => format!("{}***{}", &text[..start], &text[start + at..]).into(),
        None => text.into(),
    }
}

impl BaseUrl {
    /// Parses an absolute `http(s)://host[:port][/prefix]` URL.
    pub fn parse(text: &str) -> Result<Self, UrlError> {
        Self::parse_like(text, "https://desk.zoho.com")
    }

    /// [`Self::parse`], whose errors give `example` as a URL of the right form.
    pub fn parse_like(text: &str, example: &str) -> Result<Self, UrlError> {
        let invalid = |reason: &str| {
            UrlError(format!(
                "{reason} (got {:?}; expected e.g. \"{example}\")",
                without_userinfo(text)
            ))
        };
        // The URI parser drops a fragment: one given is refused as a query is, not lost.
        if text.contains('#') {
            return Err(invalid("the URL must not have a fragment (#...)"));
        }
        let uri: Uri = text
            .trim()
            .parse()
            .map_err(|_| invalid("not a valid URL"))?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or_else(|| invalid("the URL needs a scheme"))?;
        if scheme != http::uri::Scheme::HTTP && scheme != http::uri::Scheme::HTTPS {
            return Err(invalid("the scheme must be http or https"));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| invalid("the URL needs a host"))?;
        if authority.as_str().contains('@') {
            return Err(invalid("the URL must not carry user information"));
        }
        // A port, when given, is a number (http's parser takes `u:p` for a host and port).
        let port = authority
            .as_str()
            .rsplit_once(':')
            .filter(|(_, port)| !port.ends_with(']'));
        if port.is_some() && authority.port_u16().is_none() {
            return Err(invalid("the port must be a number from 0 to 65535"));
        }
        if uri.query().is_some() {
            return Err(invalid("the URL must not have a query"));
        }
        let prefix = uri.path().trim_end_matches('/').to_owned();
        // A request's path is compared and joined in its canonical form: so is the prefix.
        if !prefix.is_empty() {
            match crate::paths::canonicalize(&prefix) {
                Ok(canonical) if canonical == prefix => {}
                Ok(canonical) => {
                    return Err(invalid(&format!(
                        "write the path prefix as {canonical:?} (escapes of letters, digits and -._~ decoded)"
                    )));
                }
                Err(err) => return Err(invalid(&format!("the path prefix: {err}"))),
            }
        }
        let origin = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|_| invalid("not a valid URL"))?;
        let host_header = match authority.port_u16() {
            Some(port) if port != default_port(&scheme) => {
                http::HeaderValue::from_str(authority.as_str())
            }
            _ => http::HeaderValue::from_str(authority.host()),
        }
        .map_err(|_| invalid("not a valid host"))?;
        Ok(Self {
            scheme,
            authority,
            prefix,
            origin,
            host_header,
        })
    }

    /// `scheme://authority/`: where connections to it go.
    pub fn origin(&self) -> &Uri {
        &self.origin
    }

    /// The `Host` header of requests to it.
    pub fn host_header(&self) -> &http::HeaderValue {
        &self.host_header
    }

    /// The host name, lower-cased, without brackets for IPv6.
    pub fn host(&self) -> String {
        self.host_as_written().to_ascii_lowercase()
    }

    /// The host as the URL wrote it (an IPv6 literal without its brackets), for a
    /// comparison that ignores case without a copy.
    pub fn host_as_written(&self) -> &str {
        self.authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
    }

    /// The port, explicit or the scheme's default.
    pub fn port(&self) -> u16 {
        self.authority
            .port_u16()
            .unwrap_or_else(|| default_port(&self.scheme))
    }

    /// The URL of `path_and_query` under this base, byte-for-byte.
    pub fn join(&self, path_and_query: &str) -> Result<Uri, http::Error> {
        self.join_pq(PathAndQuery::try_from(path_and_query)?)
    }

    /// The URL of a parsed `path_and_query` under this base; without a prefix it shares
    /// the request's bytes (no copy).
    pub fn join_pq(&self, path_and_query: PathAndQuery) -> Result<Uri, http::Error> {
        let path_and_query = if self.prefix.is_empty() {
            path_and_query
        } else {
            format!("{}{}", self.prefix, path_and_query.as_str()).try_into()?
        };
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(path_and_query);
        Ok(Uri::from_parts(parts)?)
    }
}

/// The port a scheme implies: 443 for `https`, 80 for `http`.
fn default_port(scheme: &http::uri::Scheme) -> u16 {
    if *scheme == http::uri::Scheme::HTTPS {
        443
    } else {
        80
    }
}

impl std::fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_never_shows_a_password() {
        for url in [
            "https://user:UPSECRETPW@desk.example.com/gw",
            "http://:UPSECRETPW@127.0.0.1:9000",
            "UPSECRETPW@desk.example.com",
            "https://a@b:UPSECRETPW@desk.example.com?x",
            "https://u:UP/SECRETPW@desk.example.com/gw",
            "https://u:UPSECRETPW?x@desk.example.com",
        ] {
            let err = BaseUrl::parse(url).unwrap_err().to_string();
            assert!(!err.contains("UPSECRETPW"), "{err}");
            assert!(err.contains("***@"), "{err}");
        }
        assert_eq!(
            without_userinfo("https://desk.example.com/gw"),
            "https://desk.example.com/gw"
        );
    }

    #[test]
    fn a_fragment_is_refused_not_dropped() {
        for url in ["http://127.0.0.1:9000#frag", "https://desk.zoho.com/gw#"] {
            let err = BaseUrl::parse_like(url, "https://accounts.zoho.com")
                .unwrap_err()
                .to_string();
            assert!(err.contains("fragment"), "{err}");
            assert!(err.contains("e.g. \"https://accounts.zoho.com\""), "{err}");
        }
    }
}
