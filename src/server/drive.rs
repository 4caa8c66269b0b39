//! Keeping a served connection within its time bounds: closed gracefully when a close is
//! asked for or when it has been idle too long, and dropped when it does not close.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::HttpService;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

use crate::body::ResponseBody;
use crate::budget::Limit;
use crate::connection::ConnectionState;
use crate::metrics::Metrics;

/// A served connection that can be asked to close gracefully: after the answers in
/// progress, with GOAWAY on HTTP/2.
pub(super) trait Closable: Future<Output = Result<(), hyper::Error>> {
    /// Whether the connection is dropped outright once it has had no open request for
    /// its idle time (and no answer bytes wait for the client to read them). An HTTP/1
    /// connection then holds at most a part of a request head, which this bounds in
    /// hyper's place (README "Performance": hyper's own timer cost every request a
    /// timer); HTTP/2 is told with GOAWAY first.
    const DROPPED_WHEN_IDLE: bool;

    /// Starts closing.
    fn close_gracefully(self: Pin<&mut Self>);
}

impl<I, S> Closable for http1::UpgradeableConnection<I, S>
where
    S: HttpService<Incoming, ResBody = ResponseBody>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    const DROPPED_WHEN_IDLE: bool = true;

    fn close_gracefully(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S> Closable for http1::Connection<I, S>
where
    S: HttpService<Incoming, ResBody = ResponseBody>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
{
    const DROPPED_WHEN_IDLE: bool = true;

    fn close_gracefully(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S> Closable for http2::Connection<I, S, TokioExecutor>
where
    S: HttpService<Incoming, ResBody = ResponseBody>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    TokioExecutor: hyper::rt::bounds::Http2ServerConnExec<S::Future, ResponseBody>,
{
    const DROPPED_WHEN_IDLE: bool = false;

    fn close_gracefully(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Runs a connection to its end, closing it gracefully when a close is asked for (a
/// request's, or the worker stopping), or when it has had no open request for `idle`
/// since it was accepted or since its last answer ended. An HTTP/1 connection is then
/// dropped at once (it holds at most a part of a head), unless answer bytes still wait
/// for its client to read them. A connection still there `idle` after a graceful close
/// with no open request (an HTTP/2 client that never acknowledges the GOAWAY, a client
/// that does not read) is dropped.
///
/// A request costs this loop nothing: only the idle timer, when it fires, and a close
/// request wake it besides the connection itself.
pub(super) async fn drive<C: Closable>(
    mut connection: Pin<&mut C>,
    state: &ConnectionState,
    idle: Duration,
    stall: Duration,
    peer: SocketAddr,
    metrics: &Metrics,
) -> Result<(), hyper::Error> {
    // From the accept: the time spent telling HTTP/1 from h2c counts against the first
    // request's head.
    let first = state
        .idle_deadline(idle)
        .map_or_else(|| Instant::now() + idle, Instant::from_std);
    let idle_timer = tokio::time::sleep_until(first);
    tokio::pin!(idle_timer);
    let mut closing = false;
    // Whether the timer was polled since it was set: it then wakes this task when it
    // fires, and needs no poll before its deadline. A request wakes the task several
    // times; each then costs a clock read instead of a timer poll.
    let mut armed = false;
    // An answer seen waiting for its client, how many parts had been taken then, and
    // when.
    let mut suspect: Option<(u64, Instant)> = None;
    std::future::poll_fn(|cx| {
        loop {
            if let Poll::Ready(result) = connection.as_mut().poll(cx) {
                return Poll::Ready(result);
            }
            state.register_task(cx);
            let due = !armed || Instant::now() >= idle_timer.deadline();
            armed = true;
            let close = if !closing && state.close_requested() {
                true
            } else if due && idle_timer.as_mut().poll(cx).is_ready() {
                let now = Instant::now();
                match state.idle_deadline(idle).map(Instant::from_std) {
                    // Requests are open: look again one idle period later. An answer
                    // whose client has taken none of it for `stall` (it stopped reading,
                    // or, on HTTP/2, keeps the stream's flow-control window shut) would
                    // hold Desk's call forever: it lets go of Desk, and the connection's
                    // other answers go on. A connection where an answer waits and nothing
                    // at all was taken or ended for `stall` is dropped: an HTTP/1 one
                    // then holds only a client that does not read.
                    None => {
                        let cut = state.cut_stalled_answers(now.into_std(), stall);
                        if cut > 0 {
                            tracing::debug!(%peer, cut, budget = "timeouts.body_read_secs", "letting go of Desk for answers whose client takes none of them");
                            for _ in 0..cut {
                                metrics.record_limit(Limit::BodyRead);
                            }
                        }
                        let taken = state.answers_taken();
                        let waiting = state.answers_waiting() > 0;
                        match suspect {
                            Some((seen, since)) if waiting && seen == taken => {
                                if now.duration_since(since) >= stall {
                                    tracing::debug!(%peer, budget = "timeouts.body_read_secs", "dropping a connection whose client takes none of its answer");
                                    return Poll::Ready(Ok(()));
                                }
                            }
                            _ => suspect = waiting.then_some((taken, now)),
                        }
                        idle_timer.as_mut().reset(now + idle);
                        armed = false;
                        continue;
                    }
                    Some(deadline) if deadline > now => {
                        idle_timer.as_mut().reset(deadline);
                        armed = false;
                        continue;
                    }
                    Some(_) if closing => {
                        tracing::debug!(%peer, "dropping a connection that did not close after being asked to");
                        return Poll::Ready(Ok(()));
                    }
                    Some(_) if C::DROPPED_WHEN_IDLE && !state.output_blocked() => {
                        tracing::debug!(%peer, budget = "timeouts.header_read_secs", "dropping an idle connection (or one whose request head did not come in time)");
                        return Poll::Ready(Ok(()));
                    }
                    Some(_) => {
                        tracing::debug!(%peer, budget = "timeouts.header_read_secs", "closing an idle connection");
                        true
                    }
                }
            } else {
                false
            };
            if !close {
                return Poll::Pending;
            }
            closing = true;
            connection.as_mut().close_gracefully();
            idle_timer.as_mut().reset(Instant::now() + idle);
            armed = false;
        }
    })
    .await
}
