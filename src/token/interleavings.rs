//! Randomized interleavings of the token cache, on tokio's paused clock: many simulated
//! requests, Desk revoking tokens, Accounts slow, failing, throttling or losing answers,
//! reloads of the credentials (right, wrong, or a source that panics), and the invariants
//! checked after every step:
//! - a token handed out is usable: never a generation Desk rejected;
//! - one Accounts call at a time, and none while a usable newer token is already held;
//! - never more calls that may issue a token than the guard allows in any 10 minutes;
//! - never a stuck refresh: once Accounts and the credentials are right again, a token
//!   comes.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::cache::{RefreshPolicy, TokenCache};
use super::source::{AccountsError, FetchFuture, Fetched, Grant, Refresh, TokenSource};
use crate::secret::Secret;

const GUARD: u32 = 5;
const WINDOW: Duration = Duration::from_secs(600);

/// How the simulated Accounts answers.
#[derive(Debug, Clone, Copy)]
enum Mode {
    Normal,
    Slow,
    Unreachable,
    Interrupted,
    Throttled,
    Timeout,
}

/// The world the cache lives in: Accounts and Desk, and what went wrong.
#[derive(Default)]
struct World {
    /// The world's own randomness (seeded), for Accounts' answer times.
    rng: Mutex<fastrand::Rng>,
    mode: Mutex<Option<Mode>>,
    in_flight: AtomicU32,
    issued: AtomicU32,
    /// When each call that may have issued a token was made.
    counted: Mutex<Vec<Instant>>,
    /// Access tokens Desk no longer accepts.
    revoked: Mutex<HashSet<String>>,
    violations: Mutex<Vec<String>>,
}

impl World {
    fn violate(&self, what: String) {
        self.violations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(what);
    }

    fn mode(&self) -> Mode {
        self.mode.lock().unwrap().unwrap_or(Mode::Normal)
    }
}

/// Accounts as seen through one set of credentials.
struct Sim {
    world: Arc<World>,
    wrong: bool,
    /// The next call panics (a bug in a source), once.
    panics: std::sync::atomic::AtomicBool,
}

impl TokenSource for Sim {
    fn fetch<'a>(&'a self, refresh: &'a Refresh<'a>) -> FetchFuture<'a> {
        Box::pin(async move {
            if self.panics.swap(false, Ordering::SeqCst) {
                panic!("a simulated bug in a token source (expected by this test)");
            }
            if refresh.arrived() {
                return Ok(Fetched::Arrived);
            }
            if self.world.in_flight.fetch_add(1, Ordering::SeqCst) != 0 {
                self.world.violate("two Accounts calls at once".into());
            }
            let mode = self.world.mode();
            let delay = match mode {
                Mode::Slow | Mode::Timeout => Duration::from_secs(5),
                _ => Duration::from_millis(self.world.rng.lock().unwrap().u64(20..2_000)),
            };
            let may_issue = !self.wrong
                && matches!(
                    mode,
                    Mode::Normal | Mode::Slow | Mode::Interrupted | Mode::Timeout
                );
            if may_issue {
                self.world.counted.lock().unwrap().push(Instant::now());
            }
            tokio::time::sleep(delay).await;
            self.world.in_flight.fetch_sub(1, Ordering::SeqCst);
            if self.wrong {
                return Err(AccountsError::Rejected("invalid_client".into()));
            }
            match mode {
                Mode::Normal | Mode::Slow => {
                    let n = self.world.issued.fetch_add(1, Ordering::SeqCst);
                    Ok(Fetched::Issued(Grant {
                        access_token: Secret::new(format!("1000.sim.{n}")),
                        expires_in: Duration::from_secs(3600),
                        refresh_token: None,
                        api_domain: None,
                    }))
                }
                Mode::Unreachable => Err(AccountsError::Unreachable("refused".into())),
                Mode::Interrupted => Err(AccountsError::Interrupted("reset".into())),
                Mode::Throttled => Err(AccountsError::Throttled("Access Denied".into())),
                Mode::Timeout => Err(AccountsError::Timeout(delay)),
            }
        })
    }
}

/// One client request: a usable token, sent; Desk answers after `at_desk`; on its 401
/// the token is marked and the request retried once with a newer one.
async fn request(cache: Arc<TokenCache>, world: Arc<World>, at_desk: Duration) {
    let Ok(token) = cache.usable().await else {
        return;
    };
    if !cache.is_usable(&token, Instant::now()) {
        world.violate(format!(
            "generation {} handed out after Desk rejected it",
            token.generation
        ));
    }
    tokio::time::sleep(at_desk).await;
    if !world
        .revoked
        .lock()
        .unwrap()
        .contains(token.access_token.expose())
    {
        return;
    }
    cache.mark_rejected(&token);
    let Ok(retry) = cache.refresh_after(token.generation).await else {
        return;
    };
    if retry.generation <= token.generation || !cache.is_usable(&retry, Instant::now()) {
        world.violate(format!(
            "retry of generation {} got generation {}, not usable",
            token.generation, retry.generation
        ));
    }
    if world
        .revoked
        .lock()
        .unwrap()
        .contains(retry.access_token.expose())
    {
        cache.mark_rejected(&retry);
    }
}

fn check(world: &World) {
    let violations = world.violations.lock().unwrap().clone();
    assert!(violations.is_empty(), "{violations:#?}");
    let counted = world.counted.lock().unwrap();
    for (i, start) in counted.iter().enumerate() {
        let in_window = counted[i..]
            .iter()
            .take_while(|t| t.duration_since(*start) < WINDOW)
            .count();
        assert!(
            in_window <= GUARD as usize,
            "{in_window} calls that may issue a token within 10 minutes (guard {GUARD})"
        );
    }
}

async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

async fn run(seed: u64, steps: usize) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let world = Arc::new(World {
        rng: Mutex::new(fastrand::Rng::with_seed(seed ^ 0x5eed)),
        ..World::default()
    });
    let sim = |world: &Arc<World>, wrong: bool, panics: bool| Sim {
        world: Arc::clone(world),
        wrong,
        panics: panics.into(),
    };
    let cache = TokenCache::new(
        sim(&world, false, false),
        RefreshPolicy::new(Duration::from_secs(300), GUARD),
        Arc::default(),
    );
    let background = tokio::spawn(Arc::clone(&cache).run_background(std::future::pending()));
    let mut tasks = Vec::new();
    for _ in 0..steps {
        match rng.u8(0..100) {
            0..=39 => {
                for _ in 0..rng.usize(1..6) {
                    let at_desk = Duration::from_millis(rng.u64(0..8_000));
                    tasks.push(tokio::spawn(request(
                        Arc::clone(&cache),
                        Arc::clone(&world),
                        at_desk,
                    )));
                }
            }
            40..=49 => {
                if let Some(current) = cache.current() {
                    world
                        .revoked
                        .lock()
                        .unwrap()
                        .insert(current.access_token.expose().clone());
                }
            }
            50..=64 => {
                let mode = [
                    Mode::Normal,
                    Mode::Normal,
                    Mode::Slow,
                    Mode::Unreachable,
                    Mode::Interrupted,
                    Mode::Throttled,
                    Mode::Timeout,
                ][rng.usize(0..7)];
                *world.mode.lock().unwrap() = Some(mode);
            }
            65..=71 => {
                let wrong = rng.u8(0..3) == 0;
                let panics = !wrong && rng.u8(0..10) == 0;
                cache.replace_source(sim(&world, wrong, panics));
            }
            // Sleeping (not advancing) lets the paused clock jump from timer to timer, so
            // every refresh, Desk answer and backoff in between happens in its order.
            72..=93 => tokio::time::sleep(Duration::from_millis(rng.u64(1..1_500))).await,
            _ => tokio::time::sleep(Duration::from_millis(rng.u64(1..60_000))).await,
        }
        settle().await;
        check(&world);
    }
    // Everything right again: a token must come, whatever state the cache was left in.
    *world.mode.lock().unwrap() = Some(Mode::Normal);
    cache.replace_source(sim(&world, false, false));
    let mut got = false;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_secs(60)).await;
        settle().await;
        if let Ok(Ok(token)) = tokio::time::timeout(Duration::from_secs(30), cache.usable()).await
            && cache.is_usable(&token, Instant::now())
        {
            got = true;
            break;
        }
    }
    assert!(got, "seed {seed}: no token once everything was right again");
    for task in tasks {
        task.abort();
    }
    background.abort();
    check(&world);
}

#[test]
fn random_interleavings_keep_the_token_invariants() {
    let seeds: u64 = std::env::var("TOKEN_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    for seed in 0..seeds {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(run(seed, 150));
    }
}
