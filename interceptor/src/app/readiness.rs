//! Readiness as a latch: ready once every holder of a [`Latch`] has released it (programs
//! attached, listeners serving, pod and namespace stores synced), and not ready again
//! once the drain has started, so that nothing new is routed to an agent that is leaving.
//! The release can be awaited ([`Readiness::released`]): the agent takes over the proxy
//! address from a predecessor only once its own sources are ready.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use tokio::sync::watch;

/// What `/readyz` reads.
#[derive(Clone, Debug)]
pub(crate) struct Readiness {
    released: watch::Receiver<bool>,
    draining: Arc<AtomicBool>,
}

/// A condition readiness waits for; released when the last clone is dropped (on every
/// path).
#[derive(Clone, Debug)]
pub(crate) struct Latch(#[allow(dead_code)] Arc<Release>);

#[derive(Debug)]
struct Release(watch::Sender<bool>);

impl Drop for Release {
    fn drop(&mut self) {
        self.0.send_replace(true);
    }
}

impl Readiness {
    /// Not ready until the returned latch and all its clones are dropped.
    pub(crate) fn new() -> (Self, Latch) {
        let (tx, released) = watch::channel(false);
        let readiness = Self {
            released,
            draining: Arc::default(),
        };
        (readiness, Latch(Arc::new(Release(tx))))
    }

    pub(crate) fn is_ready(&self) -> bool {
        *self.released.borrow() && !self.draining.load(Ordering::Relaxed)
    }

    /// Resolves once every latch is released.
    pub(crate) async fn released(&self) {
        // The sender sends `true` as it goes, so the value is seen even after it is gone.
        let _ = self.released.clone().wait_for(|released| *released).await;
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

    #[tokio::test]
    async fn the_release_can_be_awaited() {
        let (readiness, latch) = Readiness::new();
        let held = latch.clone();
        drop(latch);
        let waiting = tokio::spawn({
            let readiness = readiness.clone();
            async move { readiness.released().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "a clone still holds the latch");
        drop(held);
        waiting.await.unwrap();
        readiness.released().await;
    }
}
