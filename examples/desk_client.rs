//! A Zoho Desk API client that knows nothing about OAuth: it talks plain HTTP to the
//! proxy, which adds the token.
//!
//! ```sh
//! cargo run --release -- demo            # in one terminal (or a real `serve`)
//! ZOHO_PROXY_URL=http://127.0.0.1:8080 cargo run --example desk_client
//! ```
//!
//! Without `ZOHO_PROXY_URL` the example starts the fake Zoho and the proxy in-process,
//! so it runs anywhere.

use std::time::Duration;

use serde_json::{Value, json};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (base, _running) = match std::env::var("ZOHO_PROXY_URL") {
        Ok(url) => (url, None),
        Err(_) => {
            let running = in_process::start().await?;
            (running.url.clone(), Some(running))
        }
    };
    // Any Desk client works: just point its base URL at the proxy.
    let desk = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;

    let tickets: Value = desk
        .get(format!("{base}/api/v1/tickets?limit=5"))
        .send()
        .await?
        .json()
        .await?;
    println!("open tickets:");
    for t in tickets["data"].as_array().into_iter().flatten() {
        let field = |name: &str| t[name].as_str().unwrap_or("?").to_owned();
        println!(
            "  #{} {} [{}]",
            field("ticketNumber"),
            field("subject"),
            field("status")
        );
    }

    let created: Value = desk
        .post(format!("{base}/api/v1/tickets"))
        .json(&json!({ "subject": "Created through zoho-desk-proxy", "status": "Open" }))
        .send()
        .await?
        .json()
        .await?;
    println!(
        "created ticket {} (#{})",
        created["id"].as_str().unwrap_or("?"),
        created["ticketNumber"].as_str().unwrap_or("?")
    );

    let ready: Value = desk
        .get(format!("{base}/_proxy/ready"))
        .send()
        .await?
        .json()
        .await?;
    println!("proxy: {ready}");
    Ok(())
}

mod in_process {
    use tokio::net::TcpListener;
    use tokio::sync::oneshot;
    use zoho_desk_proxy::demo::demo_config;
    use zoho_desk_proxy::fake_zoho::{FakeOptions, FakeZoho};

    /// The fake Zoho and a proxy in front of it, stopped on drop.
    pub struct Running {
        pub url: String,
        _fake: FakeZoho,
        _stop: oneshot::Sender<()>,
    }

    pub async fn start() -> std::io::Result<Running> {
        let options = FakeOptions::default();
        let fake = FakeZoho::start_with(options.clone()).await?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let config = demo_config(&fake, &options, addr);
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(zoho_desk_proxy::run(config, listener, async {
            let _ = stopped.await;
        }));
        Ok(Running {
            url: format!("http://{addr}"),
            _fake: fake,
            _stop: stop,
        })
    }
}
