//! `proxy.toml` and the environment as the user wrote them: serde structs that refuse
//! unknown keys, parsed with the key path and position of any error, and the environment
//! variables that override the file, remembered so that an error names the variable.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

use super::error::{ConfigError, Locator, Origin};

/// `proxy.toml` as written, with the environment applied. Every table refuses unknown keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub(super) listen: Option<String>,
    pub(super) dc: Option<String>,
    pub(super) upstream: Option<String>,
    pub(super) accounts_url: Option<String>,
    pub(super) org_id: Option<String>,
    pub(super) token_file: Option<String>,
    pub(super) token_store: Option<String>,
    pub(super) token_store_file: Option<PathBuf>,
    #[serde(default)]
    pub(super) oauth: RawOAuth,
    #[serde(default)]
    pub(super) access: RawAccess,
    #[serde(default)]
    pub(super) timeouts: RawTimeouts,
    #[serde(default)]
    pub(super) limits: RawLimits,
    #[serde(default)]
    pub(super) log: RawLog,
    #[serde(default)]
    pub(super) tls: RawTls,
    #[serde(default)]
    pub(super) intercept: RawIntercept,
    #[serde(default)]
    pub(super) desk: RawDesk,
    #[serde(default)]
    pub(super) record: RawRecord,
    /// `ZOHO_PROXY_API_KEYS` as set in the environment, split when validated.
    #[serde(skip)]
    pub(super) api_keys_env: Option<String>,
    /// Where each key was set: the file's positions, and the variables and options that
    /// overrode them.
    #[serde(skip)]
    pub(super) origins: Origins,
    /// Loaded to serve: a listener open to other machines is one more problem.
    #[serde(skip)]
    pub(super) serving: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) ca_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOAuth {
    pub(super) client_id: Option<String>,
    pub(super) client_id_file: Option<PathBuf>,
    #[serde(default, deserialize_with = "secret_text")]
    pub(super) client_secret: Option<String>,
    pub(super) client_secret_file: Option<PathBuf>,
    #[serde(default, deserialize_with = "secret_text")]
    pub(super) refresh_token: Option<String>,
    pub(super) refresh_token_file: Option<PathBuf>,
    pub(super) refresh_margin_secs: Option<f64>,
    pub(super) max_refreshes_per_10min: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAccess {
    #[serde(default, deserialize_with = "secret_texts")]
    pub(super) api_keys: Option<Vec<String>>,
    pub(super) api_keys_file: Option<PathBuf>,
    pub(super) allow_methods: Option<Vec<String>>,
    pub(super) allow_paths: Option<Vec<String>>,
    pub(super) deny_paths: Option<Vec<String>>,
    pub(super) allow_hosts: Option<Vec<String>>,
    pub(super) allow_origins: Option<Vec<String>>,
    pub(super) allow_cidrs: Option<Vec<String>>,
    pub(super) allow_unauthenticated_remote: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTimeouts {
    pub(super) connect_secs: Option<f64>,
    pub(super) response_secs: Option<f64>,
    pub(super) idle_secs: Option<f64>,
    pub(super) header_read_secs: Option<f64>,
    pub(super) body_read_secs: Option<f64>,
    pub(super) shutdown_grace_secs: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) replay_body_bytes: Option<u64>,
    pub(super) buffered_body_bytes: Option<u64>,
    pub(super) max_connections: Option<usize>,
    pub(super) max_upstream_requests: Option<usize>,
    pub(super) workers: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIntercept {
    pub(super) enabled: Option<bool>,
    pub(super) ca_dir: Option<PathBuf>,
    pub(super) hosts: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRecord {
    pub(super) max_body_bytes: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDesk {
    pub(super) edition: Option<String>,
    pub(super) max_concurrent: Option<usize>,
    pub(super) fleet_lease_secs: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub(super) format: Option<String>,
}

/// Where the keys of a configuration were set.
#[derive(Debug, Default)]
pub(super) struct Origins {
    /// What the file said, and where.
    file: Option<Locator>,
    /// Keys the environment overrode, with their variable.
    env: HashMap<&'static str, &'static str>,
    /// Keys the command line overrode (over the environment), with their option.
    options: HashMap<&'static str, &'static str>,
    /// What the configuration was loaded from, in words.
    pub(super) source: String,
}

impl Origins {
    /// Where `key` was set: its option (`--listen`) or variable, when one overrode it,
    /// else its place in the file.
    pub(super) fn of(&self, key: &str) -> Option<Origin> {
        if let Some(option) = self.options.get(key) {
            return Some(Origin::CommandLine(option));
        }
        if let Some(var) = self.env.get(key) {
            return Some(Origin::Env(var));
        }
        self.file.as_ref().and_then(|f| f.find(key))
    }

    /// The configuration file a missing key goes in: the one read, or `proxy.toml`.
    pub(super) fn file_to_edit(&self) -> String {
        self.file
            .as_ref()
            .map_or_else(|| "proxy.toml".to_owned(), |f| f.path().to_owned())
    }
}

/// The environment variables that override keys of the file.
pub const ENV_KEYS: &[(&str, &str)] = &[
    ("ZOHO_PROXY_LISTEN", "listen"),
    ("ZOHO_DC", "dc"),
    ("ZOHO_DESK_URL", "upstream"),
    ("ZOHO_ACCOUNTS_URL", "accounts_url"),
    ("ZOHO_ORG_ID", "org_id"),
    ("ZOHO_TOKEN_FILE", "token_file"),
    ("ZOHO_TOKEN_STORE", "token_store"),
    ("ZOHO_TOKEN_STORE_FILE", "token_store_file"),
    ("ZOHO_CLIENT_ID", "oauth.client_id"),
    ("ZOHO_CLIENT_ID_FILE", "oauth.client_id_file"),
    ("ZOHO_CLIENT_SECRET", "oauth.client_secret"),
    ("ZOHO_REFRESH_TOKEN", "oauth.refresh_token"),
    ("ZOHO_CLIENT_SECRET_FILE", "oauth.client_secret_file"),
    ("ZOHO_REFRESH_TOKEN_FILE", "oauth.refresh_token_file"),
    ("ZOHO_PROXY_API_KEYS", "access.api_keys"),
    ("ZOHO_PROXY_LOG_FORMAT", "log.format"),
];

/// The secrets given inline or as a file: (the key, its `_file` form). A variable for one
/// form replaces both forms of the file, as a variable replaces any other key.
const SECRET_FORMS: &[(&str, &str)] = &[
    ("token_store", "token_store_file"),
    ("oauth.client_id", "oauth.client_id_file"),
    ("oauth.client_secret", "oauth.client_secret_file"),
    ("oauth.refresh_token", "oauth.refresh_token_file"),
    ("access.api_keys", "access.api_keys_file"),
];

impl RawConfig {
    /// Parses TOML text read from `origin` (a path, or a word for text from elsewhere).
    /// An error names the key and its line and column: a syntax error, an unknown key,
    /// or a value of the wrong type.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let locator = Locator::new(origin, text);
        let deserializer = toml::Deserializer::new(text);
        let mut raw: RawConfig = serde_path_to_error::deserialize(deserializer).map_err(|err| {
            let path = err.path().to_string();
            let inner = err.into_inner();
            let at = inner.span().map(|span| locator.position(text, span.start));
            ConfigError::Parse {
                key: (path != ".").then_some(path),
                at,
                message: inner.message().to_owned(),
            }
        })?;
        raw.origins.file = Some(locator);
        raw.origins.source = origin.to_owned();
        Ok(raw)
    }

    /// Reads and parses a file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Prepares to serve: `--listen`, when given, over the file and the environment, and
    /// the checks that only serving needs (README "Security model").
    pub fn to_serve(&mut self, listen: Option<SocketAddr>) {
        if let Some(listen) = listen {
            self.listen = Some(listen.to_string());
            self.origins.options.insert("listen", "--listen");
        }
        self.serving = true;
    }

    /// Stands in for missing Zoho credentials, for commands that never call Zoho (for
    /// them a blank variable is no problem: nothing falls back to anything).
    pub(super) fn stand_in_credentials(&mut self) {
        let blank = |v: &Option<String>| v.as_deref().is_none_or(|v| v.trim().is_empty());
        if blank(&self.oauth.client_id) && self.oauth.client_id_file.is_none() {
            self.oauth.client_id = Some("(not needed)".into());
        }
        if blank(&self.oauth.client_secret) && self.oauth.client_secret_file.is_none() {
            self.oauth.client_secret = Some("(not needed)".into());
        }
        if blank(&self.oauth.refresh_token) {
            self.oauth.refresh_token = None;
        }
    }

    /// The file (when given, or `./proxy.toml` when it exists), then the process
    /// environment, as written.
    pub(super) fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let default = Path::new("proxy.toml");
        let mut raw = match path {
            Some(p) => Self::from_file(p)?,
            None if default.exists() => Self::from_file(default)?,
            None => Self::default(),
        };
        raw.apply_env(|name| std::env::var(name).ok());
        Ok(raw)
    }

    /// No credentials at all, and none looked for: placeholders for the ones serving
    /// needs, no secret files, no token file, no token store.
    pub(super) fn forget_credentials(&mut self) {
        self.oauth.client_id_file = None;
        self.oauth.client_secret_file = None;
        self.oauth.refresh_token_file = None;
        self.oauth.refresh_token = None;
        self.oauth.client_id = None;
        self.oauth.client_secret = None;
        self.stand_in_credentials();
        self.token_file = Some(String::new());
        self.token_store = None;
        self.token_store_file = None;
    }

    /// Drops what the file gave for a secret key, for a variable that gives its other form.
    fn forget_file_value(&mut self, key: &str) {
        match key {
            "token_store" => self.token_store = None,
            "token_store_file" => self.token_store_file = None,
            "oauth.client_id" => self.oauth.client_id = None,
            "oauth.client_id_file" => self.oauth.client_id_file = None,
            "oauth.client_secret" => self.oauth.client_secret = None,
            "oauth.client_secret_file" => self.oauth.client_secret_file = None,
            "oauth.refresh_token" => self.oauth.refresh_token = None,
            "oauth.refresh_token_file" => self.oauth.refresh_token_file = None,
            "access.api_keys" => self.access.api_keys = None,
            "access.api_keys_file" => self.access.api_keys_file = None,
            _ => {}
        }
    }

    /// Applies the environment variables, which override the file.
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) {
        for (var, key) in ENV_KEYS {
            let Some(value) = env(var) else {
                continue;
            };
            self.origins.env.insert(key, var);
            match *key {
                "listen" => self.listen = Some(value),
                "dc" => self.dc = Some(value),
                "upstream" => self.upstream = Some(value),
                "accounts_url" => self.accounts_url = Some(value),
                "org_id" => self.org_id = Some(value),
                "token_file" => self.token_file = Some(value),
                "token_store" => self.token_store = Some(value),
                "token_store_file" => self.token_store_file = Some(value.into()),
                "oauth.client_id" => self.oauth.client_id = Some(value),
                "oauth.client_id_file" => self.oauth.client_id_file = Some(value.into()),
                "oauth.client_secret" => self.oauth.client_secret = Some(value),
                "oauth.refresh_token" => self.oauth.refresh_token = Some(value),
                "oauth.client_secret_file" => self.oauth.client_secret_file = Some(value.into()),
                "oauth.refresh_token_file" => {
                    self.oauth.refresh_token_file = Some(value.into());
                }
                "access.api_keys" => self.api_keys_env = Some(value),
                "log.format" => self.log.format = Some(value),
                _ => {}
            }
            // The other form, unless a variable gave it too (then both stay, an error).
            let other = SECRET_FORMS.iter().find_map(|&(inline, file)| match *key {
                k if k == inline => Some(file),
                k if k == file => Some(inline),
                _ => None,
            });
            if let Some(other) = other
                && !self.origins.env.contains_key(other)
            {
                self.forget_file_value(other);
            }
        }
        if !self.origins.env.is_empty() && !self.origins.source.is_empty() {
            self.origins.source.push_str(" and the environment");
        } else if !self.origins.env.is_empty() {
            self.origins.source = "the environment".into();
        }
    }
}

/// What a secret's key holds: text, or anything else, which is refused without being
/// shown (serde's own error would print a number or a boolean given by mistake).
#[derive(Deserialize)]
#[serde(untagged)]
enum SecretText {
    Text(String),
    Other(serde::de::IgnoredAny),
}

impl SecretText {
    fn into_text<E: serde::de::Error>(self) -> Result<String, E> {
        match self {
            SecretText::Text(text) => Ok(text),
            SecretText::Other(_) => Err(E::custom(
                "expected a string (the value is not shown: it may be a secret)",
            )),
        }
    }
}

/// A secret key's value (`oauth.client_secret`, `oauth.refresh_token`).
fn secret_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    SecretText::deserialize(d)?.into_text().map(Some)
}

/// A list of secrets (`access.api_keys`); anything but a list is refused without being
/// shown (one key written as a string is the likely mistake).
fn secret_texts<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum SecretList {
        List(Vec<SecretText>),
        Other(serde::de::IgnoredAny),
    }
    match SecretList::deserialize(d)? {
        SecretList::List(list) => list
            .into_iter()
            .map(SecretText::into_text)
            .collect::<Result<_, _>>()
            .map(Some),
        SecretList::Other(_) => Err(serde::de::Error::custom(
            "expected a list of strings, e.g. [\"key\"] (the value is not shown: it may be a secret)",
        )),
    }
}
