use super::state::{THROTTLE_BACKOFF, backoff};
use super::*;
use crate::token::source::{AccountsError, FetchFuture, Fetched, Grant, Refresh};
use std::sync::atomic::AtomicU32;

/// A source answering call `n` with `answer(n)` after `delay`.
struct Counting {
    calls: Arc<AtomicU32>,
    answer: fn(u32) -> Result<Fetched, AccountsError>,
    delay: Duration,
}

impl TokenSource for Counting {
    fn fetch<'a>(&'a self, _refresh: &'a Refresh<'a>) -> FetchFuture<'a> {
        Box::pin(async move {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::time::sleep(self.delay).await;
            (self.answer)(n)
        })
    }
}

fn grant(n: u32) -> Result<Fetched, AccountsError> {
    Ok(Fetched::Issued(Grant {
        access_token: Secret::new(format!("1000.token.{n}")),
        expires_in: Duration::from_secs(3600),
        refresh_token: None,
        api_domain: None,
    }))
}

fn counting(
    answer: fn(u32) -> Result<Fetched, AccountsError>,
    delay: Duration,
) -> (Counting, Arc<AtomicU32>) {
    let calls = Arc::new(AtomicU32::new(0));
    (
        Counting {
            calls: calls.clone(),
            answer,
            delay,
        },
        calls,
    )
}

/// A cache of `source` with a margin of 300 s and a guard of 10.
fn cache_of(source: impl TokenSource + 'static) -> Arc<TokenCache> {
    TokenCache::new(
        source,
        RefreshPolicy::new(Duration::from_secs(300), 10),
        Arc::default(),
    )
}

/// A task waiting for a usable token of `cache`.
fn spawn_usable(
    cache: &Arc<TokenCache>,
) -> tokio::task::JoinHandle<Result<Arc<Token>, TokenError>> {
    let cache = Arc::clone(cache);
    tokio::spawn(async move { cache.usable().await })
}

fn cache(
    answer: fn(u32) -> Result<Fetched, AccountsError>,
    max: u32,
) -> (Arc<TokenCache>, Arc<AtomicU32>) {
    let (source, calls) = counting(answer, Duration::from_millis(20));
    (
        TokenCache::new(
            source,
            RefreshPolicy::new(Duration::from_secs(300), max),
            Arc::default(),
        ),
        calls,
    )
}

#[tokio::test]
async fn concurrent_refreshes_of_one_generation_make_one_call() {
    let (cache, calls) = cache(grant, 10);
    let first = cache.usable().await.unwrap();
    let tasks: Vec<_> = (0..500)
        .map(|_| {
            let cache = cache.clone();
            let generation = first.generation;
            tokio::spawn(async move { cache.refresh_after(generation).await })
        })
        .collect();
    for task in tasks {
        let token = task.await.unwrap().unwrap();
        assert!(token.generation > first.generation);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_token_desk_rejected_is_not_handed_out_again() {
    let (cache, calls) = cache(grant, 10);
    let first = cache.usable().await.unwrap();
    assert_eq!(cache.usable().await.unwrap().generation, first.generation);
    cache.mark_rejected(&first);
    let next = cache.usable().await.unwrap();
    assert!(next.generation > first.generation);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "one refresh for the rejection"
    );
}

#[tokio::test]
async fn a_refresh_after_an_old_failure_never_returns_a_rejected_token() {
    let (cache, calls) = cache(grant, 10);
    let a = cache.usable().await.unwrap();
    cache.mark_rejected(&a);
    let b = cache.refresh_after(a.generation).await.unwrap();
    // Desk rejects the new token too, while requests that failed on `a` still ask.
    cache.mark_rejected(&b);
    let c = cache.refresh_after(a.generation).await.unwrap();
    assert!(c.generation > b.generation, "b was rejected: a newer one");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert!(!cache.is_usable(&b, Instant::now()));
}

#[tokio::test]
async fn throttling_backs_off_at_least_a_minute() {
    let (cache, calls) = cache(
        |_| Err(AccountsError::Throttled("Access Denied".into())),
        10,
    );
    let err = cache.usable().await.unwrap_err();
    assert!(
        matches!(err, TokenError::Unavailable { retry_after, .. } if retry_after >= THROTTLE_BACKOFF)
    );
    let err = cache.usable().await.unwrap_err();
    assert!(
        matches!(err, TokenError::Unavailable { retry_after, .. } if retry_after > Duration::from_secs(55))
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn rejection_is_not_retried() {
    let (cache, calls) = cache(|_| Err(AccountsError::Rejected("invalid_code".into())), 10);
    assert!(matches!(cache.usable().await, Err(TokenError::Rejected(_))));
    assert!(matches!(cache.usable().await, Err(TokenError::Rejected(_))));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(matches!(cache.readiness(), Readiness::NotReady(r) if r.contains("exchange")));
}

#[tokio::test]
async fn the_guard_caps_refreshes() {
    let (cache, calls) = cache(grant, 3);
    for _ in 0..3 {
        let g = cache.current().map_or(0, |t| t.generation);
        cache.refresh_after(g).await.unwrap();
    }
    let g = cache.current().unwrap().generation;
    let err = cache.refresh_after(g).await.unwrap_err();
    assert!(
        matches!(err, TokenError::Unavailable { retry_after, .. } if retry_after > Duration::from_secs(590))
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn the_guard_s_wait_is_told_as_it_stands() {
    let (cache, _) = cache(grant, 1);
    cache.refresh_after(0).await.unwrap();
    let g = cache.current().unwrap().generation;
    let said = |err: TokenError| match err {
        TokenError::Unavailable { reason, .. } => reason,
        other => panic!("{other:?}"),
    };
    let first = said(cache.refresh_after(g).await.unwrap_err());
    assert!(first.ends_with("the next is allowed in 600 s"), "{first}");
    tokio::time::advance(Duration::from_secs(100)).await;
    let later = said(cache.refresh_after(g).await.unwrap_err());
    assert!(later.ends_with("the next is allowed in 500 s"), "{later}");
    assert_eq!(later.matches("allowed in").count(), 1, "{later}");
    // ready says the same (the token itself is still valid here: made unusable).
    cache.mark_rejected(&cache.current().unwrap());
    assert!(
        matches!(cache.readiness(), Readiness::NotReady(r) if r.ends_with("allowed in 500 s")),
        "{:?}",
        cache.readiness()
    );
}

#[tokio::test(start_paused = true)]
async fn calls_whose_answer_was_lost_count_in_the_guard() {
    let (cache, calls) = cache(
        |n| match n % 2 {
            1 => Err(AccountsError::Interrupted("connection reset".into())),
            _ => Err(AccountsError::Unreachable("connection refused".into())),
        },
        2,
    );
    // Interrupted (counted), unreachable (not counted), interrupted (counted): then
    // the guard of 2 is closed.
    for _ in 0..3 {
        assert!(cache.usable().await.is_err());
        tokio::time::advance(Duration::from_secs(120)).await;
    }
    let err = cache.usable().await.unwrap_err();
    assert!(err.to_string().contains("refresh guard"), "{err}");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

/// A source whose call `n` answers after `delays[n]`, rejected while the cache's
/// credentials are "old".
struct Credentialed {
    name: &'static str,
    calls: Arc<AtomicU32>,
    delay: Duration,
}

impl TokenSource for Credentialed {
    fn fetch<'a>(&'a self, _refresh: &'a Refresh<'a>) -> FetchFuture<'a> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            match self.name {
                "wrong" => Err(AccountsError::Rejected("invalid_client".into())),
                _ => grant(1),
            }
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_reload_during_a_refresh_is_not_undone_by_the_old_answer() {
    let calls = Arc::new(AtomicU32::new(0));
    let cache = cache_of(Credentialed {
        name: "wrong",
        calls: calls.clone(),
        delay: Duration::from_secs(2),
    });
    let waiting = spawn_usable(&cache);
    // The wrong-secret call is in flight when the operator fixes it (SIGHUP).
    tokio::time::advance(Duration::from_millis(500)).await;
    cache.replace_source(Credentialed {
        name: "right",
        calls: calls.clone(),
        delay: Duration::from_secs(2),
    });
    let token = waiting
        .await
        .unwrap()
        .expect("the reloaded credentials answer");
    assert_eq!(token.access_token.expose(), "1000.token.1");
    assert!(matches!(cache.readiness(), Readiness::Ready(_)));
    assert_eq!(calls.load(Ordering::SeqCst), 2, "one call each");
}

/// A source that panics.
struct Panicking;

impl TokenSource for Panicking {
    fn fetch<'a>(&'a self, _refresh: &'a Refresh<'a>) -> FetchFuture<'a> {
        Box::pin(async move { panic!("a bug in a source") })
    }
}

#[tokio::test]
async fn a_panic_in_a_refresh_does_not_leave_the_flight_stuck() {
    let cache = cache_of(Panicking);
    let err = cache.usable().await.unwrap_err();
    assert!(err.to_string().contains("unexpectedly"), "{err}");
    let (source, calls) = counting(grant, Duration::ZERO);
    cache.replace_source(source);
    cache.usable().await.expect("a later refresh runs");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A source that counts its calls and panics.
struct CountedPanic(Arc<AtomicU32>);

impl TokenSource for CountedPanic {
    fn fetch<'a>(&'a self, _refresh: &'a Refresh<'a>) -> FetchFuture<'a> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move { panic!("a bug in a source (expected by this test)") })
    }
}

#[tokio::test]
async fn a_panic_in_a_refresh_backs_off_like_a_failure() {
    let calls = Arc::new(AtomicU32::new(0));
    let metrics = Arc::new(Metrics::new());
    let cache = TokenCache::new(
        CountedPanic(calls.clone()),
        RefreshPolicy::new(Duration::from_secs(300), 10),
        metrics.clone(),
    );
    for _ in 0..5 {
        let err = cache.usable().await.unwrap_err();
        assert!(err.to_string().contains("unexpectedly"), "{err}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "backing off, not calling");
    assert!(matches!(cache.readiness(), Readiness::NotReady(r) if r.contains("unexpectedly")));
    let (text, _) = metrics.encode(None, 0, false);
    assert!(
        text.contains("zoho_proxy_token_refreshes_total{result=\"error\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn a_closed_guard_is_counted_once_and_told_by_ready() {
    let (source, calls) = counting(grant, Duration::ZERO);
    let metrics = Arc::new(Metrics::new());
    let cache = TokenCache::new(
        source,
        RefreshPolicy::new(Duration::from_secs(300), 2),
        metrics.clone(),
    );
    for _ in 0..2 {
        let token = cache.usable().await.unwrap();
        cache.mark_rejected(&token);
    }
    for _ in 0..100 {
        let err = cache.usable().await.unwrap_err();
        assert!(err.to_string().contains("refresh guard"), "{err}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert!(
        matches!(cache.readiness(), Readiness::NotReady(r) if r.contains("refresh guard")),
        "{:?}",
        cache.readiness()
    );
    let (text, _) = metrics.encode(None, 0, false);
    assert!(
        text.contains("zoho_proxy_token_refreshes_total{result=\"guard_refused\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn the_fleet_s_guard_refusal_is_counted_as_such_and_does_not_grow_the_backoff() {
    let metrics = Arc::new(Metrics::new());
    let (source, _) = counting(
        |_| {
            Err(AccountsError::GuardRefused {
                retry_after: Duration::from_secs(7),
            })
        },
        Duration::ZERO,
    );
    let cache = TokenCache::new(
        source,
        RefreshPolicy::new(Duration::from_secs(300), 10),
        metrics.clone(),
    );
    let err = cache.usable().await.unwrap_err();
    assert!(
        matches!(err, TokenError::Unavailable { retry_after, .. } if retry_after <= Duration::from_secs(7)),
        "{err:?}"
    );
    assert_eq!(cache.lock().consecutive_failures, 0);
    let (text, _) = metrics.encode(None, 0, false);
    assert!(
        text.contains("zoho_proxy_token_refreshes_total{result=\"guard_refused\"} 1")
            && text.contains("zoho_proxy_token_refreshes_total{result=\"error\"} 0"),
        "{text}"
    );
}

/// Throttles once, after a reload arrives while it waits.
struct ThrottledDuringReload {
    calls: Arc<AtomicU32>,
    reloaded: Arc<tokio::sync::Notify>,
}

impl TokenSource for ThrottledDuringReload {
    fn fetch<'a>(&'a self, _refresh: &'a Refresh<'a>) -> FetchFuture<'a> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.reloaded.notified().await;
            Err(AccountsError::Throttled("Access Denied".into()))
        })
    }
}

#[tokio::test]
async fn a_throttled_answer_for_replaced_credentials_still_backs_off() {
    let (calls, reloaded) = (
        Arc::new(AtomicU32::new(0)),
        Arc::new(tokio::sync::Notify::new()),
    );
    let cache = cache_of(ThrottledDuringReload {
        calls: calls.clone(),
        reloaded: reloaded.clone(),
    });
    let waiting = spawn_usable(&cache);
    while calls.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    let (source, reloaded_calls) = counting(grant, Duration::ZERO);
    cache.replace_source(source);
    reloaded.notify_one();
    let err = waiting.await.unwrap().unwrap_err();
    assert!(
        matches!(err, TokenError::Unavailable { retry_after, .. } if retry_after > Duration::from_secs(55)),
        "{err:?}"
    );
    assert_eq!(
        reloaded_calls.load(Ordering::SeqCst),
        0,
        "Zoho asked for a wait"
    );
}

#[tokio::test]
async fn a_reload_does_not_end_a_throttling_backoff() {
    let throttled = |_| Err(AccountsError::Throttled("Access Denied".into()));
    let (cache, calls) = cache(throttled, 10);
    assert!(cache.usable().await.is_err());
    let (source, reloaded_calls) = counting(grant, Duration::ZERO);
    cache.replace_source(source);
    let err = cache.usable().await.unwrap_err();
    assert!(
        matches!(err, TokenError::Unavailable { retry_after, .. } if retry_after > Duration::from_secs(55)),
        "{err:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        reloaded_calls.load(Ordering::SeqCst),
        0,
        "Zoho asked for a wait"
    );
}

/// A source that reports what arrived in the cache instead of calling when it can.
struct Patient {
    calls: Arc<AtomicU32>,
    delay: Duration,
}

impl TokenSource for Patient {
    fn fetch<'a>(&'a self, refresh: &'a Refresh<'a>) -> FetchFuture<'a> {
        Box::pin(async move {
            // Waiting on something (Redis) before deciding to call.
            tokio::time::sleep(self.delay).await;
            if refresh.arrived() {
                return Ok(Fetched::Arrived);
            }
            self.calls.fetch_add(1, Ordering::SeqCst);
            grant(9)
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_token_that_arrives_while_a_refresh_waits_costs_no_call() {
    let calls = Arc::new(AtomicU32::new(0));
    let cache = cache_of(Patient {
        calls: calls.clone(),
        delay: Duration::from_secs(1),
    });
    let waiting = spawn_usable(&cache);
    tokio::time::advance(Duration::from_millis(100)).await;
    // The fleet's token arrives (the store's follower adopts it).
    let adopted = cache
        .install(Secret::new("1000.fleet".into()), Duration::from_secs(3000))
        .unwrap();
    let token = waiting.await.unwrap().unwrap();
    assert_eq!(token.generation, adopted.generation);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn install_never_replaces_a_newer_token_nor_brings_back_a_rejected_one() {
    let (cache, _) = cache(grant, 10);
    let long = cache
        .install(Secret::new("1000.long".into()), Duration::from_secs(3000))
        .unwrap();
    assert!(
        cache
            .install(Secret::new("1000.short".into()), Duration::from_secs(100))
            .is_none(),
        "a token read before a newer one arrived"
    );
    assert!(
        cache
            .install(Secret::new("1000.long".into()), Duration::from_secs(3500))
            .is_none(),
        "the same token"
    );
    cache.mark_rejected(&long);
    assert!(
        cache
            .install(Secret::new("1000.long".into()), Duration::from_secs(3500))
            .is_none(),
        "a token Desk rejected"
    );
    let later = cache
        .install(Secret::new("1000.other".into()), Duration::from_secs(100))
        .expect("any usable token beats a rejected one");
    assert!(later.generation > long.generation);
}

#[test]
fn backoff_doubles_with_jitter_up_to_the_cap() {
    let policy = RefreshPolicy::new(Duration::from_secs(300), 5);
    for (failures, lo, hi) in [
        (1, 0.75, 1.25),
        (2, 1.5, 2.5),
        (3, 3.0, 5.0),
        (10, 45.0, 60.0),
    ] {
        let d = backoff(&policy, failures).as_secs_f64();
        assert!(d >= lo && d <= hi, "{failures}: {d}");
    }
}

#[test]
fn margin_is_capped_at_half_the_lifetime() {
    let token = Token::new(Secret::new("t".into()), Duration::from_secs(60), 1).unwrap();
    assert_eq!(
        token.refresh_at(Duration::from_secs(300)),
        token.expires_at - Duration::from_secs(30)
    );
    assert_eq!(
        token.refresh_at(Duration::from_secs(10)),
        token.expires_at - Duration::from_secs(10)
    );
}
