//! `grpc-timeout`: the deadline a gRPC client gives its call, as at most
//! eight digits and a unit (H, M, S, m, u, n).

use http::HeaderValue;
use std::time::Duration;

/// The header a gRPC call's deadline travels in.
pub const HEADER: &str = "grpc-timeout";

/// Parses a `grpc-timeout` value; None when it is malformed.
pub fn parse(value: &HeaderValue) -> Option<Duration> {
    let text = value.to_str().ok()?;
    if text.len() < 2 || text.len() > 9 {
        return None;
    }
    let (digits, unit) = text.split_at(text.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.checked_mul(3600)?),
        "M" => Duration::from_secs(amount.checked_mul(60)?),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// Formats a duration as a `grpc-timeout` value, in the finest unit whose
/// amount fits eight digits, rounding up by at most one unit.
pub fn format(remaining: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let nanos = remaining.as_nanos();
    let units: [(u128, &str); 6] = [
        (1, "n"),
        (1_000, "u"),
        (1_000_000, "m"),
        (1_000_000_000, "S"),
        (60_000_000_000, "M"),
        (3_600_000_000_000, "H"),
    ];
    for (per_unit, unit) in units {
        let amount = nanos.div_ceil(per_unit);
        if amount <= MAX {
            // Digits and an ASCII unit are always a valid header value.
            return HeaderValue::from_str(&format!("{amount}{unit}"))
                .unwrap_or(HeaderValue::from_static("99999999H"));
        }
    }
    HeaderValue::from_static("99999999H")
}

/// The deadline of one proxied call: when it was received and how long the
/// caller allowed, possibly capped by the proxy's own per-call limit.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    at: tokio::time::Instant,
}

impl Deadline {
    /// A deadline `timeout` from now.
    pub fn after(timeout: Duration) -> Self {
        Self {
            at: tokio::time::Instant::now() + timeout,
        }
    }

    /// Reads the caller's deadline from the request headers.
    pub fn from_headers(headers: &http::HeaderMap) -> Option<Self> {
        headers.get(HEADER).and_then(parse).map(Self::after)
    }

    /// The caller's deadline, None without one; a malformed `grpc-timeout`
    /// is an error naming the value, never silently no deadline.
    pub fn try_from_headers(headers: &http::HeaderMap) -> Result<Option<Self>, String> {
        match headers.get(HEADER) {
            None => Ok(None),
            Some(value) => parse(value).map(|t| Some(Self::after(t))).ok_or_else(|| {
                format!(
                    "malformed grpc-timeout {:?}: expected 1 to 8 digits and a unit (H, M, S, m, u, n)",
                    String::from_utf8_lossy(value.as_bytes())
                )
            }),
        }
    }

    /// Time left, zero once past.
    pub fn remaining(&self) -> Duration {
        self.at
            .saturating_duration_since(tokio::time::Instant::now())
    }

    /// Whether the deadline has passed.
    pub fn expired(&self) -> bool {
        self.remaining().is_zero()
    }

    /// The deadline as a Tokio instant, for timers.
    pub fn instant(&self) -> tokio::time::Instant {
        self.at
    }

    /// Rewrites `grpc-timeout` with what is left, so the next hop sees the
    /// time already spent taken off.
    pub fn propagate(&self, headers: &mut http::HeaderMap) {
        headers.insert(HEADER, format(self.remaining()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit_and_rejects_garbage() {
        let cases = [
            ("1H", Duration::from_secs(3600)),
            ("2M", Duration::from_secs(120)),
            ("3S", Duration::from_secs(3)),
            ("50m", Duration::from_millis(50)),
            ("7u", Duration::from_micros(7)),
            ("9n", Duration::from_nanos(9)),
            ("99999999S", Duration::from_secs(99_999_999)),
        ];
        for (text, expected) in cases {
            assert_eq!(
                parse(&HeaderValue::from_static(text)),
                Some(expected),
                "{text}"
            );
        }
        for bad in ["", "S", "10", "1x", "-1S", "123456789S", "1.5S", " 1S"] {
            assert_eq!(parse(&HeaderValue::from_str(bad).unwrap()), None, "{bad:?}");
        }
    }

    #[test]
    fn formats_in_the_finest_unit_that_fits_and_round_trips() {
        assert_eq!(format(Duration::from_millis(50)), "50000000n");
        assert_eq!(format(Duration::from_millis(500)), "500000u");
        assert_eq!(format(Duration::from_secs(30)), "30000000u");
        assert_eq!(format(Duration::from_secs(300)), "300000m");
        assert_eq!(format(Duration::from_secs(3600 * 24 * 365 * 4)), "2102400M");
        for d in [
            Duration::from_nanos(1),
            Duration::from_millis(1234),
            Duration::from_secs(100_000),
        ] {
            let back = parse(&format(d)).unwrap();
            assert!(
                back >= d && back - d < d / 1000 + Duration::from_nanos(1),
                "{d:?} -> {back:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn propagation_takes_off_the_time_spent() {
        let mut headers = http::HeaderMap::new();
        headers.insert(HEADER, HeaderValue::from_static("100m"));
        let deadline = Deadline::from_headers(&headers).unwrap();
        tokio::time::advance(Duration::from_millis(30)).await;
        deadline.propagate(&mut headers);
        assert_eq!(
            parse(headers.get(HEADER).unwrap()),
            Some(Duration::from_millis(70))
        );
        tokio::time::advance(Duration::from_millis(80)).await;
        assert!(deadline.expired());
    }
}
