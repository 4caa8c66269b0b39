//! Configuration: `proxy.toml` and environment variables ([`raw`]), validated in one pass
//! ([`validate`], one value at a time by [`values`]) into a [`Config`] whose every field is
//! ready to use ([`model`]), or every problem at once, each with its key and where it was
//! set ([`error`]).

mod error;
mod model;
mod raw;
#[cfg(test)]
mod tests;
mod validate;
mod values;

use std::net::SocketAddr;
use std::path::Path;

pub use error::{ConfigError, Origin};
pub use model::{
    AccessConfig, Config, DATA_CENTRES, DEFAULT_CA_DIR, DEFAULT_LISTEN, DEFAULT_TOKEN_FILE,
    DESK_METHODS, DeskConfig, EDITIONS, InterceptConfig, LogFormat, MAX_RECORD_BODY_BYTES,
    OAuthConfig, RecordConfig, Timeouts, ZOHO_REFRESHES_PER_10MIN,
};
pub use raw::RawConfig;

impl Config {
    /// Loads the configuration: the file (when given, or `./proxy.toml` when it exists),
    /// then the process environment.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        Self::try_from(RawConfig::load(path)?)
    }

    /// [`Config::load`] as `serve`, `check` and a reload do: with `--listen` over the
    /// rest, and a listener open to other machines reported with every other problem.
    pub fn load_to_serve(
        path: Option<&Path>,
        listen: Option<SocketAddr>,
    ) -> Result<Self, ConfigError> {
        let mut raw = RawConfig::load(path)?;
        raw.to_serve(listen);
        Self::try_from(raw)
    }

    /// Loads what the commands around transparent mode need (`ca init`, `env`) from the
    /// same file and environment as `serve`, without requiring Zoho credentials: every
    /// other key is validated as usual.
    pub fn load_without_credentials(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut raw = RawConfig::load(path)?;
        raw.stand_in_credentials();
        Self::try_from(raw)
    }

    /// [`Config::load_without_credentials`] for a replay, which answers from its file:
    /// every credential source is ignored (secrets, their files, the token file, the
    /// token store), so a CI checkout without them replays as well. It serves: see
    /// [`Config::load_to_serve`].
    pub fn load_for_replay(
        path: Option<&Path>,
        listen: Option<SocketAddr>,
    ) -> Result<Self, ConfigError> {
        let mut raw = RawConfig::load(path)?;
        raw.forget_credentials();
        raw.to_serve(listen);
        Self::try_from(raw)
    }

    /// Parses TOML text alone, without the environment (tests, embedded configs).
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::try_from(RawConfig::from_toml(text, "config")?)
    }
}
