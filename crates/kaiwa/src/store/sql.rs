//! What the two sqlx-based stores share: how sqlx's errors read as [`StoreError`]s, so that
//! the trait stays free of any database library's types.

use super::StoreError;
use sqlx::migrate::MigrateError;

/// A sqlx error as a store error: the ones that mean the database cannot be reached now are
/// [`StoreError::Unavailable`], so callers can tell a client to retry.
pub(super) fn error(err: &sqlx::Error) -> StoreError {
    if is_outage(err) {
        StoreError::Unavailable(err.to_string())
    } else {
        StoreError::Database(err.to_string())
    }
}

/// Whether a sqlx error means the database cannot be reached now (refused, lost, restarting),
/// rather than that it took the request and failed it.
pub(crate) fn is_outage(err: &sqlx::Error) -> bool {
    match err {
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
