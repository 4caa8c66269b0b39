//! zoho-desk-proxy: a local reverse proxy for the Zoho Desk API that injects a fresh
//! `Authorization: Zoho-oauthtoken …` into every request and renews the token atomically.
//!
//! The map (docs/ARCHITECTURE.md tells the request's and the token's lives through it):
//! - the request path, top to bottom: `server` (accept loop, workers, connection bounds)
//!   → `proxy` (one request's life: target, access rules, body, token, send, 401 retry)
//!   → `access`, `admin`, `target`, `headers`, `body` → `paths`, `budget`, `error`;
//! - tokens: `token` (the cache, Zoho Accounts, the fleet's store, the token file);
//! - Desk's limits: `concurrency` (Desk's concurrent calls, for one proxy or a fleet);
//! - transparent mode: `intercept` (the local CA, Accounts answered locally);
//! - record and replay: `record` (HAR files written as Desk answers, and answered from);
//! - around them: `config` (one validation pass), `app` (the wiring), `metrics`,
//!   `observe` (log lines, in-flight count), `client` (the upstream HTTP client);
//! - the program: [`cli`], [`ops`] (`exchange`, `check`), [`demo`], and [`fake_zoho`] (the
//!   in-process fake Zoho that the demo and the tests run against).

#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod access;
mod admin;
mod app;
mod body;
mod budget;
mod client;
mod concurrency;
mod connection;
mod detect;
mod error;
mod headers;
mod intercept;
mod metrics;
mod observe;
mod paths;
mod pool;
mod proxy;
mod record;
mod secret;
mod server;
mod target;
mod token;
mod url;

pub mod cli;
pub mod config;
pub mod demo;
pub mod fake_zoho;
pub mod ops;

pub use app::{RunError, ready_config, run, run_with_reload, warn_about};
pub use error::ProxyError;
pub use secret::Secret;
pub use url::BaseUrl;

/// The request rules, exposed for the property tests of `tests/rules_proptest.rs`: the
/// request target and its canonical path, the access policy, and the header rules.
pub mod rules {
    pub use crate::access::AccessPolicy;
    pub use crate::headers::prepare_request;
    pub use crate::paths::{Case, PathRule, canonicalize, rule_form};
    pub use crate::target::{Target, check_path, host_name, resolve};
}

/// The upstream HTTP client, exposed for `examples/client_bench.rs`.
pub mod upstream {
    pub use crate::client::{Connector, build};
}
