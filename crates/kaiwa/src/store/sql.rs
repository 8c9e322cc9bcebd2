//! What the two sqlx-based stores share: how sqlx's errors read as [`StoreError`]s, so that
//! the trait stays free of any database library's types.

use super::StoreError;
use sqlx::migrate::MigrateError;

/// A sqlx error as a store error: the ones that mean the database cannot be reached now are
/// [`StoreError::Unavailable`], so callers can tell a client to retry.
pub(super) fn error(err: &sqlx::Error) -> StoreError {
    let unreachable = match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::BeginFailed => true,
        // SQLSTATE class 08 is "connection exception"; 57P01–57P03 are the server shutting
        // down or starting (what `pg_terminate_backend` and a restart look like).
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("08") || code.starts_with("57P")),
        _ => false,
    };
    if unreachable {
        StoreError::Unavailable(err.to_string())
    } else {
        StoreError::Database(err.to_string())
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        error(&err)
    }
}

pub(super) fn migrate_error(err: MigrateError) -> StoreError {
    match err {
        MigrateError::VersionMissing(version) => StoreError::SchemaTooNew(version),
        MigrateError::Execute(err) => error(&err),
        other => StoreError::Migrate(other.to_string()),
    }
}
