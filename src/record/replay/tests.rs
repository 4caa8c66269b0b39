use super::load::is_desk_host;
use super::*;
use crate::record::har::{self, Entry};

#[test]
fn an_escape_matches_in_any_case_and_the_query_in_any_order() {
    assert_eq!(
        request_line("GET", "/api/v1/caf%c3%a9?b=2&a=1"),
        request_line("GET", "/api/v1/caf%C3%A9?a=1&b=2")
    );
    assert_ne!(
        request_line("GET", "/api/v1/caf%c3%a9"),
        request_line("GET", "/api/v1/CAF%c3%a9")
    );
}

#[test]
fn queries_match_in_any_order_and_spelling() {
    assert_eq!(
        request_line("GET", "/api/v1/tickets?limit=2&from=0"),
        request_line("GET", "/api/v1/tickets?from=0&limit=2")
    );
    assert_eq!(
        request_line("GET", "/a?q=a+b"),
        request_line("GET", "/a?q=a%20b")
    );
    assert_ne!(request_line("GET", "/a?q=1"), request_line("GET", "/a?q=2"));
    assert_eq!(request_line("GET", "/a?"), "GET /a");
}

/// A recording of `n` distinct ticket reads, each answered with a 1 KiB body.
fn recording(dir: &Path, n: usize) -> PathBuf {
    let body = format!("{{\"data\":\"{}\"}}", "x".repeat(1024));
    let entries: Vec<String> = (0..n)
        .map(|i| {
            let entry = Entry {
                request: har::Request {
                    method: "GET".into(),
                    url: format!("https://desk.zoho.com/api/v1/tickets/{i}?include=contacts"),
                    ..Default::default()
                },
                response: har::Response {
                    status: 200,
                    content: har::Content {
                        text: Some(body.clone()),
                        ..Default::default()
                    },
                    ..Default::default()
                },
                ..Default::default()
            };
            serde_json::to_string(&entry).unwrap()
        })
        .collect();
    let path = dir.join(format!("{n}.har"));
    std::fs::write(&path, har::layout(entries.iter().map(String::as_str))).unwrap();
    path
}

/// The median time of `lookups` lookups, in nanoseconds, over 5 runs.
fn lookup_ns(replay: &Replay, requests: &[String]) -> u128 {
    let mut runs: Vec<u128> = (0..5)
        .map(|_| {
            let started = std::time::Instant::now();
            for request in requests {
                let found = replay.lookup(&Method::GET, request, None);
                std::hint::black_box(&found);
            }
            started.elapsed().as_nanos() / requests.len() as u128
        })
        .collect();
    runs.sort_unstable();
    runs[2]
}

/// 10,000 entries load in well under a second, and a lookup (hit or miss) costs the
/// same with 10,000 entries as with 100. For the figures: `cargo test --release --lib
/// a_large_recording -- --nocapture`.
#[test]
fn a_large_recording_loads_fast_and_matches_in_constant_time() {
    let dir = tempfile::tempdir().unwrap();
    let small = Replay::load(&recording(dir.path(), 100), &[], "").unwrap();
    let large_file = recording(dir.path(), 10_000);
    let started = std::time::Instant::now();
    let large = Replay::load(&large_file, &[], "").unwrap();
    let load = started.elapsed();
    assert_eq!(large.entries(), 10_000);
    // Unoptimized (`cargo test`), JSON parsing is some ten times slower than in the
    // release binary: `cargo test --release` holds it to half a second.
    let bound = if cfg!(debug_assertions) { 5_000 } else { 500 };
    assert!(
        load < std::time::Duration::from_millis(bound),
        "10,000 entries loaded in {load:?}"
    );

    let hits: Vec<String> = (0..100)
        .map(|i| format!("/api/v1/tickets/{i}?include=contacts"))
        .collect();
    let misses: Vec<String> = (0..100)
        .map(|i| format!("/api/v1/tickets/{i}/threads?from={}", "9".repeat(2000)))
        .collect();
    for (what, requests) in [("hit", &hits), ("miss", &misses)] {
        let (at_100, at_10k) = (lookup_ns(&small, requests), lookup_ns(&large, requests));
        println!("{what}: {at_100} ns with 100 entries, {at_10k} ns with 10,000");
        // A scan of the entries would be ~100× slower; allow for a noisy machine.
        assert!(
            at_10k < at_100.max(1_000) * 5,
            "{what}: {at_100} ns vs {at_10k} ns"
        );
    }
    println!(
        "10,000 entries ({} MiB) loaded in {load:?}",
        std::fs::metadata(&large_file).unwrap().len() >> 20
    );
    // The closest to a miss is still the nearest request.
    for (request, expected) in [
        // Another path's query is not named.
        ("/api/v1/tickets/42/threads", "GET /api/v1/tickets/42"),
        (
            "/api/v1/tickets/42",
            "GET /api/v1/tickets/42?include=contacts",
        ),
        (
            "/api/v1/tickets/42?include=x",
            "GET /api/v1/tickets/42?include=contacts",
        ),
    ] {
        let Lookup::Miss { closest, .. } = large.lookup(&Method::GET, request, None) else {
            panic!("{request} is a miss");
        };
        assert_eq!(closest, Some(expected), "{request}");
    }
    let Lookup::Miss { closest, .. } = large.lookup(&Method::GET, "/api/v2/x", None) else {
        panic!("a miss");
    };
    assert!(
        closest.is_some_and(|c| c.starts_with("GET /api/v1/tickets/")),
        "{closest:?}"
    );
}

#[test]
fn desk_hosts_are_zoho_s_and_the_configured_ones() {
    let configured = vec!["desk.example.com".to_owned()];
    for host in [
        "desk.zoho.com",
        "desk.zoho.eu",
        "desk.zohocloud.ca",
        "desk.example.com",
    ] {
        assert!(is_desk_host(host, &configured), "{host}");
    }
    assert!(!is_desk_host("static.zohocdn.com", &configured));
    assert!(!is_desk_host("accounts.zoho.com", &configured));
    // A name that only starts as Desk's is another site's.
    assert!(!is_desk_host("desk.zoho.com.evil.example", &configured));
    assert!(!is_desk_host("desk.zohocloud.ca.evil.example", &configured));
}
