//! Access tokens: what they are ([`source`]), where they come from ([`accounts`], through
//! the fleet's [`shared`] store when there is one), how the proxy holds and renews them
//! ([`cache`]), and the token file ([`file`]).

pub mod accounts;
pub mod cache;
pub mod file;
#[cfg(test)]
mod interleavings;
pub mod shared;
pub mod source;

pub use accounts::{AccountsClient, RefreshTokenSource};
pub use cache::{Readiness, RefreshPolicy, TokenCache, TokenError};
pub use source::{Token, TokenSource};
