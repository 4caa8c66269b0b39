//! What is wrong with a configuration, and where: the key, the file's line and column or
//! the environment variable it came from, and the fix.

use std::fmt;
use std::path::PathBuf;

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A line and column (from 1) of a file.
    File {
        /// The file, as given.
        path: String,
        /// The line, from 1.
        line: usize,
        /// The column, from 1.
        column: usize,
    },
    /// An environment variable.
    Env(&'static str),
    /// A command-line option (`--listen`).
    CommandLine(&'static str),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File { path, line, column } => write!(f, "{path}:{line}:{column}"),
            Self::Env(name) => write!(f, "environment variable {name}"),
            Self::CommandLine(name) => write!(f, "option {name}"),
        }
    }
}

/// A configuration that cannot be used; each message names the key, where it was set and
/// the fix. Every problem of a configuration is reported at once ([`ConfigError::Many`]).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key, or a value of the wrong type.
    #[error("{}{}: {message}", at.as_ref().map(|a| format!("{a}: ")).unwrap_or_default(), key.as_deref().map(|k| format!("`{k}`")).unwrap_or_else(|| "syntax".into()))]
    Parse {
        /// The key, when the error is about one.
        key: Option<String>,
        /// Where in the file.
        at: Option<Origin>,
        /// What is wrong (toml's words).
        message: String,
    },
    /// A key has a value that cannot be used.
    #[error("{}`{key}`: {reason}", at.as_ref().map(|a| format!("{a}: ")).unwrap_or_default())]
    Invalid {
        /// The key, as written in proxy.toml (or the variable, for one with no key).
        key: &'static str,
        /// Where it was set, when it was.
        at: Option<Origin>,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// A required key is missing.
    #[error("`{key}` is required: set it in {file} or with the environment variable {env}{hint}")]
    Missing {
        /// The key, as written in proxy.toml.
        key: &'static str,
        /// The configuration file it goes in: the one read, or `proxy.toml`.
        file: String,
        /// Its environment variable.
        env: &'static str,
        /// More advice, e.g. to try the demo.
        hint: &'static str,
    },
    /// Several problems, each on its own line.
    #[error("{}", .0.iter().map(|e| format!("- {e}")).collect::<Vec<_>>().join("\n"))]
    Many(Vec<ConfigError>),
}

impl ConfigError {
    /// An invalid value with no known origin (a default, or a value set in code).
    pub fn invalid(key: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            key,
            at: None,
            reason: reason.into(),
        }
    }

    /// A listener other machines can reach with neither a key nor a CIDR rule in the way
    /// (README "Security model").
    pub fn open_listener(listen: std::net::SocketAddr, at: Option<Origin>) -> Self {
        Self::Invalid {
            key: "listen",
            at,
            reason: format!(
                "{listen} is reachable from other machines, and anyone who reaches the proxy acts as your Zoho user. Set access.api_keys or access.allow_cidrs (ranges that admit every address, such as 0.0.0.0/0, protect nothing), or, in a private CI network, access.allow_unauthenticated_remote = true"
            ),
        }
    }

    /// One error, or all of them.
    pub fn all(mut errors: Vec<ConfigError>) -> Option<Self> {
        match errors.len() {
            0 => None,
            1 => errors.pop(),
            _ => Some(Self::Many(errors)),
        }
    }

    /// Every single problem (a [`ConfigError::Many`] unpacked).
    pub fn problems(&self) -> Vec<&ConfigError> {
        match self {
            Self::Many(errors) => errors.iter().flat_map(ConfigError::problems).collect(),
            other => vec![other],
        }
    }
}

/// Finds where a key is set in a TOML file: `[table]` headers and `key = value` lines, as
/// proxy.toml is written. A key it cannot find has no location (the message still names
/// it).
#[derive(Debug, Default)]
pub struct Locator {
    path: String,
    /// (dotted key, line, column of the value)
    keys: Vec<(String, usize, usize)>,
}

impl Locator {
    /// The file indexed.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Indexes `text`, read from `path`.
    pub fn new(path: &str, text: &str) -> Self {
        let mut table = String::new();
        let mut keys = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let trimmed = line.trim_start();
            if let Some(header) = trimmed.strip_prefix('[') {
                table = header.split(']').next().unwrap_or("").trim().to_owned();
                continue;
            }
            if trimmed.starts_with('#') {
                continue;
            }
            let Some((key, _)) = trimmed.split_once('=') else {
                continue;
            };
            let key = key.trim().trim_matches('"');
            if key.is_empty() || key.contains(char::is_whitespace) {
                continue;
            }
            let dotted = if table.is_empty() {
                key.to_owned()
            } else {
                format!("{table}.{key}")
            };
            let value_at = line.find('=').map_or(0, |i| {
                i + 1 + line[i + 1..].len() - line[i + 1..].trim_start().len()
            });
            keys.push((dotted, index + 1, value_at + 1));
        }
        Self {
            path: path.to_owned(),
            keys,
        }
    }

    /// Where `key` is set in the file.
    pub fn find(&self, key: &str) -> Option<Origin> {
        self.keys
            .iter()
            .rev()
            .find(|(k, _, _)| k == key)
            .map(|(_, line, column)| Origin::File {
                path: self.path.clone(),
                line: *line,
                column: *column,
            })
    }

    /// The line and column of a byte offset of the file.
    pub fn position(&self, text: &str, offset: usize) -> Origin {
        let before = &text[..offset.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        Origin::File {
            path: self.path.clone(),
            line,
            column,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_found_by_table_and_name() {
        let text = "listen = \"x\"\n\n[oauth]\n# client_id = \"no\"\nclient_id = \"1000.A\"\n  [timeouts]\nconnect_secs =   \"10\"\n";
        let locator = Locator::new("proxy.toml", text);
        assert_eq!(
            locator.find("listen").unwrap().to_string(),
            "proxy.toml:1:10"
        );
        assert_eq!(
            locator.find("oauth.client_id").unwrap().to_string(),
            "proxy.toml:5:13"
        );
        assert_eq!(
            locator.find("timeouts.connect_secs").unwrap().to_string(),
            "proxy.toml:7:18"
        );
        assert!(locator.find("oauth.client_secret").is_none());
        assert_eq!(
            locator
                .position(text, text.find("[oauth]").unwrap())
                .to_string(),
            "proxy.toml:3:1"
        );
    }

    #[test]
    fn many_errors_list_one_per_line() {
        let err = ConfigError::all(vec![
            ConfigError::invalid("dc", "unknown"),
            ConfigError::Invalid {
                key: "listen",
                at: Some(Origin::Env("ZOHO_PROXY_LISTEN")),
                reason: "bad".into(),
            },
        ])
        .unwrap();
        assert_eq!(
            err.to_string(),
            "- `dc`: unknown\n- environment variable ZOHO_PROXY_LISTEN: `listen`: bad"
        );
        assert_eq!(err.problems().len(), 2);
    }
}
