//! The capacity model: a GPU that decodes up to K requests together at R tokens/s each.
//!
//! Past K, requests wait in a queue and their latency grows with it; far past it (4 K waiting)
//! the emulator answers 503, as a gateway with a queue limit in front of the server does (vLLM
//! itself queues without a limit). The queue is published on `GET /metrics` as vLLM publishes
//! it (`vllm:num_requests_waiting`, `vllm:num_requests_running`) and, for the sglang flavour, as
//! SGLang does when started with `--enable-metrics` (`sglang:num_queue_reqs`).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// How much an emulated server can do at once (`vlm emulate --capacity K --token-rate R`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Capacity {
    /// Requests decoded together (the batch, K).
    pub slots: usize,
    /// Tokens per second each running request gets (R): an answer of N tokens takes N / R s.
    pub token_rate: f64,
}

impl Capacity {
    /// `slots` decoded together at `token_rate` tokens/s each.
    pub fn new(slots: usize, token_rate: f64) -> Self {
        Capacity {
            slots: slots.max(1),
            token_rate: if token_rate.is_finite() && token_rate > 0.0 {
                token_rate
            } else {
                1.0
            },
        }
    }

    /// Waiting requests past which the emulator answers 503: four batches.
    pub fn queue_limit(&self) -> usize {
        4 * self.slots
    }
}

/// What a capacity-limited emulator did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CapacityStats {
    /// Requests decoded to the end.
    pub served: u64,
    /// Requests refused with 503 because the queue was full.
    pub rejected: u64,
    /// The longest the queue got.
    pub peak_waiting: usize,
}

/// The model's state while serving.
#[derive(Debug)]
pub(crate) struct CapacityState {
    pub(crate) capacity: Capacity,
    slots: tokio::sync::Semaphore,
    pub(crate) waiting: AtomicUsize,
    pub(crate) running: AtomicUsize,
    served: AtomicU64,
    rejected: AtomicU64,
    peak: AtomicUsize,
}

/// Takes one off a counter when dropped, so a client that hangs up leaves it right.
struct Counted<'a>(&'a AtomicUsize);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl CapacityState {
    pub(crate) fn new(capacity: Capacity) -> Self {
        CapacityState {
            capacity,
            slots: tokio::sync::Semaphore::new(capacity.slots),
            waiting: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            peak: AtomicUsize::new(0),
        }
    }

    /// Queues for a slot, then decodes `tokens`; `false` when the queue is full (answer 503).
    pub(crate) async fn decode(&self, tokens: u64) -> bool {
        let before = self.waiting.fetch_add(1, Ordering::SeqCst);
        let waiting = Counted(&self.waiting);
        if before >= self.capacity.queue_limit() {
            drop(waiting);
            self.rejected.fetch_add(1, Ordering::SeqCst);
            return false;
        }
        self.peak.fetch_max(before + 1, Ordering::SeqCst);
        let Ok(_slot) = self.slots.acquire().await else {
            return false;
        };
        drop(waiting);
        self.running.fetch_add(1, Ordering::SeqCst);
        let _running = Counted(&self.running);
        let secs = tokens.max(1) as f64 / self.capacity.token_rate;
        tokio::time::sleep(Duration::from_secs_f64(secs.min(3600.0))).await;
        self.served.fetch_add(1, Ordering::SeqCst);
        true
    }

    pub(crate) fn stats(&self) -> CapacityStats {
        CapacityStats {
            served: self.served.load(Ordering::SeqCst),
            rejected: self.rejected.load(Ordering::SeqCst),
            peak_waiting: self.peak.load(Ordering::SeqCst),
        }
    }
}

/// vLLM's `GET /metrics` (the scheduler gauges only), in Prometheus text format.
pub(crate) fn vllm_metrics(model: &str, state: Option<&CapacityState>) -> String {
    let labels = format!("engine=\"0\",model_name=\"{}\"", model.replace('"', "\\\""));
    let (running, waiting) = counts(state);
    gauges(
        &labels,
        [
            (
                "vllm:num_requests_running",
                "Number of requests in model execution batches.",
                running,
            ),
            (
                "vllm:num_requests_waiting",
                "Number of requests waiting to be processed.",
                waiting,
            ),
        ],
    )
}

/// SGLang's `GET /metrics` (served when it runs with `--enable-metrics`), the scheduler gauges.
pub(crate) fn sglang_metrics(model: &str, state: Option<&CapacityState>) -> String {
    let labels = format!("model_name=\"{}\"", model.replace('"', "\\\""));
    let (running, waiting) = counts(state);
    gauges(
        &labels,
        [
            (
                "sglang:num_running_reqs",
                "The number of running requests.",
                running,
            ),
            (
                "sglang:num_queue_reqs",
                "The number of requests in the waiting queue.",
                waiting,
            ),
        ],
    )
}

fn counts(state: Option<&CapacityState>) -> (usize, usize) {
    state.map_or((0, 0), |s| {
        (
            s.running.load(Ordering::SeqCst),
            s.waiting.load(Ordering::SeqCst),
        )
    })
}

/// Gauges in Prometheus text format, each with its HELP and TYPE lines.
fn gauges<const N: usize>(labels: &str, gauges: [(&str, &str, usize); N]) -> String {
    gauges
        .iter()
        .map(|(name, help, value)| {
            format!("# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{{labels}}} {value}.0\n")
        })
        .collect()
}
