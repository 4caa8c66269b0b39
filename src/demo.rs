//! `demo`: the real proxy in front of the built-in fake Zoho, with short-lived tokens so
//! that refreshes show in the log. Needs no credentials and no network.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::TcpListener;

use crate::app::{RunError, run};
use crate::config::Config;
use crate::fake_zoho::{FakeOptions, FakeZoho};

/// Token lifetime in the demo: the proxy refreshes at half-life, every 30 s.
pub const DEMO_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

/// The proxy's configuration for a fake Zoho.
pub fn demo_config(fake: &FakeZoho, options: &FakeOptions, listen: SocketAddr) -> Config {
    let toml = format!(
        r#"
        listen = "{listen}"
        upstream = "{desk}"
        accounts_url = "{accounts}"
        org_id = "60001234567"
        token_file = ""

        [oauth]
        client_id = "{client_id}"
        client_secret = "{client_secret}"
        refresh_token = "{refresh_token}"
        refresh_margin_secs = 300
        max_refreshes_per_10min = 30
        "#,
        desk = fake.desk_url(),
        accounts = fake.accounts_url(),
        client_id = options.client_id,
        client_secret = options.client_secret,
        refresh_token = options.refresh_token,
    );
    let mut config = match Config::from_toml(&toml) {
        Ok(config) => config,
        Err(err) => unreachable!("the demo configuration is valid: {err}"),
    };
    config.log_format = None;
    // The fake holds nothing real, so a demo may listen on any address (in a container,
    // say) without keys; on all of them, it answers whatever name it is reached by (a
    // service name, the machine's address).
    config.access.allow_unauthenticated_remote = true;
    if listen.ip().is_unspecified() {
        config.access.allow_hosts = Some(vec!["*".into()]);
    }
    config
}

/// Where a client on this machine reaches a proxy listening on `listen`: loopback for
/// an address that is all of them (`0.0.0.0`, `::`), which is no address to send to.
pub fn reachable(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// Runs the demo until `shutdown` resolves.
pub async fn run_demo(
    listen: SocketAddr,
    intercept: bool,
    record: Option<PathBuf>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    let options = FakeOptions {
        token_lifetime: DEMO_TOKEN_LIFETIME,
        ..FakeOptions::default()
    };
    let fake = FakeZoho::start_with(options.clone()).await?;
    let listener = TcpListener::bind(listen).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "cannot listen on {listen}: {e} (pick another address with --listen 127.0.0.1:8081)"
            ),
        )
    })?;
    let listen = listener.local_addr()?;
    let mut config = demo_config(&fake, &options, listen);
    if intercept {
        config.intercept.enabled = true;
        let dir = config.intercept.ca_dir.clone();
        if !dir.join(crate::intercept::ca::CA_CERT).exists() {
            crate::intercept::ca::init(&dir, &config.intercept.hosts(), false)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            println!(
                "Created the local CA in {} (zoho-desk-proxy ca init).",
                dir.display()
            );
        }
    }
    println!("{}", instructions(reachable(listen), &fake));
    if intercept {
        println!("{}", intercept_instructions(reachable(listen)));
    }
    if let Some(file) = &record {
        println!("{}", record_instructions(file, listen));
    }
    config.record.file = record;
    let result = run(config, listener, shutdown).await;
    fake.shutdown().await;
    result
}

/// What the recording gives, printed at start.
pub fn record_instructions(file: &Path, listen: SocketAddr) -> String {
    format!(
        r#"Recording the demo's Desk traffic to {file} (HAR 1.2: open it in a browser's devtools).
After Ctrl-C, answer the same requests from it with no fake and no credentials:
  zoho-desk-proxy replay {file} --listen {listen} --replay-strict    # or: cargo run --release -- replay …
"#,
        file = file.display()
    )
}

/// What to try in transparent mode, printed at start.
pub fn intercept_instructions(listen: SocketAddr) -> String {
    format!(
        r#"Transparent mode: clients hard-wired to https://desk.zoho.com reach this fake Desk.
In another shell, from this directory:
  eval "$(zoho-desk-proxy env --listen {listen})"    # or: eval "$(cargo run -q -- env --listen {listen})"
  curl https://desk.zoho.com/api/v1/tickets
  python3 examples/desk_python.py                     # a requests-based client, unchanged
"#
    )
}

/// What to try, printed at start.
pub fn instructions(listen: SocketAddr, fake: &FakeZoho) -> String {
    let base = format!("http://{listen}");
    format!(
        r#"
zoho-desk-proxy demo: the real proxy in front of a built-in fake Zoho (Accounts + Desk).
  proxy:          {base}
  fake Desk:      {desk}  (needs a token: try it without the proxy and get INVALID_OAUTH)
  fake Accounts:  {accounts}
Tokens live {life} s and are refreshed at half-life: watch the "token refreshed" lines.

The fake Desk has 3 tickets and 2 contacts in memory, and answers:
  GET, HEAD  /api/v1/tickets, /api/v1/contacts (?from=0&limit=10), /api/v1/organizations
  GET, HEAD, PATCH, DELETE  /api/v1/tickets/{{id}}, /api/v1/contacts/{{id}}
  POST  /api/v1/tickets (needs "subject"), /api/v1/contacts (needs "lastName")

Try:
  curl {base}/api/v1/tickets
  curl '{base}/api/v1/tickets?from=0&limit=2'
  curl -I {base}/api/v1/tickets/{ticket}
  curl -X POST {base}/api/v1/tickets -H 'Content-Type: application/json' -d '{{"subject":"Printer on fire","status":"Open"}}'
  curl -X PATCH {base}/api/v1/tickets/{ticket} -H 'Content-Type: application/json' -d '{{"status":"Closed"}}'
  curl -X DELETE -i {base}/api/v1/tickets/{ticket}
  curl {base}/api/v1/contacts
  curl {base}/api/v1/organizations
  curl {desk}/api/v1/tickets
  curl --path-as-is {base}/api/v1/../secrets
  curl -i -H 'Origin: https://evil.example' {base}/api/v1/tickets
  curl {base}/_proxy/health
  curl {base}/_proxy/ready
Stop with Ctrl-C.
"#,
        desk = fake.desk_url(),
        accounts = fake.accounts_url(),
        life = DEMO_TOKEN_LIFETIME.as_secs(),
        ticket = crate::fake_zoho::FIRST_TICKET_ID,
    )
}
