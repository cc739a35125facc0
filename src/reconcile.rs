//! `minimesh reconcile`: checks a data dir's order and payment databases
//! against the saga's rules and prints every violation.

use anyhow::{Context, bail};
use minimesh_order::reconcile::{self, PaymentFacts};
use minimesh_payment::PaymentStore;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct ReconcileArgs {
    /// The data dir of `minimesh up` (holds order.db and payment.db).
    #[arg(long, env = "MINIMESH_DATA_DIR", default_value = "./.minimesh")]
    data_dir: PathBuf,
    /// Saga work (a PENDING order, a refund owed) older than this is a violation; younger is in flight.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2m")]
    bound: Duration,
    /// Output format.
    #[arg(short = 'o', long, value_parser = ["text", "json"], default_value = "text")]
    output: String,
}

/// Returns whether the records are clean.
pub async fn run(args: ReconcileArgs) -> anyhow::Result<bool> {
    let open = |name: &str| -> anyhow::Result<PathBuf> {
        let path = args.data_dir.join(format!("{name}.db"));
        if !path.is_file() {
            bail!("{} does not exist", path.display());
        }
        Ok(path)
    };
    let (order_db, payment_db) = (open("order")?, open("payment")?);
    let payments = minimesh_payment::SqlitePaymentStore::open(&payment_db)
        .with_context(|| format!("opening {}", payment_db.display()))?;
    let orders = minimesh_order::OrderStore::open(&order_db)
        .with_context(|| format!("opening {}", order_db.display()))?;
    // Payments first: an order is stored before it is charged, so every
    // payment read here has its order in the later read.
    let payments: Vec<PaymentFacts> = payments
        .all()
        .await?
        .into_iter()
        .map(|p| PaymentFacts {
            id: p.id,
            order_id: p.order_id,
            status: p.status,
            amount_cents: p.amount_cents,
        })
        .collect();
    let orders = orders.facts().await?;
    let bound = i64::try_from(args.bound.as_millis()).unwrap_or(i64::MAX);
    let report = reconcile::check(&payments, &orders, minimesh_runtime::now_millis(), bound);
    if args.output == "json" {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        for violation in &report.violations {
            println!("violation: {violation}");
        }
        for work in &report.in_flight {
            println!("in flight: {work}");
        }
        println!(
            "{} payments, {} orders: {} violations, {} in flight",
            report.payments,
            report.orders,
            report.violations.len(),
            report.in_flight.len()
        );
    }
    Ok(report.is_clean())
}
