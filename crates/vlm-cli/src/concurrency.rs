//! `--concurrency N|auto`: a fixed number of requests in flight, or as many as the servers
//! sustain (adaptive, per endpoint).

use vlm_core::ReplicaOptions;

/// The most requests one endpoint may have in flight under `--concurrency auto`.
pub const AUTO_MAX_PER_ENDPOINT: usize = 256;

/// How many requests a run keeps in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Concurrency {
    /// Exactly this many (at most).
    Fixed(usize),
    /// Adapted to what each endpoint sustains: starts at 2 per endpoint, grows while the
    /// server keeps up, backs off on queueing, 429, 503 and timeouts.
    Auto,
}

/// Parses `--concurrency`: a whole number from 1 to 1024, or `auto`.
pub fn parse(s: &str) -> Result<Concurrency, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("auto") {
        return Ok(Concurrency::Auto);
    }
    s.parse::<usize>()
        .ok()
        .filter(|n| (1..=1024).contains(n))
        .map(Concurrency::Fixed)
        .ok_or_else(|| format!("{s:?} is not a number from 1 to 1024, nor auto"))
}

impl Concurrency {
    /// The replica options for this choice.
    pub fn options(self, options: ReplicaOptions) -> ReplicaOptions {
        match self {
            Concurrency::Fixed(_) => options,
            Concurrency::Auto => options.adaptive(AUTO_MAX_PER_ENDPOINT),
        }
    }

    /// The most requests started at once: the number, or for `auto` a bound the adaptive
    /// limits stay under (requests are admitted as the limits allow).
    pub fn cap(self, endpoints: usize) -> usize {
        match self {
            Concurrency::Fixed(n) => n,
            Concurrency::Auto => AUTO_MAX_PER_ENDPOINT.saturating_mul(endpoints.max(1)),
        }
    }
}

/// How `narrate` and `run` send: `--concurrency` and `--wait`, one definition for both.
#[derive(Debug, clap::Args)]
pub struct Sending {
    /// Requests in flight at once (1-1024), or auto: start at 2 per endpoint and adapt to what
    /// each server sustains (growing while it keeps up, backing off on queueing, 429, 503 and
    /// timeouts; vLLM's published queue is kept short)
    #[arg(long, default_value = "4", value_name = "N|auto", value_parser = parse)]
    pub concurrency: Concurrency,
    /// Wait up to this many seconds for a server that is still starting before the run; during
    /// the run, how long requests wait for a server that went away (default 60) before the run
    /// stops with exit 3
    #[arg(long, value_name = "SECONDS", value_parser = crate::parse_seconds)]
    pub wait: Option<std::time::Duration>,
}

impl Sending {
    /// How long requests wait for a server that went away: `--wait`, else 60 s.
    pub fn outage_wait(&self) -> std::time::Duration {
        self.wait.unwrap_or(crate::OUTAGE_WAIT)
    }

    /// The replica options these flags and the settings imply.
    pub fn options(&self, settings: &vlm_factory::VlmSettings) -> ReplicaOptions {
        self.concurrency
            .options(vlm_factory::replica_options(settings).outage_wait(self.outage_wait()))
    }
}

impl std::fmt::Display for Concurrency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Concurrency::Fixed(n) => write!(f, "{n}"),
            Concurrency::Auto => f.write_str("auto"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_number_or_auto() {
        assert_eq!(parse("8"), Ok(Concurrency::Fixed(8)));
        assert_eq!(parse(" AUTO "), Ok(Concurrency::Auto));
        for bad in ["0", "1025", "-1", "many", ""] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
