//! Transparent mode's cost, for `bench/run.sh` (scenario `tunnel`): the same keep-alive
//! HTTP/1.1 load sent to one proxy in reverse mode (plain `GET /api/v1/tickets`) and through
//! a transparent-mode tunnel (`CONNECT desk.zoho.com:443`, TLS with the proxy's local CA,
//! then the same `GET`), in alternating rounds.
//!
//! ```sh
//! cargo run --release --example tunnel_bench -- 127.0.0.1:8080 .zoho-desk-proxy/ca/ca.pem [PROXY_PID]
//! ```
//!
//! Each of `TUNNEL_BENCH_CONCURRENCY` (64) connections sends one request after the other
//! for `TUNNEL_BENCH_SECS` (5) per run; connections (and tunnels, TLS handshakes included)
//! are opened before the clock starts. Each round starts with the other mode so that
//! machine drift cancels. Prints, per run and as medians over `TUNNEL_BENCH_ROUNDS` (3)
//! rounds: requests/s, p50 and p99 latency, the proxy's CPU per request when its pid is
//! given, and the medians of the per-round tunnel/reverse ratios. The client does the TLS
//! of its side too, on the same cores, as any client on the proxy's machine would.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

type Error = Box<dyn std::error::Error + Send + Sync>;

const HOST: &str = "desk.zoho.com";
const PATH: &str = "/api/v1/tickets";

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Reverse,
    Tunnel,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Reverse => "reverse",
            Mode::Tunnel => "tunnel",
        }
    }
}

struct Run {
    requests: u64,
    errors: u64,
    secs: f64,
    p50_us: u64,
    p99_us: u64,
    /// The proxy's CPU per request, when its pid was given.
    cpu_us: Option<f64>,
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// User + system CPU time of a process so far (/proc/PID/stat, clock ticks of 10 ms).
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which ends with the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// A client connection in `mode`, ready for requests.
async fn open(
    proxy: SocketAddr,
    mode: Mode,
    tls: &tokio_rustls::TlsConnector,
) -> Result<http1::SendRequest<Empty<Bytes>>, Error> {
    let mut stream = TcpStream::connect(proxy).await?;
    stream.set_nodelay(true)?;
    if mode == Mode::Reverse {
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        return Ok(sender);
    }
    stream
        .write_all(format!("CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n").as_bytes())
        .await?;
    // The answer's head, byte by byte: nothing of the tunnel may be read here.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await? == 0 {
            return Err("the proxy closed the connection after CONNECT".into());
        }
        head.push(byte[0]);
    }
    if !head.starts_with(b"HTTP/1.1 200") {
        return Err(format!("CONNECT refused: {}", String::from_utf8_lossy(&head)).into());
    }
    let stream = tls.connect(ServerName::try_from(HOST)?, stream).await?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

async fn run(
    proxy: SocketAddr,
    mode: Mode,
    tls: &tokio_rustls::TlsConnector,
    concurrency: usize,
    secs: u64,
    pid: Option<u32>,
) -> Result<Run, Error> {
    let mut senders = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        senders.push(open(proxy, mode, tls).await?);
    }
    // Reverse mode: the proxy's own name, as a client of it sends; tunnel: Desk's.
    let host = match mode {
        Mode::Reverse => proxy.to_string(),
        Mode::Tunnel => HOST.to_owned(),
    };
    let cpu_before = pid.and_then(cpu_time);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|mut sender| {
            let host = host.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut errors = 0u64;
                while Instant::now() < deadline {
                    let request = hyper::Request::get(PATH)
                        .header("host", &host)
                        .body(Empty::<Bytes>::new());
                    let Ok(request) = request else { break };
                    let sent = Instant::now();
                    let answer = async {
                        sender.ready().await?;
                        let response = sender.send_request(request).await?;
                        let ok = response.status() == 200;
                        response.into_body().collect().await?;
                        Ok::<_, hyper::Error>(ok)
                    };
                    match answer.await {
                        Ok(true) => latencies.push(sent.elapsed().as_micros() as u64),
                        Ok(false) => errors += 1,
                        Err(_) => {
                            errors += 1;
                            break;
                        }
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (l, e) = task.await?;
        latencies.extend(l);
        errors += e;
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = match (cpu_before, pid.and_then(cpu_time)) {
        (Some(before), Some(after)) => Some(after.saturating_sub(before)),
        _ => None,
    };
    latencies.sort_unstable();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    let requests = latencies.len() as u64;
    Ok(Run {
        requests,
        errors,
        secs,
        p50_us: at(0.50),
        p99_us: at(0.99),
        cpu_us: cpu.map(|c| c.as_secs_f64() * 1e6 / requests.max(1) as f64),
    })
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: tunnel_bench PROXY_ADDR CA_PEM [PROXY_PID]";
    let proxy: SocketAddr = args.next().ok_or(usage)?.parse()?;
    let ca = args.next().ok_or(usage)?;
    let pid: Option<u32> = args.next().map(|p| p.parse()).transpose()?;
    let secs = env_number("TUNNEL_BENCH_SECS", 5);
    let rounds = env_number("TUNNEL_BENCH_ROUNDS", 3).max(1);
    let concurrency = env_number("TUNNEL_BENCH_CONCURRENCY", 64).max(1) as usize;

    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&ca)? {
        roots.add(cert?)?;
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config));

    println!(
        "{concurrency} keep-alive HTTP/1.1 connections, {secs} s per run, {rounds} rounds, one client thread"
    );
    // Warm-up: pools, caches, the leaf certificate.
    for mode in [Mode::Reverse, Mode::Tunnel] {
        run(proxy, mode, &tls, concurrency, 1, None).await?;
    }
    let mut results: Vec<(Mode, Run)> = Vec::new();
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [Mode::Reverse, Mode::Tunnel]
        } else {
            [Mode::Tunnel, Mode::Reverse]
        };
        for mode in order {
            let r = run(proxy, mode, &tls, concurrency, secs, pid).await?;
            println!(
                "round {} {:<8} {:>8.0} req/s  p50 {:>6} µs  p99 {:>6} µs  errors {}{}",
                round + 1,
                mode.name(),
                r.requests as f64 / r.secs,
                r.p50_us,
                r.p99_us,
                r.errors,
                r.cpu_us
                    .map(|c| format!("  proxy CPU {c:.1} µs/req"))
                    .unwrap_or_default()
            );
            results.push((mode, r));
        }
    }
    let of = |mode: Mode| {
        results
            .iter()
            .filter(move |(m, _)| *m == mode)
            .map(|(_, r)| r)
    };
    let rps = |r: &Run| r.requests as f64 / r.secs;
    for mode in [Mode::Reverse, Mode::Tunnel] {
        println!(
            "{} median: {:.0} req/s, p50 {:.0} µs, p99 {:.0} µs, errors {}{}",
            mode.name(),
            median(of(mode).map(rps).collect()),
            median(of(mode).map(|r| r.p50_us as f64).collect()),
            median(of(mode).map(|r| r.p99_us as f64).collect()),
            of(mode).map(|r| r.errors).sum::<u64>(),
            if pid.is_some() {
                format!(
                    ", proxy CPU {:.1} µs/req",
                    median(of(mode).filter_map(|r| r.cpu_us).collect())
                )
            } else {
                String::new()
            }
        );
    }
    let ratio = |f: &dyn Fn(&Run) -> f64| {
        median(
            of(Mode::Tunnel)
                .zip(of(Mode::Reverse))
                .map(|(t, r)| f(t) / f(r))
                .collect(),
        )
    };
    print!(
        "tunnel/reverse (medians of per-round ratios): throughput {:.2}×, p99 {:.2}×",
        ratio(&rps),
        ratio(&|r| r.p99_us as f64)
    );
    if pid.is_some() {
        print!(
            ", proxy CPU per request {:.2}×",
            ratio(&|r| r.cpu_us.unwrap_or(f64::NAN))
        );
    }
    println!();
    Ok(())
}
