//! Serving: the accept loop and the worker threads ([`accept`]), each worker's shared
//! settings and the service of its connections ([`worker`]), a connection's life
//! ([`connection`]) within its time bounds ([`drive`]), a request head's own copy of its
//! bytes ([`head`]), and transparent mode's tunnels ([`tunnel`]).

mod accept;
mod connection;
mod drive;
mod head;
mod tunnel;
mod worker;

pub use accept::serve;
