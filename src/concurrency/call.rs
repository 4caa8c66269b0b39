//! A call at Desk that keeps its slot until Desk is done with it.
//!
//! Desk counts a call against the portal's concurrency until it answers, whether or not
//! anyone still waits for the answer. A request whose client leaves while Desk works on it
//! is dropped by the server at once, and one that Desk does not answer within its response
//! time gets the proxy's 504; were its slot given back then, the next request in line
//! would go out while Desk still counts this one, and could meet Desk's own limit (under
//! overload, the calls at Desk would grow with the arrival rate).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::time::Instant;

use super::UpstreamSlot;

/// Desk's call and the slot it went out with. Dropped before it is done (its client left,
/// or the caller's deadline passed), the call goes on in a task of its own until Desk's
/// answer begins or it is let go (see [`HeldCall::new`]), and only then gives the slot
/// back. The answer that
/// comes is dropped (its connection closed). While it is awaited, the deadline is the
/// caller's to keep: no timer is made unless the call is left behind.
pub struct HeldCall<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    /// `None` once done.
    call: Option<(Pin<Box<F>>, UpstreamSlot)>,
    /// A call left behind is held until then...
    held_until: Instant,
    /// ...and for this long at least.
    held_for: Duration,
}

impl<F> HeldCall<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    /// `call`, holding `slot`; if left behind, held until `held_until` or for `held_for`,
    /// whichever ends later, at the most. The call is boxed: should it outlive its
    /// request, it moves into a task of its own.
    pub fn new(call: F, (held_until, held_for): (Instant, Duration), slot: UpstreamSlot) -> Self {
        Self {
            call: Some((Box::pin(call), slot)),
            held_until,
            held_for,
        }
    }
}

impl<F> Future for HeldCall<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    /// The call's outcome and the slot, still held (the answer's body holds it while it
    /// streams).
    type Output = (F::Output, UpstreamSlot);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let Some((call, _)) = &mut this.call else {
            // Polled again after it was done.
            return Poll::Pending;
        };
        let outcome = ready!(call.as_mut().poll(cx));
        match this.call.take() {
            Some((_, slot)) => Poll::Ready((outcome, slot)),
            None => Poll::Pending,
        }
    }
}

impl<F> Drop for HeldCall<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn drop(&mut self) {
        // Outside a runtime (it is shutting down) the call simply ends here.
        if let Some((call, slot)) = self.call.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let held_until = self.held_until.max(Instant::now() + self.held_for);
            runtime.spawn(async move {
                let _ = tokio::time::timeout_at(held_until, call).await;
                drop(slot);
            });
        }
    }
}
