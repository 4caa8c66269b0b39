//! The command line (README "Command line").

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// A local reverse proxy for the Zoho Desk API that adds a fresh OAuth token to every
/// request.
#[derive(Debug, Parser)]
#[command(
    name = "zoho-desk-proxy",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// What to do; `serve` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Options of `serve`, accepted without the subcommand too.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (the default).
    Serve(ServeArgs),
    /// Run the proxy in front of a built-in fake Zoho: no credentials, no network.
    Demo(DemoArgs),
    /// Exchange a Self Client grant token for a refresh token and store it.
    Exchange(ExchangeArgs),
    /// Validate the configuration, obtain a token, call Desk once, and report.
    Check(ConfigArgs),
    /// Transparent mode's local certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Print the shell lines that make clients use the proxy for Zoho's hosts and trust
    /// its CA: `eval "$(zoho-desk-proxy env)"`.
    Env(EnvArgs),
    /// Serve Desk's answers from a recording (`serve --replay FILE.har`).
    Replay(ReplayArgs),
}

/// Options of `env`.
#[derive(Debug, Clone, Args)]
pub struct EnvArgs {
    /// Configuration file [default: ./proxy.toml when it exists].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The proxy's address, when it is not the configuration's (e.g. the demo's).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
}

/// What to do with the local CA.
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create the CA (name-constrained to Zoho's intercepted hosts).
    Init(CaInitArgs),
}

/// Options of `ca init`.
#[derive(Debug, Clone, Args)]
pub struct CaInitArgs {
    /// Where to create it [default: intercept.ca_dir, .zoho-desk-proxy/ca].
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Replace a CA that is already there.
    #[arg(long)]
    pub force: bool,
    /// Configuration file [default: ./proxy.toml when it exists].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Options of `serve`.
#[derive(Debug, Clone, Args, Default)]
pub struct ServeArgs {
    /// Configuration file [default: ./proxy.toml when it exists].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on, overriding the config [default: 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Append every request forwarded to Desk, and Desk's answer, to this HAR file.
    #[arg(long, value_name = "FILE.har", conflicts_with = "replay")]
    pub record: Option<PathBuf>,
    /// Answer from this HAR file instead of Desk: no credentials, no network.
    #[arg(long, value_name = "FILE.har")]
    pub replay: Option<PathBuf>,
    /// With --replay: exit non-zero at shutdown if any request found no recorded answer.
    // (clap leaves `requires` unchecked when an argument that conflicts is given.)
    #[arg(long, requires = "replay", conflicts_with = "record")]
    pub replay_strict: bool,
}

/// Options of `replay`.
#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    /// The recording (HAR 1.2: the proxy's, or a browser's).
    #[arg(value_name = "FILE.har")]
    pub file: PathBuf,
    /// Configuration file [default: ./proxy.toml when it exists].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on, overriding the config [default: 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Exit non-zero at shutdown if any request found no recorded answer (for CI).
    #[arg(long, alias = "strict")]
    pub replay_strict: bool,
}

/// Options of `demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Address of the proxy.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Transparent mode too: clients hard-wired to https://desk.zoho.com reach the fake
    /// Desk through `HTTPS_PROXY` (creates the local CA when there is none).
    #[arg(long)]
    pub intercept: bool,
    /// Record the demo's Desk traffic to a HAR file [FILE.har: zoho-desk-demo.har].
    #[arg(long, value_name = "FILE.har", num_args = 0..=1, default_missing_value = "zoho-desk-demo.har")]
    pub record: Option<PathBuf>,
}

/// Options of `exchange`.
#[derive(Debug, Clone, Args)]
pub struct ExchangeArgs {
    /// The grant token from the Zoho API console (Self Client → Generate Code).
    #[arg(long, value_name = "GRANT_TOKEN", value_parser = grant_token)]
    pub code: String,
    /// Configuration file [default: ./proxy.toml when it exists].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// A grant token as given, less surrounding spaces; an empty one is a usage error (it would
/// be sent to Zoho Accounts for nothing).
fn grant_token(text: &str) -> Result<String, String> {
    match text.trim() {
        "" => Err("the grant token is empty: paste the code the API console showed (Self Client → Generate Code)".into()),
        code => Ok(code.to_owned()),
    }
}

/// Options of `check`.
#[derive(Debug, Clone, Args)]
pub struct ConfigArgs {
    /// Configuration file [default: ./proxy.toml when it exists].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn replay_strict_goes_with_a_replay_only() {
        let parse = |args: &[&str]| Cli::try_parse_from(["zoho-desk-proxy"].iter().chain(args));
        assert!(parse(&["serve", "--replay", "r.har", "--replay-strict"]).is_ok());
        for args in [
            &["serve", "--replay-strict"][..],
            &["serve", "--record", "r.har", "--replay-strict"],
            &["--record", "r.har", "--replay-strict"],
        ] {
            let err = parse(args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn an_empty_grant_token_is_a_usage_error() {
        let parse = |args: &[&str]| Cli::try_parse_from(["zoho-desk-proxy"].iter().chain(args));
        for code in ["", "   "] {
            let err = parse(&["exchange", "--code", code]).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{code:?}");
            assert!(err.to_string().contains("--code"), "{err}");
        }
        match parse(&["exchange", "--code", " 1000.abc "])
            .unwrap()
            .command
        {
            Some(Command::Exchange(args)) => assert_eq!(args.code, "1000.abc"),
            other => panic!("{other:?}"),
        }
    }
}
