//! Configuration: `proxy.toml` and environment variables ([`raw`]), validated in one pass
//! ([`validate`]) into a [`Config`] whose every field is ready to use ([`model`]), or every
//! problem at once, each with its key and where it was set ([`error`]).

mod error;
mod model;
mod raw;
#[cfg(test)]
mod tests;
mod validate;

use std::path::Path;

pub use error::{ConfigError, Origin};
pub use model::{
    AccessConfig, Config, DATA_CENTRES, DEFAULT_CA_DIR, DEFAULT_LISTEN, DEFAULT_TOKEN_FILE,
    DESK_METHODS, DeskConfig, EDITIONS, InterceptConfig, LogFormat, OAuthConfig, RecordConfig,
    Timeouts,
};
pub use raw::RawConfig;

impl Config {
    /// Loads the configuration as `serve` does: the file (when given, or `./proxy.toml`
    /// when it exists), then the process environment.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        Self::try_from(RawConfig::load(path)?)
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
    /// token store), so a CI checkout without them replays as well.
    pub fn load_for_replay(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut raw = RawConfig::load(path)?;
        raw.forget_credentials();
        Self::try_from(raw)
    }

    /// Parses TOML text alone, without the environment (tests, embedded configs).
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::try_from(RawConfig::from_toml(text, "config")?)
    }
}
