//! Adaptive concurrency: how many requests one endpoint should have in flight, found from what
//! it sustains.
//!
//! The shape is TCP Vegas, per endpoint. Samples are taken in rounds of about one window
//! (`limit` answers). Each round compares its mean round-trip time with the lowest round mean
//! seen lately (the no-queue time) and estimates how many of our requests wait in the server's
//! queue: `limit × (1 − base / mean)`. When the server publishes its own queue (vLLM's
//! `vllm:num_requests_waiting`, LMDeploy's `lmdeploy:num_requests_waiting`), that count is
//! taken instead when it is larger. Below [`ALPHA`] waiting the limit grows by one per round,
//! above [`BETA`] it shrinks; 429, 503 and timeouts cut it by 30%. It starts in slow start
//! (doubling per round) and leaves it at the first sign of a queue, dropping straight to the
//! level the round suggests. A round that never filled its window does not grow the limit (the
//! caller, not the server, was the bottleneck).

use std::collections::VecDeque;
use std::time::Duration;

/// Requests waiting in the server's queue below which the limit grows.
pub const ALPHA: f64 = 2.0;
/// Requests waiting in the server's queue above which the limit shrinks.
pub const BETA: f64 = 4.0;
/// Round means remembered for the no-queue time: a server that got faster or slower is
/// re-learnt after this many rounds.
const HISTORY: usize = 30;

/// How a request ended, for the limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sample {
    /// Answered: its round-trip time, and how many requests were in flight when it was sent.
    Answered {
        /// From send to the whole answer.
        rtt: Duration,
        /// In flight on this endpoint when it was sent (itself included).
        in_flight: usize,
    },
    /// The server pushed back: 429, 503, a timeout.
    Overloaded,
}

/// One endpoint's adaptive limit.
#[derive(Debug, Clone)]
pub(crate) struct Limiter {
    limit: f64,
    max: f64,
    slow_start: bool,
    round_sum: Duration,
    round_n: usize,
    round_peak: usize,
    round_overloaded: bool,
    history: VecDeque<Duration>,
    server_waiting: Option<f64>,
    lowest: usize,
    highest: usize,
}

impl Limiter {
    /// Starts at `initial` (slow start), never above `max`.
    pub(crate) fn new(initial: usize, max: usize) -> Self {
        let initial = initial.clamp(1, max.max(1));
        Limiter {
            limit: initial as f64,
            max: max.max(1) as f64,
            slow_start: true,
            round_sum: Duration::ZERO,
            round_n: 0,
            round_peak: 0,
            round_overloaded: false,
            history: VecDeque::with_capacity(HISTORY),
            server_waiting: None,
            lowest: initial,
            highest: initial,
        }
    }

    /// Requests this endpoint may have in flight now.
    pub(crate) fn limit(&self) -> usize {
        (self.limit.floor() as usize).max(1)
    }

    /// The lowest and highest limit this limiter has set.
    pub(crate) fn range(&self) -> (usize, usize) {
        (self.lowest, self.highest)
    }

    /// The server's own count of waiting requests, when it publishes one (`None`: it does not,
    /// or the last read failed).
    pub(crate) fn set_server_waiting(&mut self, waiting: Option<f64>) {
        self.server_waiting = waiting.filter(|w| w.is_finite() && *w >= 0.0);
    }

    /// Takes one sample; at the end of a round the limit moves.
    pub(crate) fn on_sample(&mut self, sample: Sample) {
        match sample {
            Sample::Answered { rtt, in_flight } => {
                self.round_sum += rtt;
                self.round_n += 1;
                self.round_peak = self.round_peak.max(in_flight);
            }
            Sample::Overloaded => self.round_overloaded = true,
        }
        if self.round_overloaded {
            // Pushed back: no need to wait for the round.
            self.limit = (self.limit * 0.7).max(1.0);
            self.slow_start = false;
            self.end_round();
        } else if self.round_n >= self.limit() {
            self.adjust();
            self.end_round();
        }
    }

    fn end_round(&mut self) {
        let limit = self.limit();
        self.lowest = self.lowest.min(limit);
        self.highest = self.highest.max(limit);
        self.round_sum = Duration::ZERO;
        self.round_n = 0;
        self.round_peak = 0;
        self.round_overloaded = false;
    }

    fn adjust(&mut self) {
        let mean = self.round_sum / self.round_n.max(1) as u32;
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(mean);
        let base = self.history.iter().min().copied().unwrap_or(mean);
        let ratio = if mean.is_zero() {
            1.0
        } else {
            (base.as_secs_f64() / mean.as_secs_f64()).clamp(0.0, 1.0)
        };
        let estimated = self.limit * (1.0 - ratio);
        let queue = estimated.max(self.server_waiting.unwrap_or(0.0));
        let filled = self.round_peak + 1 >= self.limit();
        if self.slow_start {
            if queue >= BETA || ratio < 0.5 {
                // The first queue: drop to what the server sustained without one.
                self.slow_start = false;
                let by_server = self.limit - self.server_waiting.unwrap_or(0.0);
                self.limit = ((self.limit * ratio).min(by_server) + ALPHA).min(self.limit);
            } else if filled {
                self.limit *= 2.0;
            }
        } else if queue > BETA {
            // At most a quarter of the limit, at least one request (below a limit of 4 the
            // quarter is under one: `clamp` would panic there, so min then max).
            self.limit -= ((queue - BETA) / 2.0).min(self.limit / 4.0).max(1.0);
        } else if queue < ALPHA && filled {
            self.limit += 1.0;
        }
        self.limit = self.limit.clamp(1.0, self.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_queue_at_a_small_limit_cuts_by_one_and_never_panics() {
        // Below a limit of 4, a quarter of the limit is under one request.
        let mut limiter = Limiter::new(3, 64);
        limiter.slow_start = false;
        limiter.limit = 3.5;
        limiter.set_server_waiting(Some(40.0));
        for _ in 0..3 {
            limiter.on_sample(Sample::Answered {
                rtt: Duration::from_millis(100),
                in_flight: 3,
            });
        }
        assert_eq!(limiter.limit(), 2, "cut by one request: {}", limiter.limit);
        for _ in 0..20 {
            let n = limiter.limit();
            for _ in 0..n {
                limiter.on_sample(Sample::Answered {
                    rtt: Duration::from_millis(100),
                    in_flight: n,
                });
            }
        }
        assert_eq!(
            limiter.limit(),
            1,
            "down to one, not below: {}",
            limiter.limit
        );
    }

    /// A server that runs `slots` requests at once, each taking `service`; the rest queue.
    fn rtt_at(limit: usize, slots: usize, service: Duration) -> Duration {
        service.mul_f64((limit as f64 / slots as f64).max(1.0))
    }

    fn run(limiter: &mut Limiter, slots: usize, rounds: usize) {
        let service = Duration::from_millis(100);
        for _ in 0..rounds {
            let limit = limiter.limit();
            for _ in 0..limit {
                limiter.on_sample(Sample::Answered {
                    rtt: rtt_at(limit, slots, service),
                    in_flight: limit,
                });
            }
        }
    }

    #[test]
    fn settles_just_above_the_servers_capacity_with_a_short_queue() {
        for slots in [1, 4, 16, 64] {
            let mut limiter = Limiter::new(2, 512);
            run(&mut limiter, slots, 60);
            let limit = limiter.limit();
            assert!(
                // The no-queue time is learnt from the first round (2 in flight), so one slot
                // reads a queue of 1 as none.
                limit >= slots && limit as f64 <= slots as f64 + BETA + 3.0,
                "{slots} slots: settled at {limit}"
            );
        }
    }

    #[test]
    fn backs_off_on_overload_and_on_the_servers_own_queue() {
        let mut limiter = Limiter::new(2, 512);
        run(&mut limiter, 32, 40);
        let settled = limiter.limit();
        limiter.on_sample(Sample::Overloaded);
        assert!(
            limiter.limit() < settled,
            "{} vs {settled}",
            limiter.limit()
        );
        // Another client fills the server's queue: our latency is unchanged, but we give way.
        let before = limiter.limit();
        limiter.set_server_waiting(Some(40.0));
        run(&mut limiter, 10_000, 3);
        assert!(limiter.limit() < before, "{} vs {before}", limiter.limit());
        let (lowest, highest) = limiter.range();
        assert!(lowest <= limiter.limit() && highest >= settled);
    }

    #[test]
    fn does_not_grow_when_the_caller_never_fills_the_window() {
        let mut limiter = Limiter::new(4, 512);
        for _ in 0..200 {
            limiter.on_sample(Sample::Answered {
                rtt: Duration::from_millis(100),
                in_flight: 1,
            });
        }
        assert_eq!(limiter.limit(), 4);
    }
}
