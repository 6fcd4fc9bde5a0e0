//! A clock for the credentials cache that moves only when the test advances it, and shows
//! the pauses waiting on it: a test asserts how long the refresher chose to wait, then
//! advances exactly that far, instead of sleeping real seconds and counting what happened
//! within a window.

use std::{
    collections::BTreeMap,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use interceptor::credentials::Clock;

/// Starts at the real time of its creation (so credentials from moto, which expire at a
/// real time, have their real lifetime left) and then stands still until [`advance`]d.
///
/// [`advance`]: ManualClock::advance
pub struct ManualClock {
    start: SystemTime,
    /// How far the clock has been advanced.
    offset: tokio::sync::watch::Sender<Duration>,
    /// The pauses in progress: id -> requested duration.
    sleeping: Arc<Mutex<BTreeMap<u64, Duration>>>,
    next_id: Mutex<u64>,
}

impl ManualClock {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            start: SystemTime::now(),
            offset: tokio::sync::watch::Sender::new(Duration::ZERO),
            sleeping: Arc::default(),
            next_id: Mutex::new(0),
        })
    }

    /// Moves the clock forward by `by`, completing every pause that ends by then.
    pub fn advance(&self, by: Duration) {
        self.offset.send_modify(|offset| *offset += by);
    }

    /// The durations of the pauses in progress (as requested, oldest first).
    pub fn sleeping(&self) -> Vec<Duration> {
        lock(&self.sleeping).values().copied().collect()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Removes its pause from [`ManualClock::sleeping`] when the pause completes or is
/// abandoned (its future dropped).
struct Pause {
    id: u64,
    sleeping: Arc<Mutex<BTreeMap<u64, Duration>>>,
}

impl Drop for Pause {
    fn drop(&mut self) {
        lock(&self.sleeping).remove(&self.id);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        self.start + *self.offset.borrow()
    }

    fn monotonic(&self) -> Duration {
        *self.offset.borrow()
    }

    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let id = {
            let mut next = lock(&self.next_id);
            *next += 1;
            *next
        };
        lock(&self.sleeping).insert(id, duration);
        let pause = Pause {
            id,
            sleeping: Arc::clone(&self.sleeping),
        };
        let deadline = *self.offset.borrow() + duration;
        let mut offset = self.offset.subscribe();
        Box::pin(async move {
            let _pause = pause;
            // The sender lives as long as the clock; if it is gone, so is the test.
            let _ = offset.wait_for(|now| *now >= deadline).await;
        })
    }
}
