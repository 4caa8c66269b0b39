//! The token file (README "Tokens"): the refresh token from `exchange` and the current access
//! token with its expiry, written atomically (temp file + rename) with mode 0600.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::cache::TokenCache;
use super::source::Token;
use crate::secret::Secret;

/// Why the token file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file exists but could not be read or written.
    #[error("token file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not the JSON the proxy writes.
    #[error(
        "token file {path} is corrupt ({reason}); delete it, or run `zoho-desk-proxy exchange` again"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// serde's message.
        reason: String,
    },
}

/// What the token file holds.
#[derive(Debug, Clone, Default)]
pub struct StoredTokens {
    /// The client id the tokens belong to; tokens of another client are ignored.
    pub client_id: Option<String>,
    /// The refresh token from `exchange`.
    pub refresh_token: Option<Secret<String>>,
    /// The last access token and when it expires.
    pub access_token: Option<(Secret<String>, SystemTime)>,
    /// The [`fingerprint`] of the refresh token the access token was issued with.
    pub issued_with: Option<String>,
}

/// What names a refresh token in the file without giving it: its SHA-256, in hex. An
/// access token is reused only with the refresh token it came from.
pub fn fingerprint(refresh_token: &Secret<String>) -> String {
    use sha2::Digest;
    format!(
        "{:x}",
        sha2::Sha256::digest(refresh_token.expose().as_bytes())
    )
}

impl StoredTokens {
    /// The access token when it belongs to `client_id`, was issued with `refresh_token`
    /// (a new refresh token, for new scopes or after a leak, starts afresh) and stays valid
    /// for more than `min_remaining`; with what remains of its life.
    pub fn valid_access_token(
        &self,
        client_id: &str,
        refresh_token: &Secret<String>,
        min_remaining: Duration,
    ) -> Option<(Secret<String>, Duration)> {
        if self.client_id.as_deref() != Some(client_id) {
            return None;
        }
        let same_refresh_token = match &self.issued_with {
            Some(issued_with) => *issued_with == fingerprint(refresh_token),
            // A file of an earlier version: only when it holds that refresh token itself.
            None => self
                .refresh_token
                .as_ref()
                .is_some_and(|stored| stored.expose() == refresh_token.expose()),
        };
        if !same_refresh_token {
            return None;
        }
        let (token, expires_at) = self.access_token.as_ref()?;
        let remaining = expires_at.duration_since(SystemTime::now()).ok()?;
        (remaining > min_remaining).then(|| (token.clone(), remaining))
    }
}

#[derive(Serialize, Deserialize)]
struct FileFormat {
    version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    client_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    access_token: Option<String>,
    /// Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    access_token_expires_at: Option<u64>,
    /// The SHA-256 (hex) of the refresh token the access token was issued with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    access_token_issued_with: Option<String>,
}

/// The token file at one path.
#[derive(Debug, Clone)]
pub struct TokenFile {
    path: PathBuf,
}

impl TokenFile {
    /// The file at `path` (not touched until loaded or saved).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the file; `Ok(None)` when it does not exist.
    pub fn load(&self) -> Result<Option<StoredTokens>, FileError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(FileError::Io {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let file: FileFormat = serde_json::from_str(&text).map_err(|e| FileError::Corrupt {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        let access_token = match (file.access_token, file.access_token_expires_at) {
            // An expiry beyond the clock's range is no expiry the proxy can use.
            (Some(token), Some(at)) => UNIX_EPOCH
                .checked_add(Duration::from_secs(at))
                .map(|at| (Secret::new(token), at)),
            _ => None,
        };
        Ok(Some(StoredTokens {
            client_id: file.client_id,
            refresh_token: file.refresh_token.map(Secret::new),
            access_token,
            issued_with: file.access_token_issued_with,
        }))
    }

    /// Whether the file can be written, without writing it: its directory made when
    /// missing, a temp file created there (and removed), and the path no directory. For
    /// `exchange`, which must know before it spends a single-use grant token.
    pub fn check_writable(&self) -> Result<(), FileError> {
        let io = |source| FileError::Io {
            path: self.path.clone(),
            source,
        };
        if self.path.is_dir() {
            return Err(io(std::io::Error::other("it is a directory")));
        }
        let dir = self.dir();
        create_private_dir(&dir).map_err(io)?;
        tempfile::NamedTempFile::new_in(&dir).map_err(io)?;
        Ok(())
    }

    /// The directory the file is in.
    fn dir(&self) -> PathBuf {
        match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }

    /// Writes the file atomically: a 0600 temp file in the same directory, then rename.
    pub fn save(&self, tokens: &StoredTokens) -> Result<(), FileError> {
        let io = |source| FileError::Io {
            path: self.path.clone(),
            source,
        };
        let file = FileFormat {
            version: 1,
            client_id: tokens.client_id.clone(),
            refresh_token: tokens.refresh_token.as_ref().map(|t| t.expose().clone()),
            access_token: tokens
                .access_token
                .as_ref()
                .map(|(t, _)| t.expose().clone()),
            access_token_expires_at: tokens
                .access_token
                .as_ref()
                .and_then(|(_, at)| at.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_secs()),
            access_token_issued_with: tokens.access_token.as_ref().and(tokens.issued_with.clone()),
        };
        let json = serde_json::to_vec_pretty(&file)
            .map_err(|e| io(std::io::Error::other(e.to_string())))?;
        let dir = self.dir();
        create_private_dir(&dir).map_err(io)?;
        // tempfile creates the file with mode 0600 on Unix.
        let mut temp = tempfile::NamedTempFile::new_in(&dir).map_err(io)?;
        std::io::Write::write_all(&mut temp, &json).map_err(io)?;
        temp.as_file().sync_all().map_err(io)?;
        temp.persist(&self.path).map_err(|e| io(e.error))?;
        Ok(())
    }
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    if dir.exists() {
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// The refresh token the tokens a [`TokenSaver`] writes are issued with (its
/// [`fingerprint`]), as a reload (SIGHUP) may change it.
#[derive(Debug, Clone, Default)]
pub struct IssuedWith(Arc<std::sync::Mutex<Option<String>>>);

impl IssuedWith {
    /// Tokens issued with `refresh_token`.
    pub fn new(refresh_token: Option<&Secret<String>>) -> Self {
        let this = Self::default();
        this.set(refresh_token);
        this
    }

    /// From now on, tokens issued with `refresh_token`.
    pub fn set(&self, refresh_token: Option<&Secret<String>>) {
        *self.lock() = refresh_token.map(fingerprint);
    }

    fn get(&self) -> Option<String> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Writes every new access token to the token file, and once more at shutdown, keeping
/// the refresh token the file holds when it is written: `exchange` may have stored a new
/// one while the proxy runs (it takes effect on SIGHUP or a restart), and a refresh token
/// given by config or environment is never written to disk. Only a file that is gone
/// gets back the refresh token it had at the start.
pub struct TokenSaver {
    file: TokenFile,
    client_id: String,
    refresh_token: Option<Secret<String>>,
    /// The refresh token the proxy refreshes with.
    issued_with: IssuedWith,
}

impl TokenSaver {
    /// A saver for `file`, keeping its `refresh_token`, of tokens issued with what
    /// `issued_with` says.
    pub fn new(
        file: TokenFile,
        client_id: &str,
        refresh_token: Option<Secret<String>>,
        issued_with: IssuedWith,
    ) -> Self {
        Self {
            file,
            client_id: client_id.to_owned(),
            refresh_token,
            issued_with,
        }
    }

    /// Saves on every change of the usable token until `stop` resolves, then saves once
    /// more whatever the file holds by then: a save may have failed (a full disk, a
    /// missing directory since made), or the file been removed. A token Desk rejected is
    /// taken out of the file, so that a restart does not take it for a valid one.
    pub async fn run(self, tokens: Arc<TokenCache>, stop: impl Future<Output = ()>) {
        let mut changed = tokens.subscribe();
        // The generation of the access token the file holds (0: none).
        let mut saved = tokens.current().map_or(0, |t| t.generation);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => break,
                res = changed.changed() => if res.is_err() { break },
            }
            let usable = tokens.usable_at(tokio::time::Instant::now());
            let generation = usable.as_ref().map_or(0, |t| t.generation);
            if generation != saved && self.save(usable.as_deref()).await {
                saved = generation;
            }
        }
        let usable = tokens.usable_at(tokio::time::Instant::now());
        self.save(usable.as_deref()).await;
    }

    /// Writes `token` (or no access token) to the file; whether it was written.
    async fn save(&self, token: Option<&Token>) -> bool {
        let mut stored = StoredTokens {
            client_id: Some(self.client_id.clone()),
            refresh_token: self.refresh_token.clone(),
            access_token: token.map(|t| (t.access_token.clone(), t.expires_at_wall)),
            issued_with: self.issued_with.get(),
        };
        let file = self.file.clone();
        let save = move || {
            if let Ok(Some(on_disk)) = file.load() {
                keep_refresh_token(&mut stored, on_disk);
            }
            file.save(&stored)
        };
        match tokio::task::spawn_blocking(save).await {
            Ok(Ok(())) => {
                tracing::debug!(path = %self.file.path().display(), "token file saved");
                true
            }
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "the token file could not be saved");
                false
            }
            Err(err) => {
                tracing::warn!(error = %err, "the token file could not be saved");
                false
            }
        }
    }
}

/// Keeps the refresh token `on_disk` holds (and, with one, the client it belongs to) in
/// what is about to be written. The access token written stays named by the refresh
/// token it was issued with, so a restart reuses it only with that one.
fn keep_refresh_token(stored: &mut StoredTokens, on_disk: StoredTokens) {
    if on_disk.refresh_token.is_some() && on_disk.client_id.is_some() {
        stored.client_id = on_disk.client_id;
    }
    stored.refresh_token = on_disk.refresh_token;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_atomically_with_mode_0600_and_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let file = TokenFile::new(dir.path().join("sub/token.json"));
        assert!(file.load().unwrap().is_none());
        let expires = SystemTime::now() + Duration::from_secs(3000);
        let refresh = Secret::new("1000.refresh".to_owned());
        file.save(&StoredTokens {
            client_id: Some("id".into()),
            refresh_token: None,
            access_token: Some((Secret::new("1000.access".into()), expires)),
            issued_with: Some(fingerprint(&refresh)),
        })
        .unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(file.path()).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let loaded = file.load().unwrap().unwrap();
        assert!(loaded.refresh_token.is_none());
        let (token, remaining) = loaded
            .valid_access_token("id", &refresh, Duration::from_secs(60))
            .unwrap();
        assert_eq!(token.expose(), "1000.access");
        assert!(remaining > Duration::from_secs(2990));
        assert!(
            file.load()
                .unwrap()
                .unwrap()
                .valid_access_token("other", &refresh, Duration::ZERO)
                .is_none()
        );
        // Another refresh token (new scopes, a leaked one replaced) starts afresh.
        let other = Secret::new("1000.another".to_owned());
        assert!(
            loaded
                .valid_access_token("id", &other, Duration::ZERO)
                .is_none()
        );
        assert!(
            !std::fs::read_to_string(file.path())
                .unwrap()
                .contains("1000.refresh")
        );
        // No temp files left behind.
        assert_eq!(
            std::fs::read_dir(dir.path().join("sub")).unwrap().count(),
            1
        );
    }

    #[tokio::test]
    async fn a_reload_s_refresh_token_names_the_tokens_saved_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = TokenFile::new(dir.path().join("token.json"));
        let (r1, r2) = (
            Secret::new("1000.r1".to_owned()),
            Secret::new("1000.r2".to_owned()),
        );
        let issued_with = IssuedWith::new(Some(&r1));
        let saver = TokenSaver::new(file.clone(), "id", None, issued_with.clone());
        let token = Token::new(
            Secret::new("1000.access".into()),
            Duration::from_secs(3000),
            1,
        )
        .unwrap();
        let usable_with = |r: &Secret<String>| {
            file.load()
                .unwrap()
                .unwrap()
                .valid_access_token("id", r, Duration::ZERO)
                .is_some()
        };
        assert!(saver.save(Some(&token)).await);
        assert!(usable_with(&r1) && !usable_with(&r2));
        issued_with.set(Some(&r2));
        assert!(saver.save(Some(&token)).await);
        assert!(!usable_with(&r1) && usable_with(&r2));
    }

    #[tokio::test]
    async fn a_refresh_token_exchange_stored_while_the_proxy_runs_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let file = TokenFile::new(dir.path().join("token.json"));
        let (r1, r2) = (
            Secret::new("1000.r1".to_owned()),
            Secret::new("1000.r2".to_owned()),
        );
        let saver = TokenSaver::new(
            file.clone(),
            "id",
            Some(r1.clone()),
            IssuedWith::new(Some(&r1)),
        );
        let token = Token::new(
            Secret::new("1000.access".into()),
            Duration::from_secs(3000),
            1,
        )
        .unwrap();
        let stored_refresh_token = || {
            file.load()
                .unwrap()
                .unwrap()
                .refresh_token
                .map(|r| r.expose().clone())
        };
        assert!(saver.save(Some(&token)).await);
        assert_eq!(stored_refresh_token().as_deref(), Some("1000.r1"));
        // `exchange` stores a new refresh token, as it does: no access token.
        file.save(&StoredTokens {
            client_id: Some("id".into()),
            refresh_token: Some(r2.clone()),
            ..StoredTokens::default()
        })
        .unwrap();
        assert!(saver.save(Some(&token)).await);
        assert_eq!(stored_refresh_token().as_deref(), Some("1000.r2"));
        // The access token saved came from r1: a start with r2 does not reuse it.
        let loaded = file.load().unwrap().unwrap();
        assert!(
            loaded
                .valid_access_token("id", &r2, Duration::ZERO)
                .is_none()
        );
        assert!(
            loaded
                .valid_access_token("id", &r1, Duration::ZERO)
                .is_some()
        );
        // A file that is gone gets the refresh token it had at the start.
        std::fs::remove_file(file.path()).unwrap();
        assert!(saver.save(Some(&token)).await);
        assert_eq!(stored_refresh_token().as_deref(), Some("1000.r1"));
    }

    #[test]
    fn an_expiry_beyond_the_clock_is_no_access_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token.json");
        let text = format!(
            r#"{{"version":1,"client_id":"id","refresh_token":"1000.refresh","access_token":"1000.access","access_token_expires_at":{}}}"#,
            u64::MAX
        );
        std::fs::write(&path, text).unwrap();
        let loaded = TokenFile::new(&path).load().unwrap().unwrap();
        assert!(loaded.access_token.is_none());
        assert_eq!(loaded.refresh_token.unwrap().expose(), "1000.refresh");
    }

    #[test]
    fn a_corrupt_file_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token.json");
        std::fs::write(&path, "{not json").unwrap();
        let err = TokenFile::new(&path).load().unwrap_err();
        assert!(err.to_string().contains("corrupt"), "{err}");
    }
}
