//! The binary: parse the command line, set up logging, run. `anyhow` lives here only.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use std::io::Write;

use tracing_subscriber::EnvFilter;

use zoho_desk_proxy::RunError;
use zoho_desk_proxy::cli::{CaCommand, Cli, Command, ServeArgs};
use zoho_desk_proxy::config::{Config, ConfigError, LogFormat};

/// mimalloc: fewer instructions per request than glibc's allocator, and less memory at
/// 1000 connections (README "Performance"). Built without its transparent-huge-page
/// advice (`no_thp`); see also [`small_pages`].
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc commits its first arena (1 GiB of address space) at once on Linux. Where the
/// kernel's transparent huge pages are `always`, each 2 MiB of it that is touched becomes
/// resident whole: 19.1 MiB at start. The proxy's memory is many small buffers, so from
/// here on it asks for ordinary pages: 13.3 MiB at start (what was touched before `main`
/// stays as it was; 9.5 MiB where huge pages are `madvise`, as on the development VM). A
/// kernel that refuses leaves the process as it was, which is not worth an error.
#[cfg(target_os = "linux")]
fn small_pages() {
    let _ = rustix::thread::disable_transparent_huge_pages(true);
}

#[cfg(not(target_os = "linux"))]
fn small_pages() {}

fn main() -> ExitCode {
    small_pages();
    let cli = Cli::parse();
    // This thread accepts connections and runs the background work (refreshes, signals,
    // the token file); requests are served by the worker threads of `server`.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            let _ = writeln!(LossyStderr, "error: cannot start the runtime: {err}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            None => serve(cli.serve).await,
            Some(Command::Serve(args)) => serve(args).await,
            Some(Command::Demo(args)) => {
                init_logging(None);
                zoho_desk_proxy::demo::run_demo(
                    args.listen,
                    args.intercept,
                    args.record,
                    shutdown_signal(),
                )
                .await
                .map_err(Into::into)
            }
            Some(Command::Replay(args)) => {
                serve(ServeArgs {
                    config: args.config,
                    listen: args.listen,
                    record: None,
                    replay: Some(args.file),
                    replay_strict: args.replay_strict,
                })
                .await
            }
            Some(Command::Ca(CaCommand::Init(args))) => {
                let config = Config::load_without_credentials(args.config.as_deref())?;
                let message =
                    zoho_desk_proxy::ops::ca_init(&config, args.dir.as_deref(), args.force)?;
                println!("{message}");
                Ok(())
            }
            Some(Command::Env(args)) => {
                let mut config = Config::load_without_credentials(args.config.as_deref())?;
                if let Some(listen) = args.listen {
                    config.listen = listen;
                }
                print!("{}", zoho_desk_proxy::ops::env_lines(&config)?);
                Ok(())
            }
            Some(Command::Exchange(args)) => {
                let config = Config::load(args.config.as_deref())?;
                init_logging(config.log_format);
                let message = zoho_desk_proxy::ops::exchange(&config, &args.code).await?;
                println!("{message}");
                Ok(())
            }
            Some(Command::Check(args)) => {
                // The same validation as `serve`, so that `check` never passes a
                // configuration `serve` refuses.
                let config = match Config::load_to_serve(args.config.as_deref(), None)
                    .and_then(zoho_desk_proxy::ready_config)
                {
                    Ok(config) => config,
                    Err(err) => {
                        println!("[FAIL] configuration:\n{err}");
                        return Err(err.into());
                    }
                };
                let (report, ok) = zoho_desk_proxy::ops::check(&config).await;
                print!("{report}");
                if ok {
                    Ok(())
                } else {
                    Err(anyhow::anyhow!("check failed"))
                }
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // Never a panic for a closed stderr: the exit code says it all the same.
            let _ = writeln!(LossyStderr, "error: {}", message(&err));
            ExitCode::from(exit_code(&err))
        }
    }
}

/// The error and its causes on one line, each said once. The library's errors say their
/// cause in their own text (their log lines need it), and also return it as their source;
/// a context added here says only what was being done. So a cause whose text is already
/// in the line is not repeated, and every other one is appended (`{:#}` would print
/// "cannot read x: No such file…: No such file…").
fn message(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// 2 for configuration and usage errors, 1 for everything else (README "Command line").
fn exit_code(err: &anyhow::Error) -> u8 {
    let is_config = err.chain().any(|cause| {
        cause.is::<ConfigError>()
            || cause
                .downcast_ref::<zoho_desk_proxy::ops::OpsError>()
                .is_some_and(|e| matches!(e, zoho_desk_proxy::ops::OpsError::Config(_)))
            || cause
                .downcast_ref::<RunError>()
                .is_some_and(RunError::is_usage)
    });
    if is_config { 2 } else { 1 }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // A replay answers from its file: no Zoho credentials needed.
    let mut config = if args.replay.is_some() {
        Config::load_for_replay(args.config.as_deref(), args.listen)?
    } else {
        Config::load_to_serve(args.config.as_deref(), args.listen)?
    };
    config.record.file = args.record;
    config.record.replay = args.replay;
    config.record.replay_strict = args.replay_strict;
    // Every problem is reported before anything binds.
    let config = zoho_desk_proxy::ready_config(config)?;
    init_logging(config.log_format);
    zoho_desk_proxy::warn_about(&config);
    let shutdown = shutdown_signal();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let reload = reload_on_sighup(args.config.clone(), args.listen);
    zoho_desk_proxy::run_with_reload(config, listener, shutdown, reload).await?;
    Ok(())
}

/// On SIGHUP, re-reads the configuration (and the token file's refresh token) and hands
/// it to the proxy, which takes the new OAuth credentials. It is checked for the address
/// served on (`--listen` included), as at start.
fn reload_on_sighup(
    path: Option<std::path::PathBuf>,
    listen: Option<std::net::SocketAddr>,
) -> Option<tokio::sync::mpsc::Receiver<Config>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangup = signal(SignalKind::hangup()).ok()?;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                match Config::load_to_serve(path.as_deref(), listen)
                    .and_then(zoho_desk_proxy::ready_config)
                {
                    Ok(config) => {
                        tracing::info!("SIGHUP: configuration re-read");
                        if tx.send(config).await.is_err() {
                            return;
                        }
                    }
                    Err(err) => {
                        tracing::error!(error = %err, "SIGHUP: the configuration is invalid; keeping the current one")
                    }
                }
            }
        });
        Some(rx)
    }
    #[cfg(not(unix))]
    {
        let _ = (path, listen);
        None
    }
}

/// Logs go to stderr: `pretty` on a terminal, else JSON; level from `RUST_LOG`, `info`
/// when it is unset, blank (a compose file's `RUST_LOG=${LOG_LEVEL}` with nothing to
/// substitute must not silence the proxy) or not a filter. Colours only on a terminal.
fn init_logging(format: Option<LogFormat>) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|level| !level.trim().is_empty())
        .and_then(|level| EnvFilter::try_new(level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let terminal = std::io::stderr().is_terminal();
    let format = format.unwrap_or(if terminal {
        LogFormat::Pretty
    } else {
        LogFormat::Json
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(terminal)
        .with_writer(|| LossyStderr);
    let _ = match format {
        LogFormat::Pretty => builder.compact().try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
}

/// Standard error, where a line that cannot be written is dropped: a log reader that went
/// away (`| tee` exiting, journald restarting) must not stop the proxy. tracing-subscriber
/// reports a failed write with `eprintln!`, which panics on the same closed pipe, and a
/// panic there aborts the process.
struct LossyStderr;

impl std::io::Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// Resolves on SIGTERM or SIGINT. The signals are taken over when this is called, not
/// when the future is first polled: a SIGTERM right after the proxy said it listens must
/// stop it gracefully, not kill it.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let signals = {
        use tokio::signal::unix::{SignalKind, signal};
        (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        )
    };
    async move {
        #[cfg(unix)]
        match signals {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
