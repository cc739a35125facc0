//! Reading series out of Prometheus text.

/// The value of the first sample whose line starts with `series` (name and
/// labels, exactly as exposed); None when there is none, so a series that
/// is missing is not mistaken for one at zero.
pub fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.trim().parse().ok())
    })
}

/// [`value`] of a counter; 0 when there is none.
pub fn counter(text: &str, series: &str) -> u64 {
    value(text, series).map_or(0, |v| v as u64)
}

/// The sum of every labelled sample of `name` whose labels contain all of
/// `labels` (each as written, e.g. `service="payment"`).
pub fn sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::{counter, sum, value};

    const TEXT: &str = "# TYPE minimesh_retries counter
minimesh_retries_total{service=\"a\"} 2
minimesh_retries_total{service=\"b\"} 3
minimesh_retries_total_other{service=\"a\"} 7
minimesh_retries_total 11
";

    #[test]
    fn sum_adds_the_labelled_samples_of_one_name_that_match() {
        assert_eq!(sum(TEXT, "minimesh_retries_total", &[]), 5.0);
        assert_eq!(sum(TEXT, "minimesh_retries_total", &["service=\"a\""]), 2.0);
        assert_eq!(sum(TEXT, "minimesh_retries_total", &["service=\"c\""]), 0.0);
    }

    #[test]
    fn counter_reads_one_exact_series_or_zero() {
        assert_eq!(counter(TEXT, "minimesh_retries_total{service=\"b\"}"), 3);
        assert_eq!(counter(TEXT, "minimesh_missing_total"), 0);
    }

    #[test]
    fn value_tells_a_missing_series_from_zero() {
        assert_eq!(value(TEXT, "minimesh_retries_total "), Some(11.0));
        assert_eq!(value(TEXT, "minimesh_absent"), None);
        assert_eq!(counter(TEXT, "minimesh_absent"), 0);
    }
}
