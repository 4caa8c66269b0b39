//! Record and replay (README "Testing against recorded Desk traffic"): Desk's traffic
//! written to a HAR file as the proxy forwards it ([`recorder`]), and answered from such a
//! file with no credentials and no network ([`replay`]); the file format is [`har`].

mod entry;
pub mod har;
pub mod recorder;
pub mod replay;
mod scrub;

pub use entry::RequestBodySeen;
pub use recorder::{RecordError, Recorder, Recording};
pub use replay::{BodyHasher, Lookup, Replay, ReplayError};
