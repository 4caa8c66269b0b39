//! Access tokens: where they come from ([`accounts`]) and how the proxy holds and renews
//! them ([`cache`]).

pub mod accounts;
pub mod cache;
pub mod shared;
pub mod store;

pub use accounts::{AccountsClient, AccountsError, Grant, RefreshTokenSource};
pub use cache::{Readiness, RefreshPolicy, Token, TokenCache, TokenError, TokenSource};
