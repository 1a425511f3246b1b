//! The retry policy: what is retried, and how long to wait.
//!
//! Modelled on openai-python's contract and object_store's `RetryConfig`: connection failures,
//! 408, 429, 500, 502, 503 and 504 are retried with exponential backoff and jitter (0.5 s,
//! doubling, capped at 8 s); a server's `Retry-After` (seconds or an HTTP date) or
//! `retry-after-ms` is honoured up to 120 s, and above that the request is not retried at all
//! (waiting that long silently would look like a hang). Other 4xx are never retried. An
//! inference whose answer did not arrive before the timeout is not re-sent unless asked for:
//! the server may still be generating it.

use std::time::{Duration, SystemTime};

/// How requests are retried.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Retries after the first attempt (`vlm_max_retries`).
    pub max_retries: u32,
    /// The first backoff delay.
    pub initial_delay: Duration,
    /// The largest backoff delay.
    pub max_delay: Duration,
    /// The longest `Retry-After` honoured; a longer one is not retried.
    pub max_retry_after: Duration,
    /// Whether an inference that timed out is sent again (`vlm_retry_timeouts`).
    pub retry_timeouts: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 2,
            initial_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(8),
            max_retry_after: Duration::from_secs(120),
            retry_timeouts: false,
        }
    }
}

/// Whether a status is worth another attempt.
pub fn retryable_status(status: u16) -> bool {
    matches!(status, 408 | 429 | 500 | 502 | 503 | 504)
}

impl RetryPolicy {
    /// No retries at all.
    pub fn none() -> Self {
        RetryPolicy {
            max_retries: 0,
            ..RetryPolicy::default()
        }
    }

    /// The backoff before retry number `retry` (0-based), with up to 25% jitter taken off.
    pub fn backoff(&self, retry: u32) -> Duration {
        let base = self
            .initial_delay
            .saturating_mul(2u32.saturating_pow(retry.min(16)))
            .min(self.max_delay);
        base.mul_f64(1.0 - 0.25 * jitter())
    }
}

/// A number in [0, 1) that differs between calls (no RNG dependency needed for jitter).
fn jitter() -> f64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static STATE: AtomicU64 = AtomicU64::new(0);
    let seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut x = STATE.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed) ^ seed;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// Parses `retry-after-ms` (milliseconds) or `Retry-After` (seconds, or an HTTP date).
pub fn parse_retry_after(
    retry_after_ms: Option<&str>,
    retry_after: Option<&str>,
) -> Option<Duration> {
    // A server may send any number: past what a Duration holds it is simply "too long".
    let seconds =
        |s: f64| (s >= 0.0).then(|| Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX));
    if let Some(ms) = retry_after_ms.and_then(|v| v.trim().parse::<f64>().ok())
        && let Some(d) = seconds(ms / 1000.0)
    {
        return Some(d);
    }
    let value = retry_after?.trim();
    if let Ok(secs) = value.parse::<f64>() {
        return seconds(secs);
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_half_a_second_to_eight_with_jitter() {
        let p = RetryPolicy::default();
        for (retry, nominal) in [
            (0, 0.5),
            (1, 1.0),
            (2, 2.0),
            (3, 4.0),
            (4, 8.0),
            (5, 8.0),
            (30, 8.0),
        ] {
            let got = p.backoff(retry).as_secs_f64();
            assert!(
                got <= nominal && got >= nominal * 0.75,
                "retry {retry}: {got}"
            );
        }
    }

    #[test]
    fn retry_after_in_seconds_milliseconds_and_http_dates() {
        assert_eq!(
            parse_retry_after(None, Some("2")),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            parse_retry_after(Some("1500"), Some("9")),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_retry_after(None, Some("garbage")), None);
        assert_eq!(parse_retry_after(None, Some("-3")), None);
        assert_eq!(parse_retry_after(None, Some("NaN")), None);
        for huge in ["1e20", "inf", "18446744073709551616"] {
            assert_eq!(
                parse_retry_after(None, Some(huge)),
                Some(Duration::MAX),
                "{huge}"
            );
        }
        assert_eq!(parse_retry_after(Some("1e30"), None), Some(Duration::MAX));
        let in_a_minute = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(60));
        let d = parse_retry_after(None, Some(&in_a_minute)).unwrap();
        assert!(
            d > Duration::from_secs(55) && d <= Duration::from_secs(60),
            "{d:?}"
        );
        let past = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(60));
        assert_eq!(parse_retry_after(None, Some(&past)), Some(Duration::ZERO));
    }

    #[test]
    fn only_transient_statuses_are_retryable() {
        let retryable: Vec<u16> = (400..600).filter(|s| retryable_status(*s)).collect();
        assert_eq!(retryable, [408, 429, 500, 502, 503, 504]);
    }
}
