//! Desk's concurrency limit (README "Desk's limits"): a portal may have only so many API
//! calls in flight at once (`desk.max_concurrent`, or its edition's). Requests beyond it
//! wait here, in arrival order, rather than get Desk's concurrency errors; a request whose
//! client leaves while it waits is never sent, and one whose client leaves while Desk works
//! on it keeps its slot until Desk is done ([`call`]).
//!
//! One proxy keeps the count itself ([`DeskSlots::local`]); a fleet sharing a
//! `token_store` keeps it in Redis ([`fleet`]), falling back to its share of the limit when
//! Redis fails. When the limit can never bind (it is not below
//! `limits.max_upstream_requests`, the proxy's own bound) and there is no fleet, no queue
//! is kept at all: the request path then pays two atomic counts per request.

pub mod call;
pub mod fleet;

use std::sync::Arc;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::Metrics;
pub use call::HeldCall;
pub use fleet::{FleetSlots, FleetStatus};

/// Where Desk's calls are counted.
#[derive(Debug)]
enum Queue {
    /// Nowhere: the limit never binds.
    None,
    /// In this process, first come first served.
    Local(Arc<Semaphore>),
    /// In Redis, for the fleet.
    Fleet(Arc<FleetSlots>),
}

/// Desk's concurrent calls: who may call Desk now, and who waits.
#[derive(Debug)]
pub struct DeskSlots {
    limit: usize,
    queue: Queue,
    queued: Gauge,
    in_flight: Gauge,
}

impl DeskSlots {
    /// `limit` calls at once for this process; no queue when `own_bound` (the proxy's
    /// own limit on requests to Desk) is not above it.
    pub fn local(limit: usize, own_bound: usize, metrics: &Metrics) -> Self {
        let queue = if limit < own_bound {
            Queue::Local(Arc::new(Semaphore::new(limit)))
        } else {
            Queue::None
        };
        Self::with(limit, queue, metrics)
    }

    /// `limit` calls at once for the whole fleet, counted by `fleet`.
    pub fn fleet(limit: usize, fleet: Arc<FleetSlots>, metrics: &Metrics) -> Self {
        Self::with(limit, Queue::Fleet(fleet), metrics)
    }

    fn with(limit: usize, queue: Queue, metrics: &Metrics) -> Self {
        Self {
            limit,
            queue,
            queued: metrics.desk_queue_depth().clone(),
            in_flight: metrics.desk_in_flight().clone(),
        }
    }

    /// The limit (`desk.max_concurrent`).
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The fleet's state, when the count is the fleet's.
    pub fn fleet_status(&self) -> Option<FleetStatus> {
        match &self.queue {
            Queue::Fleet(fleet) => Some(fleet.status()),
            _ => None,
        }
    }

    /// Waits for a call, in arrival order. Dropping the future leaves the line (and
    /// the fleet's, in time).
    pub async fn acquire(&self) -> DeskPermit {
        let held = match &self.queue {
            Queue::None => Held::Nothing,
            Queue::Local(semaphore) => {
                let _waiting = Waiting::enter(&self.queued);
                match Arc::clone(semaphore).acquire_owned().await {
                    Ok(permit) => Held::Local(permit),
                    // The semaphore is never closed.
                    Err(_) => Held::Nothing,
                }
            }
            Queue::Fleet(fleet) => {
                let _waiting = Waiting::enter(&self.queued);
                // Boxed: Redis' futures are large, and only a fleet should carry them
                // in its requests.
                Box::pin(fleet.acquire()).await
            }
        };
        self.permit(held)
    }

    /// A call at once, when one is free and nobody waits for one (a freed call goes to
    /// the first in line before anyone can take it, so this never jumps the line);
    /// `None` otherwise, and always for a fleet, whose count Redis keeps: then
    /// [`Self::acquire`] waits.
    pub fn try_acquire(&self) -> Option<DeskPermit> {
        let held = match &self.queue {
            Queue::None => Held::Nothing,
            Queue::Local(semaphore) => Held::Local(Arc::clone(semaphore).try_acquire_owned().ok()?),
            Queue::Fleet(_) => return None,
        };
        Some(self.permit(held))
    }

    /// With no queue, a call counts as at Desk once it also has its serving thread's
    /// slot ([`UpstreamSlot::new`]): until then it waits for that slot.
    fn permit(&self, held: Held) -> DeskPermit {
        let counted = !matches!(held, Held::Nothing);
        if counted {
            self.in_flight.inc();
        }
        DeskPermit {
            _held: held,
            in_flight: self.in_flight.clone(),
            counted,
        }
    }

    /// Counts a request as waiting in line while the guard lives, when it waits for its
    /// serving thread's slot (`limits.max_upstream_requests`) with no Desk queue: that
    /// slot is then the line. (With a queue, a request that holds Desk's call while it
    /// waits for its thread's slot is counted at Desk.)
    pub fn waiting_for_thread(&self) -> Option<Waiting<'_>> {
        matches!(self.queue, Queue::None).then(|| Waiting::enter(&self.queued))
    }
}

/// Counts a request as waiting while it lives.
pub struct Waiting<'a>(&'a Gauge);

impl<'a> Waiting<'a> {
    fn enter(gauge: &'a Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What a request holds while it is at Desk (held for what its drop gives back).
#[derive(Debug)]
#[expect(dead_code, reason = "the permits are held for their drop")]
pub(crate) enum Held {
    /// Nothing: the limit never binds.
    Nothing,
    /// One of this process's calls.
    Local(OwnedSemaphorePermit),
    /// One of the fleet's calls, given back to Redis when dropped.
    Fleet(fleet::FleetPermit),
}

/// One of Desk's concurrent calls, held until the answer's body is done.
#[derive(Debug)]
pub struct DeskPermit {
    _held: Held,
    in_flight: Gauge,
    /// Counted in `zoho_proxy_desk_in_flight`.
    counted: bool,
}

impl Drop for DeskPermit {
    fn drop(&mut self) {
        if self.counted {
            self.in_flight.dec();
        }
    }
}

/// A request's place at Desk: one of Desk's concurrent calls, and one of its serving
/// thread's upstream slots (`limits.max_upstream_requests`). Held while Desk's answer
/// streams.
#[derive(Debug)]
pub struct UpstreamSlot {
    _desk: DeskPermit,
    _worker: OwnedSemaphorePermit,
}

impl UpstreamSlot {
    /// Desk's call and the serving thread's slot.
    pub fn new(mut desk: DeskPermit, worker: OwnedSemaphorePermit) -> Self {
        if !desk.counted {
            desk.in_flight.inc();
            desk.counted = true;
        }
        Self {
            _desk: desk,
            _worker: worker,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_are_served_in_arrival_order_and_counted() {
        let metrics = Metrics::new();
        let slots = Arc::new(DeskSlots::local(2, 64, &metrics));
        let a = slots.acquire().await;
        let b = slots.acquire().await;
        assert_eq!(metrics.desk_in_flight().get(), 2);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..3 {
            let slots = Arc::clone(&slots);
            let tx = tx.clone();
            tokio::spawn(async move {
                let permit = slots.acquire().await;
                let _ = tx.send(i);
                drop(permit);
            });
            // Each waiter is in line before the next arrives.
            while metrics.desk_queue_depth().get() < i + 1 {
                tokio::task::yield_now().await;
            }
        }
        drop(a);
        drop(b);
        let order: Vec<i64> = vec![
            rx.recv().await.unwrap(),
            rx.recv().await.unwrap(),
            rx.recv().await.unwrap(),
        ];
        assert_eq!(order, [0, 1, 2]);
        while metrics.desk_in_flight().get() != 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(metrics.desk_queue_depth().get(), 0);
    }

    #[tokio::test]
    async fn a_waiter_that_leaves_takes_no_call() {
        let metrics = Metrics::new();
        let slots = DeskSlots::local(1, 64, &metrics);
        let held = slots.acquire().await;
        let left =
            tokio::time::timeout(std::time::Duration::from_millis(10), slots.acquire()).await;
        assert!(left.is_err());
        assert_eq!(metrics.desk_queue_depth().get(), 0);
        drop(held);
        let _next = slots.acquire().await;
        assert_eq!(metrics.desk_in_flight().get(), 1);
    }

    #[tokio::test]
    async fn a_call_taken_at_once_never_jumps_the_line() {
        let metrics = Metrics::new();
        let slots = Arc::new(DeskSlots::local(1, 64, &metrics));
        let held = slots.try_acquire().expect("a free call is taken at once");
        assert_eq!(metrics.desk_in_flight().get(), 1);
        assert!(slots.try_acquire().is_none(), "no call is free");
        let waiter = tokio::spawn({
            let slots = Arc::clone(&slots);
            async move { slots.acquire().await }
        });
        while metrics.desk_queue_depth().get() < 1 {
            tokio::task::yield_now().await;
        }
        // The freed call goes to the one in line, not to whoever asks next.
        drop(held);
        assert!(slots.try_acquire().is_none(), "the line was jumped");
        let served = waiter.await.expect("the waiter");
        assert_eq!(metrics.desk_in_flight().get(), 1);
        drop(served);
        assert!(slots.try_acquire().is_some());
        assert_eq!(metrics.desk_in_flight().get(), 0);
    }

    #[test]
    fn a_wait_for_the_thread_s_slot_is_the_line_only_without_a_desk_queue() {
        let metrics = Metrics::new();
        let queued = DeskSlots::local(2, 64, &metrics);
        // Held Desk's call already: counted at Desk, not twice.
        assert!(queued.waiting_for_thread().is_none());
        let unqueued = DeskSlots::local(64, 64, &metrics);
        let waiting = unqueued.waiting_for_thread();
        assert_eq!(metrics.desk_queue_depth().get(), 1);
        drop(waiting);
        assert_eq!(metrics.desk_queue_depth().get(), 0);
    }

    #[tokio::test]
    async fn no_queue_when_the_limit_cannot_bind() {
        let metrics = Metrics::new();
        let slots = DeskSlots::local(64, 64, &metrics);
        let permits: Vec<_> =
            futures_util::future::join_all((0..100).map(|_| slots.acquire())).await;
        // At Desk only once the serving thread's slot is held as well.
        assert_eq!(metrics.desk_in_flight().get(), 0);
        let worker = Arc::new(Semaphore::new(64));
        let at_desk: Vec<_> = permits
            .into_iter()
            .filter_map(|desk| {
                let slot = Arc::clone(&worker).try_acquire_owned().ok()?;
                Some(UpstreamSlot::new(desk, slot))
            })
            .collect();
        assert_eq!(at_desk.len(), 64);
        assert_eq!(metrics.desk_in_flight().get(), 64);
        drop(at_desk);
        assert_eq!(metrics.desk_in_flight().get(), 0);
    }
}
