//! A store that stops taking writes and comes back: the service says so
//! (UNAVAILABLE naming the store, NOT_SERVING so its sidecar's /ready is
//! 503) and recovers by itself, with no restart, once the files are usable.
//!
//! The fault a review found: `payment.db` made read-only for a moment, the
//! payment process restarted meanwhile, and SQLite, which opens a file it
//! may not write read-only without a word, kept failing every Charge with
//! "attempt to write a readonly database" long after the file was writable.

mod common;

use common::process::*;
use minimesh_proto::payment::v1::ChargeRequest;
use minimesh_proto::payment::v1::payment_service_client::PaymentServiceClient;
use minimesh_testsupport::{eventually, http_get};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Makes a file unwritable for everyone, root included (root ignores
/// permission bits, not the immutable attribute), and undoes it on drop.
struct ReadOnly {
    path: PathBuf,
    immutable: bool,
}

impl ReadOnly {
    fn new(path: &Path) -> Option<Self> {
        let immutable = nix::unistd::geteuid().is_root();
        let ok = if immutable {
            Command::new("chattr")
                .arg("+i")
                .arg(path)
                .status()
                .is_ok_and(|s| s.success())
        } else {
            Command::new("chmod")
                .arg("0444")
                .arg(path)
                .status()
                .is_ok_and(|s| s.success())
        };
        ok.then(|| Self {
            path: path.to_owned(),
            immutable,
        })
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        let (tool, arg) = if self.immutable {
            ("chattr", "-i")
        } else {
            ("chmod", "0644")
        };
        let _ = Command::new(tool).arg(arg).arg(&self.path).status();
    }
}

fn charge(key: &str) -> ChargeRequest {
    ChargeRequest {
        order_id: "ord_fault".into(),
        user_id: "usr_fault".into(),
        amount_cents: 1_000,
        currency: "EUR".into(),
        idempotency_key: key.into(),
    }
}

async fn ready_status(admin: &str) -> Option<u16> {
    http_get(admin, "/ready").await.map(|(code, _)| code)
}

#[tokio::test]
async fn a_read_only_database_file_is_reported_and_recovered_from_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = start_mesh(dir.path(), &[]).await;
    let payment = mesh.instances("payment").remove(0);
    let app = format!("http://{}", payment["app"].as_str().unwrap());
    let admin = payment["admin"].as_str().unwrap().to_owned();
    let mut client = PaymentServiceClient::connect(app.clone()).await.unwrap();
    client
        .charge(charge("before"))
        .await
        .expect("a charge works before the fault");

    let db = dir.path().join("payment.db");
    let Some(read_only) = ReadOnly::new(&db) else {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!(
                "cannot make {} read-only (chattr/chmod failed)",
                db.display()
            );
        }
        eprintln!("skipping: cannot make {} read-only here", db.display());
        return;
    };
    // The process dies while the file is read-only (the SIGBUS of the
    // report); `up` restarts it and it opens the file as it is now.
    let old_pid = payment["pid"].as_i64().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let new_pid = eventually(
        Duration::from_secs(30),
        "the payment process restarted",
        || {
            let mesh = &mesh;
            async move {
                let pid = mesh.instances("payment")[0]["pid"].as_i64()?;
                (pid != old_pid && process_alive(pid)).then_some(pid)
            }
        },
    )
    .await;

    // Down, and saying why: every call UNAVAILABLE naming the store, /ready 503.
    let status = eventually(Duration::from_secs(30), "a refused charge", || {
        let app = app.clone();
        async move {
            let mut client = PaymentServiceClient::connect(app).await.ok()?;
            client.charge(charge("during")).await.err()
        }
    })
    .await;
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("payment store is down")
            && status.message().contains("read-only"),
        "the message names the fault: {:?}",
        status.message()
    );
    eventually(
        Duration::from_secs(10),
        "the sidecar's /ready to say 503",
        || {
            let admin = admin.clone();
            async move { (ready_status(&admin).await == Some(503)).then_some(()) }
        },
    )
    .await;

    // Writable again: within 5 s calls succeed and /ready is 200, same process.
    drop(read_only);
    let mut client = PaymentServiceClient::connect(app.clone()).await.unwrap();
    let recovered = eventually(Duration::from_secs(5), "charges to work again", || {
        let mut client = client.clone();
        async move { client.charge(charge("after")).await.ok() }
    })
    .await;
    assert_eq!(recovered.get_ref().amount_cents, 1_000);
    eventually(
        Duration::from_secs(5),
        "the sidecar's /ready to say 200",
        || {
            let admin = admin.clone();
            async move { (ready_status(&admin).await == Some(200)).then_some(()) }
        },
    )
    .await;
    assert_eq!(
        mesh.instances("payment")[0]["pid"].as_i64(),
        Some(new_pid),
        "recovered without another restart"
    );
    // Nothing half-written: the refused charge left no payment behind, and
    // "during" can still be charged once.
    let during = client.charge(charge("during")).await.unwrap().into_inner();
    let again = client.charge(charge("during")).await.unwrap().into_inner();
    assert_eq!(during.id, again.id);
}
