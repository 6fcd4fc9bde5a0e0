//! Graceful drain: one signal that tells the servers to stop accepting, and a tracker of
//! the connections that must finish before the process exits.
//!
//! On SIGTERM the app triggers the signal; the accept loops hand over to the successor and
//! then close their listeners, and every connection ends with its next answer
//! ([`crate::imds::server`] says how). The accept loops and the connections are tracked;
//! the app waits for them at most a bound ([`Drain::wait`]); what is left then is dropped
//! with the runtime.

use std::{future::Future, time::Duration};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// The drain signal and the connections it waits for (cheap to clone).
#[derive(Clone, Default)]
pub(crate) struct Drain {
    signal: CancellationToken,
    tracker: TaskTracker,
}

impl Drain {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Resolves once draining has started.
    pub(crate) fn signaled(&self) -> impl Future<Output = ()> + Send + 'static {
        self.signal.clone().cancelled_owned()
    }

    /// Whether draining has started.
    pub(crate) fn is_draining(&self) -> bool {
        self.signal.is_cancelled()
    }

    /// Runs `work` as a connection the drain waits for.
    pub(crate) fn track<F>(&self, work: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(work);
    }

    /// Connections still open.
    pub(crate) fn open(&self) -> usize {
        self.tracker.len()
    }

    /// Starts the drain and waits for the tracked connections, at most `bound`. Returns
    /// how many were still open at the bound (0: all finished).
    pub(crate) async fn wait(&self, bound: Duration) -> usize {
        self.signal.cancel();
        self.tracker.close();
        match tokio::time::timeout(bound, self.tracker.wait()).await {
            Ok(()) => 0,
            Err(_) => self.tracker.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    use super::*;

    #[tokio::test]
    async fn work_in_flight_finishes_and_new_work_sees_the_signal() {
        let drain = Drain::new();
        let finished = Arc::new(AtomicUsize::new(0));
        {
            let (drain2, finished) = (drain.clone(), finished.clone());
            drain.track(async move {
                // A request in flight: it is answered, then the connection closes.
                drain2.signaled().await;
                tokio::time::sleep(Duration::from_millis(20)).await;
                finished.fetch_add(1, Ordering::SeqCst);
            });
        }
        assert_eq!(drain.open(), 1);
        assert!(!drain.is_draining());
        assert_eq!(drain.wait(Duration::from_secs(60)).await, 0);
        assert!(drain.is_draining());
        assert_eq!(finished.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn the_wait_is_bounded_and_reports_what_is_left() {
        let drain = Drain::new();
        let finished = Arc::new(AtomicUsize::new(0));
        for _ in 0..3 {
            let finished = finished.clone();
            drain.track(async move {
                // A connection that ignores the signal (a stuck client).
                tokio::time::sleep(Duration::from_secs(3600)).await;
                finished.fetch_add(1, Ordering::SeqCst);
            });
        }
        assert_eq!(drain.wait(Duration::from_millis(50)).await, 3);
        assert_eq!(finished.load(Ordering::SeqCst), 0);
    }
}
