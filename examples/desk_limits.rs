//! Desk's limits, measured (README "Desk's limits"; run by `bench/desk_limits.sh`): three
//! replicas sharing one Redis, 60 parallel clients spread over them, and the crate's fake
//! Desk capped at 10 calls at once with 200 ms answers. Runs the same load twice: without
//! the shaping (`desk.max_concurrent` far above Desk's cap, so only Desk limits) and with
//! it (`desk.max_concurrent = 10`, counted in Redis for the fleet). Prints, for each, the
//! 429s the clients saw, the 429s Desk sent, the most calls Desk had at once, and the
//! throughput, against the ceiling of 10 calls / 0.2 s = 50 requests/s.
//!
//! Needs `redis-server` on PATH. Knobs: `DESK_LIMITS_SECS` (10 per run),
//! `DESK_LIMITS_CLIENTS` (60), `DESK_LIMITS_REPLICAS` (3).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use zoho_desk_proxy::config::Config;
use zoho_desk_proxy::fake_zoho::{FakeControl, FakeOptions, FakeZoho};

type Error = Box<dyn std::error::Error + Send + Sync>;

const DESK_CAP: usize = 10;
const DESK_DELAY: Duration = Duration::from_millis(200);

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A redis-server on a Unix socket of its own, killed when dropped.
struct Redis {
    child: Child,
    dir: tempfile::TempDir,
}

impl Redis {
    async fn start() -> Result<Self, Error> {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("redis.sock");
        let child = Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(&socket)
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("redis-server: {e} (install it: apt-get install redis-server)"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if Instant::now() > deadline {
                return Err("redis-server did not start".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self { child, dir })
    }

    fn url(&self) -> String {
        format!(
            "redis+unix://{}",
            self.dir.path().join("redis.sock").display()
        )
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Outcome {
    ok: u64,
    client_429: u64,
    other: u64,
    desk_429: u64,
    desk_max: usize,
    secs: f64,
}

/// One run: `replicas` proxies with `max_concurrent`, `clients` looping GETs for `secs`.
async fn run(
    fake: &FakeZoho,
    zoho: &FakeControl,
    redis: &Redis,
    max_concurrent: usize,
    replicas: usize,
    clients: usize,
    secs: u64,
) -> Result<Outcome, Error> {
    let options = FakeOptions::default();
    let mut addrs: Vec<SocketAddr> = Vec::new();
    let mut stops = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..replicas {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let toml = format!(
            r#"
            listen = "{addr}"
            upstream = "{desk}"
            accounts_url = "{accounts}"
            token_file = ""
            token_store = "{redis}"
            [oauth]
            client_id = "{id}"
            client_secret = "{secret}"
            refresh_token = "{refresh}"
            max_refreshes_per_10min = 100
            [desk]
            max_concurrent = {max_concurrent}
            [log]
            format = "json"
            "#,
            desk = fake.desk_url(),
            accounts = fake.accounts_url(),
            redis = redis.url(),
            id = options.client_id,
            secret = options.client_secret,
            refresh = options.refresh_token,
        );
        let config = Config::from_toml(&toml)?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tasks.push(tokio::spawn(zoho_desk_proxy::run(
            config,
            listener,
            async {
                let _ = stopped.await;
            },
        )));
        stops.push(stop);
        addrs.push(addr);
    }
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()?;
    // Every replica has its token before the clock starts.
    for addr in &addrs {
        client
            .get(format!("http://{addr}/api/v1/organizations"))
            .send()
            .await?;
    }
    let desk_429_before = zoho.desk_429s();
    let ok = Arc::new(AtomicU64::new(0));
    let client_429 = Arc::new(AtomicU64::new(0));
    let other = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let workers: Vec<_> = (0..clients)
        .map(|i| {
            let url = format!("http://{}/api/v1/tickets", addrs[i % addrs.len()]);
            let (client, ok, client_429, other) = (
                client.clone(),
                Arc::clone(&ok),
                Arc::clone(&client_429),
                Arc::clone(&other),
            );
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let counter = match client.get(&url).send().await {
                        Ok(r) if r.status() == 200 => {
                            let _ = r.bytes().await;
                            &ok
                        }
                        Ok(r) if r.status() == 429 => {
                            let _ = r.bytes().await;
                            &client_429
                        }
                        _ => &other,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await?;
    }
    let secs = started.elapsed().as_secs_f64();
    for stop in stops {
        let _ = stop.send(());
    }
    for task in tasks {
        let _ = task.await;
    }
    Ok(Outcome {
        ok: ok.load(Ordering::Relaxed),
        client_429: client_429.load(Ordering::Relaxed),
        other: other.load(Ordering::Relaxed),
        desk_429: zoho.desk_429s() - desk_429_before,
        desk_max: zoho.desk_max_concurrent(),
        secs,
    })
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let secs = env_number("DESK_LIMITS_SECS", 10);
    let clients = env_number("DESK_LIMITS_CLIENTS", 60) as usize;
    let replicas = env_number("DESK_LIMITS_REPLICAS", 3) as usize;
    let redis = Redis::start().await?;
    println!(
        "{replicas} replicas sharing one Redis, {clients} parallel clients, {secs} s per run; fake Desk: {DESK_CAP} calls at once, {} ms per answer (ceiling {:.0} requests/s)",
        DESK_DELAY.as_millis(),
        DESK_CAP as f64 / DESK_DELAY.as_secs_f64()
    );
    println!();
    println!(
        "| shaping | clients saw 429 | Desk sent 429 | most calls at Desk at once | answered 200 | throughput | other failures |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (label, max_concurrent) in [
        ("none (desk.max_concurrent = 1000)", 1000),
        ("desk.max_concurrent = 10, fleet-wide", DESK_CAP),
    ] {
        // A fresh fake per run, so that its peak count is the run's.
        let fake = FakeZoho::start().await?;
        let zoho = fake.control();
        zoho.set_desk_concurrency_cap(Some(DESK_CAP));
        zoho.set_desk_delay(DESK_DELAY);
        let o = run(
            &fake,
            &zoho,
            &redis,
            max_concurrent,
            replicas,
            clients,
            secs,
        )
        .await?;
        println!(
            "| {label} | {} | {} | {} | {} | {:.1} requests/s | {} |",
            o.client_429,
            o.desk_429,
            o.desk_max,
            o.ok,
            o.ok as f64 / o.secs,
            o.other
        );
        fake.shutdown().await;
    }
    Ok(())
}
