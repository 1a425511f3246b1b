//! How long the async thread was blocked: for tests that some work runs off it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

/// Ticks every millisecond on the current runtime and keeps the longest gap between ticks. On
/// a current-thread runtime, work done inline on the async thread shows as a gap that long.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let meter = vlm_testkit::StallMeter::start().await;
/// tokio::time::sleep(std::time::Duration::from_millis(20)).await; // awaits: no stall
/// assert!(meter.stop().await < std::time::Duration::from_millis(15));
/// # }
/// ```
#[derive(Debug)]
pub struct StallMeter {
    ticking: Arc<AtomicBool>,
    task: JoinHandle<Duration>,
}

impl StallMeter {
    /// Starts ticking (and lets the ticker run once).
    pub async fn start() -> Self {
        let ticking = Arc::new(AtomicBool::new(true));
        let task = tokio::spawn({
            let ticking = ticking.clone();
            async move {
                let mut longest = Duration::ZERO;
                let mut last = Instant::now();
                while ticking.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    longest = longest.max(last.elapsed());
                    last = Instant::now();
                }
                longest
            }
        });
        tokio::task::yield_now().await;
        StallMeter { ticking, task }
    }

    /// Stops ticking; the longest gap seen.
    pub async fn stop(self) -> Duration {
        self.ticking.store(false, Ordering::SeqCst);
        self.task.await.unwrap_or(Duration::MAX)
    }
}
