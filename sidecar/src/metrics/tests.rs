//! Tests of the parent module, kept apart so the module reads as one job.
use super::*;

const CHARGE: &str = "/shop.payment.v1.PaymentService/Charge";

#[test]
fn series_carry_the_contract_labels() {
    let metrics = Metrics::new("sidecar", "payment", &[]);
    let ms3 = std::time::Duration::from_millis(3);
    metrics.request_done(INBOUND, &CallName::of(CHARGE), &"order".into(), 0, ms3);
    metrics.request_done(INBOUND, &CallName::of(CHARGE), &"order".into(), 7, ms3);
    metrics.retry(OUTBOUND, "payment");
    metrics.ejection(OUTBOUND, "payment");
    metrics.tls_failure(INBOUND);
    let guard = metrics.connection(INBOUND);
    let text = metrics.render(Format::Prometheus);
    assert!(text.contains(r#"minimesh_requests_total{direction="inbound",service="shop.payment.v1.PaymentService",method="Charge",grpc_status="0",client_id="order"} 1"#), "{text}");
    assert!(text.contains(r#"grpc_status="7",client_id="order"} 1"#));
    assert!(text.contains("minimesh_request_duration_seconds_bucket"));
    assert!(text.contains(r#"minimesh_proxy{role="sidecar",service="payment"} 1"#));
    assert!(text.contains(r#"minimesh_retries_total{direction="outbound",service="payment"} 1"#));
    assert!(text.contains(
        r#"minimesh_endpoint_ejections_total{direction="outbound",service="payment"} 1"#
    ));
    assert!(text.contains(r#"minimesh_tls_handshake_failures_total{direction="inbound"} 1"#));
    assert!(text.contains(r#"minimesh_open_connections{direction="inbound"} 1"#));
    drop(guard);
    assert!(
        metrics
            .render(Format::Prometheus)
            .contains(r#"minimesh_open_connections{direction="inbound"} 0"#)
    );
}

#[test]
fn retry_and_ejection_counters_exist_at_zero_for_every_upstream() {
    let text = Metrics::new("sidecar", "order", &["user".into(), "payment".into()])
        .render(Format::Prometheus);
    for upstream in ["user", "payment"] {
        for family in [
            "minimesh_retries_total",
            "minimesh_endpoint_ejections_total",
        ] {
            let series = format!(r#"{family}{{direction="outbound",service="{upstream}"}} 0"#);
            assert!(text.contains(&series), "{series} missing from\n{text}");
        }
    }
}

#[test]
fn unrouted_calls_share_one_series() {
    let metrics = Metrics::new("gateway", "gateway", &[]);
    for path in ["/a/b", "/c/d", "/random"] {
        let _ = CallName::of(path);
        metrics.request_done(
            OUTBOUND,
            &CallName::unrouted(),
            &"gateway".into(),
            12,
            Default::default(),
        );
    }
    let text = metrics.render(Format::Prometheus);
    let series: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("minimesh_requests_total{"))
        .collect();
    assert_eq!(series.len(), 1, "{text}");
    assert!(
        series[0].contains(r#"service="unrouted",method="unrouted""#),
        "{text}"
    );
    assert!(series[0].ends_with(" 3"), "{text}");
}
