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
