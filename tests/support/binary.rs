//! Driving the built binary: a config file for the fake, `serve` until it listens,
//! signals.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use zoho_desk_proxy::fake_zoho::{FakeOptions, FakeZoho};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_zoho-desk-proxy");

/// A command of the binary in `dir`, JSON logs, no `ZOHO_*` variable of the caller.
pub fn command(dir: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir)
        .env("ZOHO_PROXY_LOG_FORMAT", "json")
        .kill_on_drop(true);
    for (name, _) in std::env::vars() {
        if name.starts_with("ZOHO_") && name != "ZOHO_PROXY_LOG_FORMAT" {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// Writes `dir/proxy.toml` for the fake with the default credentials; the token file is
/// `dir/state/token.json`. `top` goes before the tables; `after_oauth` right after the
/// `[oauth]` keys (more oauth keys, then other tables).
pub fn write_config(
    dir: &Path,
    fake: &FakeZoho,
    with_refresh_token: bool,
    top: &str,
    after_oauth: &str,
) -> PathBuf {
    let o = FakeOptions::default();
    let refresh = if with_refresh_token {
        format!("refresh_token = \"{}\"", o.refresh_token)
    } else {
        String::new()
    };
    let text = format!(
        "upstream = \"{}\"\naccounts_url = \"{}\"\ntoken_file = \"{}\"\n{top}\n[oauth]\nclient_id = \"{}\"\nclient_secret = \"{}\"\n{refresh}\n{after_oauth}\n",
        fake.desk_url(),
        fake.accounts_url(),
        dir.join("state/token.json").display(),
        o.client_id,
        o.client_secret,
    );
    let path = dir.join("proxy.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The binary serving, and the address it listens on.
pub struct Serving {
    pub child: Child,
    pub addr: std::net::SocketAddr,
}

impl Serving {
    /// `http://ADDR` + path.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

/// Starts `serve` with `--listen` `listen` (a host and port 0: the kernel picks a free
/// port) and `envs`, and waits for its "listening" log line, which gives the address
/// bound; every stderr line is also sent to `lines` when given.
pub async fn serve_with(
    dir: &Path,
    config: &Path,
    listen: &str,
    envs: &[(&str, &str)],
    lines_out: Option<tokio::sync::mpsc::UnboundedSender<String>>,
) -> Serving {
    let mut cmd = command(dir);
    cmd.args(["serve", "--config"])
        .arg(config)
        .args(["--listen", listen])
        .envs(envs.iter().copied());
    listening(cmd, lines_out).await
}

/// Runs `cmd` (a command of the binary that serves) and waits for its "listening" log
/// line, which gives the address bound; every stderr line is also sent to `lines_out`.
pub async fn listening(
    mut cmd: Command,
    lines_out: Option<tokio::sync::mpsc::UnboundedSender<String>>,
) -> Serving {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    // Keep reading stderr so the child never blocks on a full pipe.
    tokio::spawn(async move {
        let mut ready_tx = Some(ready_tx);
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("zoho-desk-proxy listening")
                && let Some(tx) = ready_tx.take()
            {
                let _ = tx.send(line.clone());
            }
            if let Some(out) = &lines_out {
                let _ = out.send(line);
            }
        }
    });
    let line = tokio::time::timeout(Duration::from_secs(20), ready_rx)
        .await
        .expect("the proxy starts")
        .expect("the proxy exited before listening");
    let logged: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
    let addr = logged["listen"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no listen address in {line}"));
    Serving { child, addr }
}

/// [`serve_with`], with every stderr line of the child delivered on the returned channel.
pub async fn serve_logged(
    dir: &Path,
    config: &Path,
    listen: &str,
    envs: &[(&str, &str)],
) -> (Serving, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    (serve_with(dir, config, listen, envs, Some(tx)).await, rx)
}

/// The binary serving a fake, with every stderr line on `lines`.
pub struct Logged {
    /// Holds `proxy.toml` and the token file; removed when dropped.
    pub dir: tempfile::TempDir,
    pub child: Child,
    pub lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    pub addr: std::net::SocketAddr,
}

/// Starts `serve` for `fake` (config of [`write_config`] with the refresh token and
/// `after_oauth`) on `host` and a port the kernel picks, with `envs`.
pub async fn serve_fake_logged(
    fake: &FakeZoho,
    after_oauth: &str,
    host: &str,
    envs: &[(&str, &str)],
) -> Logged {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), fake, true, "", after_oauth);
    let (serving, lines) = serve_logged(dir.path(), &config, &format!("{host}:0"), envs).await;
    Logged {
        dir,
        child: serving.child,
        lines,
        addr: serving.addr,
    }
}

/// Starts `serve` on 127.0.0.1 and a port the kernel picks, and waits until it listens.
pub async fn serve(dir: &Path, config: &Path) -> Serving {
    serve_with(dir, config, "127.0.0.1:0", &[], None).await
}

/// Sends a signal (`TERM`, `HUP`) to the child.
pub fn signal(child: &Child, name: &str) {
    let pid = child.id().expect("running").to_string();
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid])
        .status()
        .unwrap();
    assert!(status.success());
}

/// SIGTERM.
pub fn sigterm(child: &Child) {
    signal(child, "TERM");
}
