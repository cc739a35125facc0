//! PostgreSQL access shared by the services: a connection pool whose
//! connections live in the service's own schema, migrations run under an
//! advisory lock, and a listener for NOTIFY.
//!
//! Unlike SQLite, every guarantee across replicas comes from the database:
//! unique constraints, row locks and advisory locks, never in-process locks.

use crate::db::DbError;
use crate::health::StoreHealth;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_postgres::error::SqlState;

/// Connections per process; several replicas share one server.
const POOL_SIZE: usize = 16;
/// How long a call waits for a connection before the store counts as down.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Server-side bounds on one statement, one lock wait, and a transaction
/// left open by a client that stopped answering.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);
const LOCK_TIMEOUT: Duration = Duration::from_secs(5);
const IDLE_IN_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Client-side bound on one store operation: a server that hangs (stopped,
/// or a network that drops packets) cannot enforce its own timeouts.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(12);

/// A pool of connections to one service's schema.
#[derive(Clone)]
pub struct Pg {
    pool: Pool,
    config: Arc<tokio_postgres::Config>,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    schema: Arc<str>,
    health: StoreHealth,
}

/// True for URLs this module handles (`postgres://`, `postgresql://`).
pub fn is_postgres_url(target: &str) -> bool {
    target.starts_with("postgres://") || target.starts_with("postgresql://")
}

impl Pg {
    /// Connects to `url`, creates `schema` if missing and applies every
    /// migration not applied yet (`migrations[i]` is version i+1), holding a
    /// session advisory lock so replicas starting together take turns.
    pub async fn connect(url: &str, schema: &str, migrations: &[&str]) -> Result<Self, DbError> {
        check_identifier(schema)?;
        let settings = crate::pg_tls::Settings::from_url(url)?;
        let mut config: tokio_postgres::Config = settings
            .url
            .parse()
            .map_err(|err: tokio_postgres::Error| DbError::Config(err.to_string()))?;
        // Unqualified names resolve in the service's own schema only. The
        // timeouts bound what a stuck peer can cost: a replica stopped
        // (SIGSTOP) inside a transaction is cut off by the server and its
        // locks released, and nobody waits on a lock or a statement for long.
        let session = format!(
            "-c search_path={schema} -c statement_timeout={}ms -c lock_timeout={}ms \
             -c idle_in_transaction_session_timeout={}ms",
            STATEMENT_TIMEOUT.as_millis(),
            LOCK_TIMEOUT.as_millis(),
            IDLE_IN_TRANSACTION_TIMEOUT.as_millis()
        );
        let options = match config.get_options() {
            Some(existing) => format!("{existing} {session}"),
            None => session,
        };
        config.options(&options);
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        config.keepalives_idle(Duration::from_secs(30));
        if config.get_application_name().is_none() {
            config.application_name(format!("minimesh-{schema}"));
        }
        let tls = settings.connector()?;
        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|err| DbError::Config(err.to_string()))?;
        let pg = Self {
            pool,
            config: Arc::new(config),
            tls,
            schema: schema.into(),
            health: StoreHealth::new(),
        };
        pg.migrate(migrations).await?;
        Ok(pg)
    }

    /// The schema this service's tables live in.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// A pooled connection; an unreachable server is [`DbError::Down`].
    pub async fn client(&self) -> Result<deadpool_postgres::Object, DbError> {
        self.pool
            .get()
            .await
            .map_err(DbError::from)
            .inspect_err(|err| self.health.report(err))
    }

    /// Whether the store is serving, as calls and probes last saw it.
    pub fn health(&self) -> &StoreHealth {
        &self.health
    }

    /// Runs one store operation, giving up after [`OPERATION_TIMEOUT`]: the
    /// store then counts as down.
    pub async fn bounded<T, E: From<DbError>>(
        &self,
        operation: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        match tokio::time::timeout(OPERATION_TIMEOUT, operation).await {
            Ok(result) => result,
            Err(_) => {
                let err = DbError::Down(format!(
                    "no answer from PostgreSQL within {}s",
                    OPERATION_TIMEOUT.as_secs()
                ));
                self.report(&err);
                Err(E::from(err))
            }
        }
    }

    /// Tells health about a failed statement (a lost server shows here first).
    pub fn report(&self, err: &DbError) {
        self.health.report(err);
    }

    /// A failed statement as a [`DbError`], told to health on the way.
    pub fn failed(&self, err: tokio_postgres::Error) -> DbError {
        let err = DbError::from(err);
        self.report(&err);
        err
    }

    /// Checks that the server answers and takes writes (a standby does not).
    pub async fn probe(&self) -> Result<(), DbError> {
        let client = self.client().await?;
        let row = client.query_one("SHOW transaction_read_only", &[]).await?;
        if row.get::<_, &str>(0) == "on" {
            return Err(DbError::Down("the server is read-only (a standby?)".into()));
        }
        Ok(())
    }

    async fn migrate(&self, migrations: &[&str]) -> Result<(), DbError> {
        let mut client = self.client().await?;
        let schema = &*self.schema;
        // Session lock on this connection: held across the migrations'
        // transactions, released below or when the connection drops.
        client
            .execute(
                "SELECT pg_advisory_lock(hashtext('minimesh migrations ' || $1::text))",
                &[&schema],
            )
            .await?;
        let result = apply_migrations(&mut client, schema, migrations).await;
        let unlock = client
            .execute(
                "SELECT pg_advisory_unlock(hashtext('minimesh migrations ' || $1::text))",
                &[&schema],
            )
            .await;
        result?;
        unlock?;
        Ok(())
    }

    /// Calls `wake` after every NOTIFY on `channel`, and once more after each
    /// (re)connection, since notifications sent while disconnected are lost:
    /// the caller re-reads its table when woken, so nothing is missed.
    /// Runs until the returned handle is dropped.
    pub fn listen(&self, channel: &str, wake: Arc<Notify>) -> Result<ListenHandle, DbError> {
        check_identifier(channel)?;
        let pg = self.clone();
        let channel = channel.to_owned();
        let task = tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                match pg.listen_once(&channel, &wake).await {
                    Ok(()) => backoff = Duration::from_millis(100),
                    Err(err) => {
                        tracing::warn!(%err, %channel, "LISTEN connection lost; reconnecting");
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        });
        Ok(ListenHandle { task })
    }

    async fn listen_once(&self, channel: &str, wake: &Notify) -> Result<(), DbError> {
        use tokio_postgres::AsyncMessage;
        let (client, mut connection) = self.config.connect(self.tls.clone()).await?;
        let (sink, mut messages) = tokio::sync::mpsc::unbounded_channel();
        // The connection must be polled for notifications to arrive.
        let driver = tokio::spawn(async move {
            while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                if sink.send(message).is_err() {
                    return;
                }
            }
        });
        client.batch_execute(&format!("LISTEN {channel}")).await?;
        wake.notify_one();
        while let Some(message) = messages.recv().await {
            match message {
                Ok(AsyncMessage::Notification(_)) => wake.notify_one(),
                Ok(_) => {}
                Err(err) => {
                    driver.abort();
                    return Err(err.into());
                }
            }
        }
        driver.abort();
        Err(DbError::Down("LISTEN connection closed".into()))
    }
}

/// Stops the LISTEN task when dropped.
pub struct ListenHandle {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ListenHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn apply_migrations(
    client: &mut deadpool_postgres::Object,
    schema: &str,
    migrations: &[&str],
) -> Result<(), DbError> {
    client
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {schema};
             CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
                 version    INTEGER PRIMARY KEY,
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
             );"
        ))
        .await?;
    let row = client
        .query_one(
            &format!("SELECT COALESCE(MAX(version), 0) FROM {schema}.schema_migrations"),
            &[],
        )
        .await?;
    let current = row.get::<_, i32>(0).max(0) as usize;
    if current > migrations.len() {
        return Err(DbError::Config(format!(
            "schema {schema} is at version {current}, newer than this binary knows ({}); \
             run a newer minimesh",
            migrations.len()
        )));
    }
    for (index, sql) in migrations.iter().enumerate().skip(current) {
        let version = index + 1;
        let tx = client.transaction().await?;
        tx.batch_execute(sql)
            .await
            .map_err(|source| DbError::PgMigration { version, source })?;
        tx.execute(
            &format!("INSERT INTO {schema}.schema_migrations (version) VALUES ($1)"),
            &[&(version as i32)],
        )
        .await?;
        tx.commit().await?;
    }
    Ok(())
}

/// Schema and channel names go into SQL text, so only plain identifiers.
fn check_identifier(name: &str) -> Result<(), DbError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(DbError::Config(format!(
            "{name:?} is not a valid schema name (lower-case letters, digits and _, at most 63)"
        )))
    }
}

/// True when the error is a violated unique constraint.
pub fn is_unique_violation(err: &tokio_postgres::Error) -> bool {
    err.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

/// True when the server is unreachable, restarting or refusing connections,
/// as opposed to an error in the statement itself.
pub fn is_down(err: &tokio_postgres::Error) -> bool {
    if err.is_closed() {
        return true;
    }
    match err.code() {
        Some(code) => {
            let code = code.code();
            // 08: connection exception; 57P0x: shutdown, crash, cannot connect
            // now; 53300: too many connections; 25006: read-only (a standby).
            code.starts_with("08") || code.starts_with("57P") || code == "53300" || code == "25006"
        }
        // No SQLSTATE: the error came from the socket, TLS or a timeout.
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_identifiers_are_accepted() {
        assert!(check_identifier("minimesh_user").is_ok());
        for bad in ["", "User", "a-b", "1abc", "x;drop table y", &"a".repeat(64)] {
            assert!(check_identifier(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn urls_are_recognised_by_scheme() {
        assert!(is_postgres_url("postgres://u@h/db"));
        assert!(is_postgres_url("postgresql://h/db?sslmode=require"));
        assert!(!is_postgres_url("/data/user.db"));
        assert!(!is_postgres_url("user.db"));
    }
}
