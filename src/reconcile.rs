//! `minimesh reconcile`: checks a data dir's order and payment databases
//! against the saga's rules and prints every violation. It opens both
//! read-only and changes nothing, so it is safe beside a running mesh.

use anyhow::{Context, bail};
use minimesh_order::reconcile::{self, PaymentFacts};
use minimesh_payment::PaymentStore;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub(crate) struct ReconcileArgs {
    /// The data dir of `minimesh up` (holds order.db and payment.db).
    #[arg(long, env = "MINIMESH_DATA_DIR", default_value = "./.minimesh")]
    data_dir: PathBuf,
    /// Saga work (a PENDING order, a refund owed) older than this is a violation; younger is in flight.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2m")]
    bound: Duration,
    /// The PostgreSQL URL the mesh was started with (`up --database-url`);
    /// without it, the SQLite files in the data dir are read.
    #[arg(long, env = "MINIMESH_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, value_parser = ["text", "json"], default_value = "text")]
    output: String,
}

/// Returns whether the records are clean.
pub(crate) async fn run(args: ReconcileArgs) -> anyhow::Result<bool> {
    let (payments, orders) = match &args.database_url {
        Some(url) => {
            let shown = minimesh_runtime::store::redact(url);
            let payments = minimesh_payment::PgPaymentStore::connect(url, "minimesh_payment")
                .await
                .with_context(|| format!("connecting to {shown}"))?;
            let target = minimesh_runtime::store::DbTarget::Postgres(url.clone());
            let orders = minimesh_order::OrderStore::open_target(&target, "minimesh_order")
                .await
                .with_context(|| format!("connecting to {shown}"))?;
            (
                minimesh_payment::AnyPaymentStore::Postgres(payments),
                orders,
            )
        }
        None => {
            let open = |name: &str| -> anyhow::Result<PathBuf> {
                let path = args.data_dir.join(format!("{name}.db"));
                if !path.is_file() {
                    bail!("{} does not exist", path.display());
                }
                Ok(path)
            };
            let (order_db, payment_db) = (open("order")?, open("payment")?);
            let payments = minimesh_payment::SqlitePaymentStore::open_read_only(&payment_db)
                .with_context(|| format!("opening {}", payment_db.display()))?;
            let orders = minimesh_order::OrderStore::open_read_only(&order_db)
                .with_context(|| format!("opening {}", order_db.display()))?;
            (minimesh_payment::AnyPaymentStore::Sqlite(payments), orders)
        }
    };
    // Payments before and after the orders (see `reconcile::check`).
    let before = payment_facts(&payments).await?;
    let order_facts = orders.facts().await?;
    let after = payment_facts(&payments).await?;
    let bound = i64::try_from(args.bound.as_millis()).unwrap_or(i64::MAX);
    let report = reconcile::check(
        &before,
        &order_facts,
        &after,
        minimesh_runtime::now_millis(),
        bound,
    );
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

async fn payment_facts(
    store: &minimesh_payment::AnyPaymentStore,
) -> anyhow::Result<Vec<PaymentFacts>> {
    Ok(store
        .all()
        .await?
        .into_iter()
        .map(|p| PaymentFacts {
            id: p.id,
            order_id: p.order_id,
            status: p.status,
            amount_cents: p.amount_cents,
        })
        .collect())
}
