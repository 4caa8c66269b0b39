//! The crate's fake Zoho Accounts, alone, for `bench/run.sh`.
//!
//! ```sh
//! cargo run --release --example bench_accounts -- 4    # tokens live 4 s
//! ```
//!
//! Prints the Accounts base URL, the client id, the client secret and the refresh token
//! the fake accepts, one per line on stdout, then serves until killed. The fake also
//! binds its Desk listener (unused here): the benchmark's upstream is nginx.

use std::time::Duration;

use zoho_desk_proxy::fake_zoho::{FakeOptions, FakeZoho};

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let lifetime_secs: u64 = match std::env::args().nth(1) {
        Some(arg) => arg.parse().map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("usage: bench_accounts [TOKEN_LIFETIME_SECS], not {arg:?}"),
            )
        })?,
        None => 3600,
    };
    let options = FakeOptions {
        token_lifetime: Duration::from_secs(lifetime_secs.max(1)),
        ..FakeOptions::default()
    };
    let fake = FakeZoho::start_with(options.clone()).await?;
    println!("{}", fake.accounts_url());
    println!("{}", options.client_id);
    println!("{}", options.client_secret);
    println!("{}", options.refresh_token);
    // Runs until killed; a signal ends the process, and with it the fake's listeners.
    std::future::pending::<()>().await;
    drop(fake);
    Ok(())
}
