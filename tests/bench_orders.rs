//! `minimesh bench orders` against a real `minimesh up`, briefly, and its
//! table: every call is a PAID order through the gateway, nothing failed,
//! and the table names the run. No thresholds.

mod common;

use common::process::start_mesh;
use std::time::Duration;

#[tokio::test]
async fn the_orders_workload_places_paid_orders_through_the_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = start_mesh(&dir.path().join("mesh"), &["--fulfilment-step", "1h"]).await;
    let json = dir.path().join("sqlite.json");
    let status = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_minimesh"))
            .args(["bench", "orders", "--target"])
            .arg(mesh.gateway_url())
            .args(["--concurrency", "1,2", "--duration", "700ms"])
            .args(["--warmup", "200ms", "--label", "sqlite", "--json"])
            .arg(&json)
            .kill_on_drop(true)
            .status(),
    )
    .await
    .expect("the workload finishes")
    .expect("the workload runs");
    assert!(status.success());

    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(file["label"], "sqlite");
    let runs = file["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for run in runs {
        let report = &run["report"];
        let ok = report["ok"].as_u64().unwrap();
        assert!(ok > 0, "{report}");
        assert!(report["errors"].as_object().unwrap().is_empty(), "{report}");
        assert_eq!(report["statuses"]["ORDER_STATUS_PAID"].as_u64(), Some(ok));
        assert!(report["latency"]["p99_us"].as_u64().unwrap() > 0);
    }

    let out = dir.path().join("table");
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_minimesh"))
        .args(["bench", "orders-table", "--out"])
        .arg(&out)
        .arg(&json)
        .stdout(std::process::Stdio::null())
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let table = std::fs::read_to_string(out.join("orders.md")).unwrap();
    assert!(table.contains("| sqlite | 2 |"), "{table}");
    mesh.terminate().await;
}
