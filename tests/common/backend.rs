//! The store a `minimesh up` under test keeps its data in: SQLite files in
//! the data dir, or a private PostgreSQL server. Scenarios take a `Backend`
//! so that one scenario runs against both.

use super::process::{Mesh, start_mesh_with_env};
use minimesh_testpg::PgServer;
use std::path::Path;
use std::time::{Duration, Instant};

pub(crate) enum Backend {
    Sqlite,
    Postgres { server: PgServer, url: String },
}

impl Backend {
    /// A PostgreSQL server with an empty database for the mesh; `None`
    /// when PostgreSQL is not installed (the test then skips; see `PgServer`).
    pub(crate) async fn postgres() -> Option<Self> {
        let server = PgServer::start()?;
        let url = server.create_database("minimesh");
        Some(Self::Postgres { server, url })
    }

    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres { .. } => "postgres",
        }
    }

    pub(crate) fn database_url(&self) -> Option<&str> {
        match self {
            Self::Sqlite => None,
            Self::Postgres { url, .. } => Some(url),
        }
    }

    pub(crate) fn server(&mut self) -> &mut PgServer {
        match self {
            Self::Sqlite => panic!("no PostgreSQL server with SQLite"),
            Self::Postgres { server, .. } => server,
        }
    }

    /// `extra` plus the options that select this store.
    pub(crate) fn args<'a>(&'a self, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = extra.to_vec();
        if let Some(url) = self.database_url() {
            args.extend(["--database-url", url]);
        }
        args
    }

    /// `minimesh up` on `data_dir` with this store.
    pub(crate) async fn start_mesh(
        &self,
        data_dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Mesh {
        start_mesh_with_env(data_dir, &self.args(extra), env).await
    }

    /// `minimesh reconcile -o json` on this store; asserts the exit status
    /// says whether there are violations.
    pub(crate) async fn reconcile(&self, data_dir: &Path) -> serde_json::Value {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_minimesh"))
            .arg("reconcile")
            .arg("--data-dir")
            .arg(data_dir)
            .args(self.args(&["-o", "json"]))
            .output()
            .await
            .expect("run minimesh reconcile");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|err| {
            panic!(
                "reconcile printed no JSON ({err}): {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        let clean = report["violations"]
            .as_array()
            .expect("violations")
            .is_empty();
        assert_eq!(
            out.status.success(),
            clean,
            "exit status {} must say whether there are violations: {report}",
            out.status
        );
        report
    }

    /// Waits until every saga the mesh started has finished, then returns
    /// the reconciliation report (which must have no violations).
    pub(crate) async fn settled_and_reconciled(
        &self,
        data_dir: &Path,
        within: Duration,
    ) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            let report = self.reconcile(data_dir).await;
            assert!(
                report["violations"].as_array().unwrap().is_empty(),
                "reconciliation found violations: {report:#}"
            );
            if report["in_flight"].as_array().unwrap().is_empty() {
                return report;
            }
            assert!(
                Instant::now() < deadline,
                "saga work still in flight after {within:?}: {report:#}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Rows of `sql` run on `service`'s own tables (SQLite: `<service>.db`
    /// in the data dir; PostgreSQL: schema `minimesh_<service>`), every
    /// value as text (NULL as ""). Parameters are `$1`, `$2`…, each first
    /// used in that order (SQLite numbers named parameters as they appear).
    pub(crate) async fn rows(
        &self,
        data_dir: &Path,
        service: &str,
        sql: &str,
        params: &[&str],
    ) -> Vec<Vec<String>> {
        match self {
            Self::Sqlite => sqlite_rows(&data_dir.join(format!("{service}.db")), sql, params),
            Self::Postgres { url, .. } => postgres_rows(url, service, sql, params).await,
        }
    }

    /// Orders with more than one payment row: a double charge.
    pub(crate) async fn orders_charged_twice(&self, data_dir: &Path) -> Vec<Vec<String>> {
        self.rows(
            data_dir,
            "payment",
            "SELECT order_id, count(*) FROM payments GROUP BY order_id HAVING count(*) > 1",
            &[],
        )
        .await
    }

    /// One `i64` per row (the first column).
    pub(crate) async fn column_i64(
        &self,
        data_dir: &Path,
        service: &str,
        sql: &str,
        params: &[&str],
    ) -> Vec<i64> {
        self.rows(data_dir, service, sql, params)
            .await
            .into_iter()
            .map(|row| {
                row[0]
                    .parse()
                    .unwrap_or_else(|_| panic!("{sql}: {:?} is not an integer", row[0]))
            })
            .collect()
    }
}

fn sqlite_rows(db: &Path, sql: &str, params: &[&str]) -> Vec<Vec<String>> {
    use rusqlite::types::ValueRef;
    let conn =
        rusqlite::Connection::open(db).unwrap_or_else(|err| panic!("open {}: {err}", db.display()));
    let mut stmt = conn.prepare(sql).expect("prepare");
    let columns = stmt.column_count();
    stmt.query_map(rusqlite::params_from_iter(params), |row| {
        (0..columns)
            .map(|i| {
                Ok(match row.get_ref(i)? {
                    ValueRef::Null => String::new(),
                    ValueRef::Integer(n) => n.to_string(),
                    ValueRef::Real(x) => x.to_string(),
                    ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
                    ValueRef::Blob(b) => format!("{b:?}"),
                })
            })
            .collect()
    })
    .expect("query")
    .map(|row| row.expect("row"))
    .collect()
}

/// Runs `sql` as a simple query (text results whatever the column types),
/// with the parameters inlined as quoted literals: test values only.
async fn postgres_rows(url: &str, service: &str, sql: &str, params: &[&str]) -> Vec<Vec<String>> {
    use tokio_postgres::SimpleQueryMessage;
    let mut config: tokio_postgres::Config = url.parse().expect("database url");
    config.options(format!("-c search_path=minimesh_{service}"));
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|err| panic!("connect to {url}: {err}"));
    let driver = tokio::spawn(connection);
    let mut text = sql.to_owned();
    // Highest first, so $1 does not match the start of $10.
    for (i, value) in params.iter().enumerate().rev() {
        let literal = format!("'{}'", value.replace('\'', "''"));
        text = text.replace(&format!("${}", i + 1), &literal);
    }
    let rows = client
        .simple_query(&text)
        .await
        .unwrap_or_else(|err| panic!("{text}: {err}"))
        .into_iter()
        .filter_map(|message| match message {
            SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).unwrap_or_default().to_owned())
                    .collect(),
            ),
            _ => None,
        })
        .collect();
    drop(client);
    let _ = driver.await;
    rows
}
