//! Where a service keeps its data, chosen by `--db`: a SQLite file (the
//! embedded default) or a PostgreSQL URL (several replicas, several hosts).

use crate::db::{Db, DbError};
use crate::health::StoreHealth;
use crate::pg::{Pg, is_postgres_url};
use std::path::PathBuf;
use std::time::Duration;

/// Where a service keeps its data, as given to `--db`.
#[derive(Clone, PartialEq, Eq)]
pub enum DbTarget {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A `postgres://` URL.
    Postgres(String),
}

impl std::str::FromStr for DbTarget {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        if value.is_empty() {
            return Err("a SQLite path or a postgres:// URL is required".into());
        }
        if is_postgres_url(value) {
            Ok(DbTarget::Postgres(value.to_owned()))
        } else if value.contains("://") {
            Err(format!(
                "{} is neither a SQLite path nor a postgres:// URL",
                redact(value)
            ))
        } else {
            Ok(DbTarget::Sqlite(PathBuf::from(value)))
        }
    }
}

/// Shown in logs and errors without the password.
impl std::fmt::Display for DbTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DbTarget::Sqlite(path) => write!(f, "{}", path.display()),
            DbTarget::Postgres(url) => f.write_str(&redact(url)),
        }
    }
}

impl std::fmt::Debug for DbTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DbTarget({self})")
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}{tail}")
            } else {
                format!("{scheme}://{user}@{host}{tail}")
            }
        }
        None => url.to_owned(),
    }
}

/// The open store behind a service, for health probing.
#[derive(Clone)]
pub enum Backend {
    /// An open SQLite database.
    Sqlite(Db),
    /// A PostgreSQL pool.
    Postgres(Pg),
}

impl Backend {
    /// The store's health, which requests report failures to.
    pub fn health(&self) -> &StoreHealth {
        match self {
            Backend::Sqlite(db) => db.health(),
            Backend::Postgres(pg) => pg.health(),
        }
    }

    /// One cheap query, to see whether the store is back.
    pub async fn probe(&self) -> Result<(), DbError> {
        match self {
            Backend::Sqlite(db) => db.probe().await,
            Backend::Postgres(pg) => pg.probe().await,
        }
    }
}

/// Connects and migrates, waiting for a server that is not up yet (a pod
/// may start before its database) but failing at once on a wrong URL,
/// password or database name, which waiting would not fix.
pub async fn connect_postgres(url: &str, schema: &str, migrations: &[&str]) -> Result<Pg, DbError> {
    let mut backoff = Duration::from_millis(200);
    loop {
        match Pg::connect(url, schema, migrations).await {
            Ok(pg) => return Ok(pg),
            Err(err) if err.is_store_down() => {
                tracing::warn!(db = %redact(url), %err, "PostgreSQL not reachable yet; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(err) => return Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_told_apart_and_passwords_hidden() {
        assert_eq!(
            "data/user.db".parse::<DbTarget>().unwrap(),
            DbTarget::Sqlite("data/user.db".into())
        );
        let pg: DbTarget = "postgres://shop:s3cret@db:5432/shop?sslmode=require"
            .parse()
            .unwrap();
        assert!(matches!(pg, DbTarget::Postgres(_)));
        let shown = pg.to_string();
        assert!(!shown.contains("s3cret"), "{shown}");
        assert_eq!(shown, "postgres://shop:***@db:5432/shop?sslmode=require");
        assert_eq!(redact("postgres://db/shop"), "postgres://db/shop");
        let err = "mysql://root:pw@db/x".parse::<DbTarget>().unwrap_err();
        assert!(!err.contains("pw@"), "{err}");
        assert!("".parse::<DbTarget>().is_err());
    }
}
