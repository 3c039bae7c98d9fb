//! Postgres: the pool and the migrations (the only way the schema changes).

use std::time::Duration;

use anyhow::Context as _;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::config::redact_url_password;

/// Opens a pool. `acquire_timeout` is short so a request never hangs on a dead database: the
/// caller turns the error into a 503.
pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(2))
        .connect(url)
        .await
        .with_context(|| format!("connecting to Postgres at {}", redact_url_password(url)))
}

/// Applies the migrations in `migrations/`. Safe to run from several processes at once:
/// sqlx serialises them with an advisory lock.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::migrate!("../migrations")
        .run(pool)
        .await
        .context("running migrations")?;
    Ok(())
}

/// True when an error means "Postgres could not be reached or could not serve right now"
/// (worth retrying the same work later), false when the data itself was refused.
pub fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // 08 connection, 40 transaction rollback (deadlock, serialisation), 53 resources,
            // 57 operator intervention (shutdown), 58 system error.
            ["08", "40", "53", "57", "58"]
                .iter()
                .any(|class| code.starts_with(class))
        }
        _ => false,
    }
}
