//! Every resource a client can make the proxy hold, and its bound: one place to read them
//! all (README "Limits" lists them with their defaults and what a client sees past each).
//!
//! | resource | bound | past it |
//! |---|---|---|
//! | connections | `limits.max_connections` | closed at accept |
//! | streams per HTTP/2 connection | [`MAX_STREAMS_PER_CONNECTION`] | refused by HTTP/2 flow control |
//! | request-body bytes an HTTP/2 client may send before the proxy reads them | [`H2_STREAM_WINDOW`] a stream, [`H2_CONNECTION_WINDOW`] a connection | the client waits (flow control) |
//! | request heads of HTTP/2 requests in progress, whole process | [`MAX_H2_HEAD_BYTES`] | 503 `PROXY_OVERLOADED` |
//! | request head bytes | [`MAX_HEAD_BYTES`] (HTTP/1 head, HTTP/2 header list) | 431 or closed |
//! | header fields | [`MAX_HEADERS`] | 431 |
//! | time to send a head | `timeouts.header_read_secs` | closed |
//! | idle connection (HTTP/1 keep-alive, HTTP/2 with no open stream) | `timeouts.header_read_secs` | closed (HTTP/2: GOAWAY) |
//! | silence inside a request body | `timeouts.body_read_secs` | 408 `PROXY_REQUEST_TIMEOUT`, or the upstream request aborted; connection closed |
//! | an answer its client takes none of | `timeouts.body_read_secs`, seen every `timeouts.header_read_secs` | Desk's call given back, the answer ends in an error; the connection dropped if nothing else on it moved |
//! | request-body bytes held for a 401 retry, whole process | `limits.buffered_body_bytes` | the body streams (no 401 retry) |
//! | one body held for a 401 retry | `limits.replay_body_bytes` | the body streams (no 401 retry) |
//! | requests at Desk at once | `limits.max_upstream_requests` | wait their turn within `timeouts.response_secs`, then 504 |
//! | Desk's 401 body read | 64 KiB | 502 |
//! | Desk's silence inside its answer, while its client waits for more | `timeouts.response_secs` | the answer ends in an error, Desk's call let go |

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Largest request head: an HTTP/1.1 request line plus headers, or an HTTP/2 header list.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most header fields in one request, HTTP/1.1 and HTTP/2: hyper's HTTP/1 parser's
/// own limit (which it parses without allocating), and Apache httpd's default.
pub const MAX_HEADERS: usize = 100;
/// The HTTP/2 flow-control window of a stream: what a client may send of a request body
/// before the proxy reads it (a body waiting in Desk's line is not read). HTTP/2's own
/// default; hyper's (1 MiB) let 400 connections of queued uploads grow the proxy by 400 MiB.
pub const H2_STREAM_WINDOW: u32 = 64 * 1024;
/// The HTTP/2 flow-control window of a connection, across its streams: a few times what
/// an HTTP/1 connection's read buffer may hold ([`MAX_HEAD_BYTES`]), so that an upload
/// waiting in line (its stream's window) leaves room for the bodies of the connection's
/// other requests.
pub const H2_CONNECTION_WINDOW: u32 = 4 * H2_STREAM_WINDOW;
/// Most streams open at once on one HTTP/2 connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 256;
/// Most bytes of request heads held at once by HTTP/2 requests in progress, in the whole
/// process (one count: one connection's 256 streams cannot fill it), counted as HTTP/2
/// counts a header list: each field's name and value and 32 bytes. Without it, thousands of connections
/// × 256 streams × 64 KiB heads waiting in Desk's line could hold gigabytes. (An HTTP/1
/// connection carries one request at a time: `limits.max_connections` × 64 KiB bounds
/// its heads.)
pub const MAX_H2_HEAD_BYTES: u64 = 32 * 1024 * 1024;

/// The names of the bounds, as a log line or a metric label gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `limits.max_connections`.
    Connections,
    /// `limits.buffered_body_bytes`.
    BufferedBodyBytes,
    /// `timeouts.body_read_secs`.
    BodyRead,
    /// Header fields of an HTTP/2 request ([`MAX_HEADERS`]).
    Headers,
    /// Request heads of HTTP/2 requests in progress ([`MAX_H2_HEAD_BYTES`]).
    H2Heads,
}

impl Limit {
    /// Every limit, in the order of [`Limit::key`]'s metric labels.
    pub const ALL: [Limit; 5] = [
        Limit::Connections,
        Limit::BufferedBodyBytes,
        Limit::BodyRead,
        Limit::Headers,
        Limit::H2Heads,
    ];

    /// The configuration key (or constant) that sets it.
    pub fn key(self) -> &'static str {
        match self {
            Self::Connections => "limits.max_connections",
            Self::BufferedBodyBytes => "limits.buffered_body_bytes",
            Self::BodyRead => "timeouts.body_read_secs",
            Self::Headers => "max_headers",
            Self::H2Heads => "max_h2_head_bytes",
        }
    }
}

/// A process-wide budget of bytes (`limits.buffered_body_bytes`): reservations are taken
/// before the bytes are read and given back when the reservation drops, so the bytes held
/// never exceed the budget whatever the number of connections and streams.
#[derive(Debug)]
pub struct ByteBudget {
    held: AtomicU64,
    limit: u64,
}

impl ByteBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(Self {
            held: AtomicU64::new(0),
            limit,
        })
    }

    /// Reserves `bytes`, or `None` when that would go over the budget.
    pub fn reserve(self: &Arc<Self>, bytes: u64) -> Option<Reservation> {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(bytes).filter(|total| *total <= self.limit)
            })
            .ok()
            .map(|_| Reservation {
                budget: Arc::clone(self),
                bytes,
            })
    }

    /// Bytes reserved now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Acquire)
    }
}

/// Bytes reserved in a [`ByteBudget`] until this drops.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<ByteBudget>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_never_exceed_the_budget_and_come_back() {
        let budget = ByteBudget::new(100);
        let a = budget.reserve(60).expect("fits");
        assert!(budget.reserve(41).is_none(), "60 + 41 > 100");
        let b = budget.reserve(40).expect("fits exactly");
        assert_eq!(budget.held(), 100);
        assert!(budget.reserve(1).is_none());
        drop(a);
        assert_eq!(budget.held(), 40);
        assert!(budget.reserve(60).is_some());
        drop(b);
        assert_eq!(budget.held(), 0);
        assert!(budget.reserve(u64::MAX).is_none(), "no overflow");
    }

    #[test]
    fn concurrent_reservations_hold_the_bound() {
        let budget = ByteBudget::new(1000);
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let budget = Arc::clone(&budget);
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        if let Some(r) = budget.reserve(300) {
                            assert!(budget.held() <= 1000);
                            drop(r);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(budget.held(), 0);
    }
}
