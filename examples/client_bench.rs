//! The upstream client, measured alone (issue 5: "hyper-util's pooled client vs reqwest —
//! measure both, keep the faster"), for `bench/run.sh` (scenario `client`).
//!
//! ```sh
//! cargo run --release --example client_bench -- http://127.0.0.1:8081/api/v1/tickets
//! ```
//!
//! Sends GETs to the URL from 64 concurrent tasks on one single-threaded runtime (as one
//! proxy worker does) through each client in turn: the product's (`client::build`, the
//! hyper-util pooled client) and reqwest's (no proxy, no redirects, no decompression, which
//! is what a proxy would need), and `lean-h1`, an experiment bounding what replacing
//! hyper-util's pool could save (see [`LeanPool`]). Each round starts with another client
//! so that machine drift cancels; prints requests/s and CPU per request for each, and the
//! medians of the per-round ratios to hyper-util's. Knobs: `CLIENT_BENCH_SECS` (5), `CLIENT_BENCH_ROUNDS` (3),
//! `CLIENT_BENCH_CONCURRENCY` (64).

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};

type Send = Pin<Box<dyn Future<Output = Result<usize, String>>>>;

/// One way to send a GET and read the whole answer.
trait Client: 'static {
    fn get(&self, url: &str) -> Send;
}

struct HyperUtil(
    hyper_util::client::legacy::Client<zoho_desk_proxy::upstream::Connector, Empty<Bytes>>,
);

impl Client for HyperUtil {
    fn get(&self, url: &str) -> Send {
        let client = self.0.clone();
        let uri = url.parse::<http::Uri>();
        Box::pin(async move {
            let uri = uri.map_err(|e| e.to_string())?;
            let response = client.get(uri).await.map_err(|e| e.to_string())?;
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?;
            Ok(body.to_bytes().len())
        })
    }
}

/// An experiment, not the product: a worker-local pool of hyper's connection-level HTTP/1
/// clients (no hyper-util pool, no lock, `Host` precomputed), each connection driven by its
/// own local task. It bounds what replacing hyper-util's pool could save.
struct LeanPool {
    addr: std::net::SocketAddr,
    host: http::HeaderValue,
    idle: Rc<std::cell::RefCell<Vec<hyper::client::conn::http1::SendRequest<Empty<Bytes>>>>>,
}

impl Client for LeanPool {
    fn get(&self, url: &str) -> Send {
        let (addr, host, idle) = (self.addr, self.host.clone(), Rc::clone(&self.idle));
        let path = url
            .parse::<http::Uri>()
            .ok()
            .and_then(|u| u.path_and_query().cloned());
        Box::pin(async move {
            let path = path.ok_or("no path")?;
            let popped = idle.borrow_mut().pop();
            let mut sender = match popped {
                Some(sender) => sender,
                None => {
                    let tcp = tokio::net::TcpStream::connect(addr)
                        .await
                        .map_err(|e| e.to_string())?;
                    let _ = tcp.set_nodelay(true);
                    let (sender, connection) =
                        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                            .await
                            .map_err(|e| e.to_string())?;
                    tokio::task::spawn_local(connection);
                    sender
                }
            };
            let mut request = http::Request::new(Empty::<Bytes>::new());
            *request.uri_mut() = http::Uri::from(path);
            request.headers_mut().insert(http::header::HOST, host);
            sender.ready().await.map_err(|e| e.to_string())?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| e.to_string())?;
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?;
            idle.borrow_mut().push(sender);
            Ok(body.to_bytes().len())
        })
    }
}

struct Reqwest(reqwest::Client);

impl Client for Reqwest {
    fn get(&self, url: &str) -> Send {
        let request = self.0.get(url).send();
        Box::pin(async move {
            let response = request.await.map_err(|e| e.to_string())?;
            let body = response.bytes().await.map_err(|e| e.to_string())?;
            Ok(body.len())
        })
    }
}

struct Run {
    requests: u64,
    errors: u64,
    elapsed: Duration,
    cpu: Duration,
}

impl Run {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    fn cpu_per_request_us(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.requests.max(1) as f64
    }
}

/// User + system CPU time of this process so far (/proc/self/stat, clock ticks).
fn cpu_time() -> Duration {
    let ticks_per_sec = 100.0; // USER_HZ on Linux
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the command.
    Duration::from_secs_f64((field(11) + field(12)) / ticks_per_sec)
}

async fn run(client: Rc<dyn Client>, url: Arc<str>, concurrency: usize, secs: u64) -> Run {
    let stop = Arc::new(AtomicBool::new(false));
    let requests = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    // Warm the pool first: connections are opened outside the measured time.
    let _ = client.get(&url).await;
    let started = Instant::now();
    let cpu_started = cpu_time();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, url) = (Rc::clone(&client), Arc::clone(&url));
            let (stop, requests, errors) = (
                Arc::clone(&stop),
                Arc::clone(&requests),
                Arc::clone(&errors),
            );
            tokio::task::spawn_local(async move {
                while !stop.load(Ordering::Relaxed) {
                    match client.get(&url).await {
                        Ok(_) => requests.fetch_add(1, Ordering::Relaxed),
                        Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    Run {
        requests: requests.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
        cpu: cpu_time().saturating_sub(cpu_started),
    }
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Where `lean-h1` connects, and its `Host`: plain-HTTP URLs only.
fn lean_target(url: &str) -> Result<(std::net::SocketAddr, http::HeaderValue), String> {
    use std::net::ToSocketAddrs;
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| e.to_string())?;
    if uri.scheme_str() != Some("http") {
        return Err("it speaks plain HTTP only".into());
    }
    let authority = uri.authority().ok_or("no authority")?;
    let addr = (authority.host(), authority.port_u16().unwrap_or(80))
        .to_socket_addrs()
        .map_err(|e| e.to_string())?
        .next()
        .ok_or("the host has no address")?;
    let host = http::HeaderValue::from_str(authority.as_str()).map_err(|e| e.to_string())?;
    Ok((addr, host))
}

fn main() -> Result<(), String> {
    let url: Arc<str> = std::env::args()
        .nth(1)
        .ok_or("usage: client_bench URL")?
        .into();
    let secs = env_or("CLIENT_BENCH_SECS", 5);
    let rounds = env_or("CLIENT_BENCH_ROUNDS", 3);
    let concurrency = env_or("CLIENT_BENCH_CONCURRENCY", 64) as usize;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async {
        let hyper_util: Rc<dyn Client> = Rc::new(HyperUtil(zoho_desk_proxy::upstream::build(
            Duration::from_secs(10),
            Duration::from_secs(90),
            concurrency,
            &[],
        )));
        let reqwest: Rc<dyn Client> = Rc::new(Reqwest(
            reqwest::Client::builder()
                .no_proxy()
                .redirect(reqwest::redirect::Policy::none())
                .pool_max_idle_per_host(concurrency)
                .tcp_nodelay(true)
                .build()
                .map_err(|e| e.to_string())?,
        ));
        // The first is the baseline the others are compared with.
        let mut clients: Vec<(&str, Rc<dyn Client>)> =
            vec![("hyper-util", hyper_util), ("reqwest", reqwest)];
        match lean_target(&url) {
            Ok((addr, host)) => clients.push((
                "lean-h1",
                Rc::new(LeanPool {
                    addr,
                    host,
                    idle: Rc::default(),
                }),
            )),
            Err(err) => println!("lean-h1 skipped: {err}"),
        }
        let mut ratios: Vec<(Vec<f64>, Vec<f64>)> = vec![Default::default(); clients.len()];
        for round in 1..=rounds {
            // Each round starts with a different client, so that none always runs first.
            let mut order: Vec<usize> = (0..clients.len()).collect();
            order.rotate_left(round as usize % clients.len());
            let mut runs: Vec<Option<Run>> = (0..clients.len()).map(|_| None).collect();
            for i in order {
                let (name, client) = &clients[i];
                let r = run(Rc::clone(client), Arc::clone(&url), concurrency, secs).await;
                println!(
                    "round {round} {name:<10} {:>8.0} req/s  cpu {:>6.1} us/req  errors {}",
                    r.rps(),
                    r.cpu_per_request_us(),
                    r.errors
                );
                runs[i] = Some(r);
            }
            if let Some(Some(base)) = runs.first() {
                for (i, run) in runs.iter().enumerate().skip(1) {
                    if let Some(r) = run {
                        ratios[i].0.push(r.rps() / base.rps());
                        ratios[i].1.push(r.cpu_per_request_us() / base.cpu_per_request_us());
                    }
                }
            }
        }
        for (i, (rps, cpu)) in ratios.into_iter().enumerate().skip(1) {
            println!(
                "{} / hyper-util (medians of {rounds} rounds): throughput {:.2}x, CPU per request {:.2}x",
                clients[i].0,
                median(rps),
                median(cpu)
            );
        }
        Ok(())
    })
}
