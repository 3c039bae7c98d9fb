//! Postgres: pools and the migrations (the only way the schema changes).

use std::time::Duration;

use std::str::FromStr as _;

use anyhow::Context as _;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::config::redact_url_password;

/// How a pool behaves when Postgres is slow or busy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PoolLimits {
    pub max_connections: u32,
    /// How long a caller waits for a free connection before `PoolTimedOut`. Short, so a
    /// request never hangs on a dead or saturated database: the caller answers 503.
    pub acquire_timeout: Duration,
    /// Postgres's `statement_timeout` on every connection of the pool: a statement that runs
    /// (or waits for a lock) longer is cancelled by Postgres itself (SQLSTATE 57014). `None`
    /// for work that must not be cut short, like persisting a batch.
    pub statement_timeout: Option<Duration>,
}

impl PoolLimits {
    /// `max_connections` with the default acquire timeout and no statement timeout.
    pub fn new(max_connections: u32) -> PoolLimits {
        PoolLimits {
            max_connections,
            acquire_timeout: Duration::from_secs(2),
            statement_timeout: None,
        }
    }
}

/// Opens a pool of at most `max_connections`, with the default [`PoolLimits`].
pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    connect_with(url, PoolLimits::new(max_connections)).await
}

/// Opens a pool with `limits`.
pub async fn connect_with(url: &str, limits: PoolLimits) -> anyhow::Result<PgPool> {
    let redacted = || redact_url_password(url);
    let mut options = PgConnectOptions::from_str(url)
        .with_context(|| format!("reading the Postgres URL {}", redacted()))?;
    if let Some(timeout) = limits.statement_timeout {
        options = options.options([("statement_timeout", timeout.as_millis())]);
    }
    PgPoolOptions::new()
        .max_connections(limits.max_connections.max(1))
        .acquire_timeout(limits.acquire_timeout)
        .connect_with(options)
        .await
        .with_context(|| format!("connecting to Postgres at {}", redacted()))
}

/// The migrations in `migrations/`, embedded.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Applies the migrations in `migrations/`. Safe to run from several processes at once:
/// sqlx serialises them with an advisory lock.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await.context("running migrations")?;
    Ok(())
}

/// Checks that every migration this build knows has been applied, without applying any: what a
/// role does when `hotpath migrate` is the one that changes the schema. A schema ahead of this
/// build (a newer Hotpath migrated it) is fine: migrations only add.
pub async fn check_migrated(pool: &PgPool) -> anyhow::Result<()> {
    let latest = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
    let applied: Option<i64> =
        sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
            .fetch_one(pool)
            .await
            .map_err(|_| {
                anyhow::anyhow!("the database has no Hotpath schema: run `hotpath migrate` first")
            })?;
    let applied = applied.unwrap_or(0);
    anyhow::ensure!(
        applied >= latest,
        "the database schema is at migration {applied} but this Hotpath needs {latest}: run \
         `hotpath migrate` first"
    );
    Ok(())
}

/// True when Postgres cancelled a statement (SQLSTATE 57014): it ran past its
/// `statement_timeout`, or an operator cancelled it.
pub fn is_query_cancelled(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.code().as_deref() == Some("57014"))
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
