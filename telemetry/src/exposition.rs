//! Metrics exposition with content negotiation, as Prometheus' own client
//! libraries do: the classic text format (0.0.4) by default, OpenMetrics
//! 1.0 when the scraper's `Accept` asks for it.
//!
//! prometheus-client only writes OpenMetrics, whose counter families are
//! named without `_total` and which ends in `# EOF`; strict parsers of the
//! classic format (`promtool check metrics`) reject that, so the classic form
//! is derived from it here (the crate has no encoder for it).

use prometheus_client::registry::Registry;

/// Content type of the classic Prometheus text format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Content type of OpenMetrics 1.0 text.
pub const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Which text format a scrape gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The classic Prometheus text format (0.0.4).
    Prometheus,
    /// OpenMetrics 1.0 text.
    OpenMetrics,
}

impl Format {
    /// OpenMetrics when `Accept` lists it (with any non-zero q), else classic text.
    pub fn negotiate(accept: Option<&http::HeaderValue>) -> Self {
        let Some(accept) = accept.and_then(|v| v.to_str().ok()) else {
            return Format::Prometheus;
        };
        let wants_openmetrics = accept.split(',').any(|range| {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default();
            let refused = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
        });
        if wants_openmetrics {
            Format::OpenMetrics
        } else {
            Format::Prometheus
        }
    }

    /// The `content-type` of a scrape in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => PROMETHEUS_TEXT,
            Format::OpenMetrics => OPENMETRICS_TEXT,
        }
    }
}

/// Encodes every registry, in order, as one exposition in `format`.
pub fn encode(registries: &[&Registry], format: Format) -> String {
    let mut openmetrics = String::new();
    for registry in registries {
        let mut part = String::new();
        // Writing into a String cannot fail; a failing registry is left out
        // rather than half-written.
        if prometheus_client::encoding::text::encode_registry(&mut part, registry).is_ok() {
            openmetrics.push_str(&part);
        }
    }
    match format {
        Format::OpenMetrics => {
            openmetrics.push_str("# EOF\n");
            openmetrics
        }
        Format::Prometheus => to_prometheus_text(&openmetrics),
    }
}

/// Rewrites OpenMetrics text (as prometheus-client writes it) in the classic
/// format: counter families take their samples' `_total` name, `# UNIT` and
/// `# EOF` go, and counters' `_created` samples are dropped.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // Metadata lines of the family being read; a family's `# TYPE` may come
    // after its `# HELP`, so they are held until the type is known.
    let mut pending: Vec<&str> = Vec::new();
    let mut counter_family: Option<String> = None;
    let flush = |pending: &mut Vec<&str>, out: &mut String, counter: &Option<String>| {
        for line in pending.drain(..) {
            match (counter, metadata(line)) {
                (Some(family), Some((kind, name, rest))) if name == family => {
                    out.push_str(&format!("# {kind} {name}_total{rest}\n"));
                }
                _ => {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
    };
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some((kind, name, rest)) = metadata(line) {
            if kind == "HELP" && !pending.is_empty() {
                flush(&mut pending, &mut out, &counter_family);
            }
            if kind == "TYPE" {
                counter_family = (rest.trim() == "counter").then(|| name.to_owned());
            } else if kind == "HELP" {
                counter_family = None;
            }
            pending.push(line);
            continue;
        }
        flush(&mut pending, &mut out, &counter_family);
        if let Some(family) = &counter_family
            && line.starts_with(&format!("{family}_created"))
        {
            continue;
        }
        // Exemplars (` # {...}`) exist only in OpenMetrics.
        match line.find(" # {") {
            Some(at) => out.push_str(&line[..at]),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    flush(&mut pending, &mut out, &counter_family);
    out
}

/// Splits `# KIND name rest` into its parts.
fn metadata(line: &str) -> Option<(&str, &str, &str)> {
    let body = line.strip_prefix("# ")?;
    let (kind, after) = body.split_once(' ')?;
    if !matches!(kind, "HELP" | "TYPE") {
        return None;
    }
    let (name, rest) = match after.find(' ') {
        Some(at) => (&after[..at], &after[at..]),
        None => (after, ""),
    };
    Some((kind, name, rest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::metrics::histogram::Histogram;

    fn registry() -> Registry {
        let mut registry = Registry::default();
        let counter = Counter::<u64>::default();
        counter.inc();
        registry.register("demo_calls", "Calls made", counter);
        registry.register("demo_open", "Open things", Gauge::<i64>::default());
        let histogram = Histogram::new([0.1, 1.0]);
        histogram.observe(0.5);
        registry.register_with_unit(
            "demo_latency",
            "Latency",
            prometheus_client::registry::Unit::Seconds,
            histogram,
        );
        registry
    }

    #[test]
    fn classic_text_names_counter_families_with_total_and_has_no_eof() {
        let text = encode(&[&registry()], Format::Prometheus);
        assert!(
            text.contains("# HELP demo_calls_total Calls made.\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE demo_calls_total counter\n"), "{text}");
        assert!(text.contains("\ndemo_calls_total 1\n"), "{text}");
        assert!(text.contains("# TYPE demo_open gauge\n"), "{text}");
        assert!(
            text.contains("# TYPE demo_latency_seconds histogram\n"),
            "{text}"
        );
        assert!(
            text.contains("demo_latency_seconds_bucket{le=\"1.0\"} 1"),
            "{text}"
        );
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
    }

    #[test]
    fn openmetrics_keeps_the_family_name_and_ends_with_eof() {
        let text = encode(&[&registry()], Format::OpenMetrics);
        assert!(text.contains("# TYPE demo_calls counter\n"), "{text}");
        assert!(
            text.contains("# UNIT demo_latency_seconds seconds\n"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn negotiation_follows_accept() {
        let header = |v: &'static str| http::HeaderValue::from_static(v);
        assert_eq!(Format::negotiate(None), Format::Prometheus);
        assert_eq!(
            Format::negotiate(Some(&header("text/plain;version=0.0.4;q=0.5,*/*;q=0.1"))),
            Format::Prometheus
        );
        assert_eq!(
            Format::negotiate(Some(&header(
                "application/openmetrics-text;version=1.0.0;q=0.75,text/plain;version=0.0.4;q=0.5"
            ))),
            Format::OpenMetrics
        );
        assert_eq!(
            Format::negotiate(Some(&header("application/openmetrics-text;q=0"))),
            Format::Prometheus
        );
    }
}
