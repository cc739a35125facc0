//! A short run of the benchmark suite, so the harness cannot rot: every
//! scenario that needs no extra packages (direct, the mesh, the gateway)
//! runs each workload briefly through real proxy processes. No thresholds.

use std::time::Duration;

#[tokio::test]
async fn the_benchmark_suite_runs_every_scenario() {
    let out = tempfile::tempdir().unwrap();
    let status = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_minimesh"))
            .args([
                "bench",
                "suite",
                "--smoke",
                "--skip",
                "haproxy,nginx",
                "--out",
            ])
            .arg(out.path())
            .kill_on_drop(true)
            .status(),
    )
    .await
    .expect("suite finishes")
    .expect("suite runs");
    assert!(status.success());
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("results.json")).unwrap())
            .unwrap();
    let workloads = results["workloads"].as_array().unwrap();
    // The targets read off the run: latency and memory (CPU needs the HAProxy pair).
    let table = std::fs::read_to_string(out.path().join("results.md")).unwrap();
    for target in ["added mean latency", "256 concurrent streams"] {
        assert!(table.contains(target), "no {target:?} row in {table}");
    }
    assert_eq!(workloads.len(), 11);
    for entry in workloads {
        let cells = entry[1].as_object().unwrap();
        for scenario in ["direct", "minimesh", "gateway"] {
            let report = &cells[scenario]["report"];
            assert!(
                report["ok"].as_u64().unwrap() > 0,
                "{scenario} {}: {report}",
                entry[0]
            );
            assert!(
                report["errors"].as_object().unwrap().is_empty(),
                "{scenario}: {report}"
            );
        }
        // Proxy scenarios measured both of their proxies.
        assert_eq!(
            cells["minimesh"]["proxy_cpu_seconds_each"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
        for series in ["proxy_peak_rss_kib", "proxy_peak_anon_kib"] {
            let peaks = cells["minimesh"][series].as_array().unwrap();
            assert_eq!(peaks.len(), 2, "{series}");
            assert!(
                peaks.iter().all(|kib| kib.as_u64().unwrap() > 0),
                "{series}"
            );
        }
    }
    let table = std::fs::read_to_string(out.path().join("results.md")).unwrap();
    assert!(table.contains("| minimesh |") && table.contains("× direct"));
}
