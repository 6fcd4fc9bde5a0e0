//! Readiness as a latch: ready once every holder of a [`Latch`] has released it (programs
//! attached, listeners serving, pod and namespace stores synced), and not ready again
//! once the drain has started, so that nothing new is routed to an agent that is leaving.

use std::sync::{
    Arc, Weak,
    atomic::{AtomicBool, Ordering},
};

/// What `/readyz` reads.
#[derive(Clone, Debug)]
pub(crate) struct Readiness {
    pending: Weak<()>,
    draining: Arc<AtomicBool>,
}

/// A condition readiness waits for; released when dropped (on every path).
#[derive(Clone, Debug)]
pub(crate) struct Latch(#[allow(dead_code)] Arc<()>);

impl Readiness {
    /// Not ready until the returned latch and all its clones are dropped.
    pub(crate) fn new() -> (Self, Latch) {
        let latch = Arc::new(());
        let readiness = Self {
            pending: Arc::downgrade(&latch),
            draining: Arc::default(),
        };
        (readiness, Latch(latch))
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.pending.strong_count() == 0 && !self.draining.load(Ordering::Relaxed)
    }

    /// Not ready from now on: the agent is draining.
    pub(crate) fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_when_the_last_latch_is_released_until_the_drain() {
        let (readiness, latch) = Readiness::new();
        let (attached, synced) = (latch.clone(), latch.clone());
        assert!(!readiness.is_ready());
        drop(latch);
        drop(attached);
        assert!(!readiness.is_ready(), "the stores have not synced yet");
        drop(synced);
        assert!(readiness.is_ready());
        readiness.clone().drain();
        assert!(!readiness.is_ready(), "draining is never ready");
    }

    #[test]
    fn a_holder_that_fails_releases_its_latch_and_never_blocks_forever() {
        let (readiness, latch) = Readiness::new();
        let task = std::thread::spawn(move || {
            let _latch = latch;
            panic!("a start-up task failed");
        });
        assert!(task.join().is_err());
        assert!(readiness.is_ready());
    }
}
