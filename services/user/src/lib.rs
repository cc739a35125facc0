//! The user service: accounts that place orders.

#![forbid(unsafe_code)]

mod store;

pub use store::{AnyUserStore, PgUserStore, SqliteUserStore, StoreError, UserRecord, UserStore};

use minimesh_proto::user::v1::user_service_server::{UserService, UserServiceServer};
use minimesh_proto::user::v1::{
    CreateUserRequest, GetUserRequest, ListUsersRequest, ListUsersResponse, User,
};
use minimesh_runtime::metrics::ServiceMetrics;
use minimesh_runtime::store::DbTarget;
use minimesh_runtime::{grpc, page};
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

/// Configuration of one user service process.
#[derive(Debug, Clone, clap::Args)]
pub struct UserConfig {
    /// Address of the gRPC (h2c) listener.
    #[arg(long, env = "MINIMESH_LISTEN", default_value = "127.0.0.1:0")]
    pub listen: String,
    /// SQLite database file (created with its schema when missing), or a
    /// `postgres://` URL.
    #[arg(long, env = "MINIMESH_DB", default_value = "user.db")]
    pub db: DbTarget,
    /// PostgreSQL schema holding this service's tables.
    #[arg(long, env = "MINIMESH_DB_SCHEMA", default_value = "minimesh_user")]
    pub db_schema: String,
    /// Prometheus `/metrics` listener (business counters); none when unset.
    #[arg(long, env = "MINIMESH_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
}

const MAX_EMAIL_LEN: usize = 254;
const MAX_NAME_CHARS: usize = 200;

/// `shop.user.v1.UserService` over a store: validation, paging, error mapping.
pub struct UserApi<S> {
    store: S,
    metrics: Arc<ServiceMetrics>,
}

impl<S: UserStore> UserApi<S> {
    /// The API over `store`, counting outcomes in `metrics`.
    pub fn new(store: S, metrics: Arc<ServiceMetrics>) -> Self {
        Self { store, metrics }
    }
}

/// Validates and normalises an email address (lower-cased).
///
/// Deliberately simple: one '@', a non-empty local part, a dotted domain, no
/// whitespace. Deliverability is the mail system's business.
pub fn normalise_email(raw: &str) -> Result<String, Status> {
    let email = raw.trim().to_lowercase();
    let bad = |why: &str| Status::invalid_argument(format!("email {raw:?} is malformed: {why}"));
    if email.is_empty() {
        return Err(Status::invalid_argument("email is required"));
    }
    if email.len() > MAX_EMAIL_LEN {
        return Err(bad("longer than 254 characters"));
    }
    if email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("contains whitespace"));
    }
    let (local, domain) = email.split_once('@').ok_or_else(|| bad("missing '@'"))?;
    if local.is_empty() {
        return Err(bad("nothing before '@'"));
    }
    if domain.contains('@') {
        return Err(bad("more than one '@'"));
    }
    let labels: Vec<&str> = domain.split('.').collect();
    if labels.len() < 2 || labels.iter().any(|l| l.is_empty()) {
        return Err(bad("domain must be like example.com"));
    }
    Ok(email)
}

fn to_proto(record: UserRecord) -> User {
    User {
        id: record.id,
        email: record.email,
        display_name: record.display_name,
        created_at: Some(minimesh_proto::timestamp_from_unix_millis(
            record.created_at_ms,
        )),
    }
}

fn store_status(err: StoreError) -> Status {
    match err {
        StoreError::EmailTaken(email) => {
            Status::already_exists(format!("a user with email {email} already exists"))
        }
        StoreError::Db(err) => grpc::store_status("user", &err),
    }
}

#[tonic::async_trait]
impl<S: UserStore> UserService for UserApi<S> {
    async fn create_user(
        &self,
        request: Request<CreateUserRequest>,
    ) -> Result<Response<User>, Status> {
        let req = request.into_inner();
        let email = normalise_email(&req.email)?;
        let name = req.display_name.trim();
        if name.is_empty() {
            return Err(Status::invalid_argument("display_name must not be empty"));
        }
        if name.chars().count() > MAX_NAME_CHARS {
            return Err(Status::invalid_argument(format!(
                "display_name is longer than {MAX_NAME_CHARS} characters"
            )));
        }
        let record = self
            .store
            .create(email, name.to_owned())
            .await
            .map_err(store_status)?;
        self.metrics.count("created");
        tracing::info!(user_id = %record.id, "user created");
        Ok(Response::new(to_proto(record)))
    }

    async fn get_user(&self, request: Request<GetUserRequest>) -> Result<Response<User>, Status> {
        let id = request.into_inner().id;
        if id.is_empty() {
            return Err(Status::invalid_argument("id is required"));
        }
        match self.store.get(id.clone()).await.map_err(store_status)? {
            Some(record) => Ok(Response::new(to_proto(record))),
            None => Err(Status::not_found(format!("user {id} not found"))),
        }
    }

    async fn list_users(
        &self,
        request: Request<ListUsersRequest>,
    ) -> Result<Response<ListUsersResponse>, Status> {
        let req = request.into_inner();
        let size = page::page_size(req.page_size)?;
        let after = page::decode_token(&req.page_token)?;
        // One extra row tells whether another page exists.
        let mut rows = self
            .store
            .list(after, size + 1)
            .await
            .map_err(store_status)?;
        let next_page_token = if rows.len() > size as usize {
            rows.truncate(size as usize);
            rows.last()
                .map(|r| page::encode_token(&r.id))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(ListUsersResponse {
            users: rows.into_iter().map(to_proto).collect(),
            next_page_token,
        }))
    }
}

/// The tonic service with the project's message size limits.
pub fn service<S: UserStore>(
    store: S,
    metrics: Arc<ServiceMetrics>,
) -> UserServiceServer<UserApi<S>> {
    UserServiceServer::new(UserApi::new(store, metrics))
        .max_decoding_message_size(grpc::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(grpc::MAX_MESSAGE_BYTES)
}

/// Why the user service stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum UserServiceError {
    /// The database could not be opened or migrated.
    #[error("opening database {target}: {source}")]
    Db {
        /// The `--db` given.
        target: DbTarget,
        /// What opening failed with.
        source: minimesh_runtime::db::DbError,
    },
    /// The gRPC server failed.
    #[error(transparent)]
    Serve(#[from] grpc::ServeError),
    /// The metrics listener could not be bound.
    #[error(transparent)]
    Metrics(#[from] minimesh_runtime::metrics::AdminError),
}

/// Runs the user service on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    config: UserConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), UserServiceError> {
    let store = AnyUserStore::open(&config.db, &config.db_schema)
        .await
        .map_err(|source| UserServiceError::Db {
            target: config.db.clone(),
            source,
        })?;
    let backend = store.backend();
    let metrics = ServiceMetrics::new("minimesh_users", "Users created.");
    let _metrics =
        minimesh_runtime::metrics::listen(config.metrics_listen.as_deref(), metrics.clone())
            .await?;
    grpc::serve(listener, service(store, metrics), backend, shutdown).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_checked_and_lowercased() {
        assert_eq!(
            normalise_email(" Ada@Example.COM ").unwrap(),
            "ada@example.com"
        );
        for bad in [
            "",
            "ada",
            "@example.com",
            "ada@",
            "ada@example",
            "a b@example.com",
            "a@b@c.com",
            "ada@.com",
        ] {
            let err = normalise_email(bad).unwrap_err();
            assert_eq!(
                err.code(),
                tonic::Code::InvalidArgument,
                "{bad:?} should be rejected"
            );
        }
    }
}
