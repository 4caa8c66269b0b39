//! Reading one value of the configuration: a problem is noted with its key and where it
//! was set, and reading goes on, so that every problem is reported at once; secrets given
//! inline or as `<key>_file`; seconds; address ranges.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use super::error::{ConfigError, Origin};
use super::raw::Origins;

/// The problems found so far, each with where its key was set.
pub(super) struct Problems<'a> {
    pub(super) origins: &'a Origins,
    pub(super) found: Vec<ConfigError>,
}

impl Problems<'_> {
    pub(super) fn invalid(&mut self, key: &'static str, reason: impl Into<String>) {
        self.found.push(ConfigError::Invalid {
            key,
            at: self.origins.of(key),
            reason: reason.into(),
        });
    }

    /// The value, or `None` with the problem noted.
    pub(super) fn check<T>(&mut self, key: &'static str, result: Result<T, String>) -> Option<T> {
        result.map_err(|reason| self.invalid(key, reason)).ok()
    }
}

/// A count of which 0 makes no sense.
pub(super) fn at_least_one<N: Default + PartialEq>(
    p: &mut Problems<'_>,
    key: &'static str,
    value: N,
    note: &str,
) -> N {
    if value == N::default() {
        p.invalid(key, format!("must be at least 1{note}"));
    }
    value
}

/// A value given inline or as `<key>_file` (container secrets); not both. `Err` when the
/// problem was noted (under the key whose value is wrong, so that it has its place).
pub(super) fn secret_value(
    p: &mut Problems<'_>,
    (key, file_key): (&'static str, &'static str),
    inline: Option<String>,
    file: Option<PathBuf>,
) -> Result<Option<String>, ()> {
    // A variable set but blank (what a template substitutes for an unset one) must not
    // fall back to the file, nor pass for "not set".
    if let Some(Origin::Env(var)) = p.origins.of(key)
        && inline.as_deref().is_some_and(|v| v.trim().is_empty())
    {
        let elsewhere = if key == "oauth.refresh_token" {
            "proxy.toml or the token file"
        } else {
            "proxy.toml"
        };
        p.invalid(
            key,
            format!("{var} is set but empty: give it a value, or unset it to use {elsewhere}"),
        );
        return Err(());
    }
    match (inline.filter(|v| !v.trim().is_empty()), file) {
        (Some(_), Some(_)) => {
            // Both from one source (the environment overrides the file's forms): named
            // as they were given.
            let name = |k: &str| match p.origins.of(k) {
                Some(Origin::Env(var)) => var.to_owned(),
                _ => format!("`{k}`"),
            };
            let reason = format!("give either {} or {}, not both", name(key), name(file_key));
            p.invalid(key, reason);
            Err(())
        }
        (Some(v), None) => Ok(Some(v.trim().to_owned())),
        (None, Some(path)) => match read_secret_file(&path) {
            Ok(text) => Ok(Some(text.trim().to_owned())),
            Err(reason) => {
                p.invalid(file_key, reason);
                Err(())
            }
        },
        (None, None) => Ok(None),
    }
}

/// A credential serving cannot do without: `None`, with the problem noted, when it is
/// missing or its problem was noted already.
pub(super) fn required(
    p: &mut Problems<'_>,
    value: Result<Option<String>, ()>,
    key: &'static str,
    env: &'static str,
    hint: &'static str,
) -> Option<String> {
    if let Ok(None) = value {
        let file = p.origins.file_to_edit();
        p.found.push(ConfigError::Missing {
            key,
            file,
            env,
            hint,
        });
    }
    value.ok().flatten()
}

/// A secret file's text. One that holds nothing but blanks is an error: a secret mounted
/// empty must not pass for "no secret" (for `access.api_keys_file`, "no keys at all").
/// So is an empty path (what a template substitutes for an unset variable).
pub(super) fn read_secret_file(path: &Path) -> Result<String, String> {
    if path.as_os_str().is_empty() {
        return Err("names no file: give the path of the file that holds the secret".into());
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the file {}: {e}", path.display()))?;
    if text.trim().is_empty() {
        return Err(format!("the file {} is empty", path.display()));
    }
    Ok(text)
}

pub(super) fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| {
            format!("{text:?} is not an address range such as \"10.0.0.0/8\" or \"fd00::/8\"")
        })
}

/// Whether 0 seconds means something for a key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Zero {
    Allowed,
    Refused,
}

/// A `*_secs` value of which 0 makes no sense.
pub(super) fn secs(
    p: &mut Problems<'_>,
    key: &'static str,
    value: Option<f64>,
    default: f64,
) -> Duration {
    seconds(p, key, value, default, Zero::Refused)
}

/// A `*_secs` value: seconds, fractions allowed, at most a year.
pub(super) fn seconds(
    p: &mut Problems<'_>,
    key: &'static str,
    value: Option<f64>,
    default: f64,
    zero: Zero,
) -> Duration {
    // Longer than any time the proxy waits, and short enough that no deadline computed
    // from it overflows the clock.
    const MAX: Duration = Duration::from_secs(365 * 24 * 3600);
    let v = value.unwrap_or(default);
    let usable = |d: &Duration| zero == Zero::Allowed || !d.is_zero();
    match Duration::try_from_secs_f64(v).ok().filter(usable) {
        Some(d) if d <= MAX => d,
        Some(_) => {
            p.invalid(
                key,
                format!("{v} is more than a year ({} seconds)", MAX.as_secs()),
            );
            Duration::from_secs_f64(default)
        }
        None if zero == Zero::Allowed => {
            p.invalid(key, format!("{v} is not a number of seconds (0 or more)"));
            Duration::from_secs_f64(default)
        }
        None => {
            p.invalid(key, format!("{v} is not a positive number of seconds"));
            Duration::from_secs_f64(default)
        }
    }
}
