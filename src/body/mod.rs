//! Body types: the client's body as the proxy reads it (bounded in silence, and held for a
//! 401 retry only within the process-wide budget) and what goes to Desk (a stream, or the
//! bounded replay buffer), in `request`; and what comes back to the client (a stream that
//! counts its bytes, writes the request's log line when it ends, and is watched by its
//! connection while it waits for its client), in `answer`; and a compressed body read, in
//! `encoding`.

mod answer;
mod encoding;
mod request;

pub use answer::{DeskBody, ResponseBody, Tap};
pub use encoding::{Decoded, decoded, decoded_prefix};
pub use request::{BodyError, BodyOutcome, Captured, RequestBody, StreamReason, UpstreamBody};
