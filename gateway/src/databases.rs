//! The gateway's Postgres pools, and why there are three.
//!
//! A send needs Postgres only on a facts cache miss (a conversation or a user's blocks not yet
//! in memory), but then it must get a connection at once. The reads that clients can make
//! expensive or slow (status lookups, history pages, `sync`, receipt checks) could otherwise
//! take every connection of a shared pool, for as long as a lock or a slow plan holds them,
//! and the sends behind them would fail. So each use has its own pool:
//!
//! | pool | used by | size |
//! | --- | --- | --- |
//! | `facts` | facts cache misses (sends, membership checks) | `HOTPATH_DB_FACTS_CONNECTIONS` |
//! | `queries` | status, history, `sync`, receipt checks | `HOTPATH_DB_QUERY_CONNECTIONS` |
//! | `writes` | conversations, members, blocks, devices, readiness, duplicate sends | `HOTPATH_DB_MAX_CONNECTIONS` |
//!
//! Every connection carries Postgres's `statement_timeout` (`HOTPATH_DB_STATEMENT_TIMEOUT_MS`),
//! so a statement stuck behind a lock is cancelled by Postgres, and every pool gives up
//! waiting for a free connection after `HOTPATH_DB_ACQUIRE_TIMEOUT_MS`: either way the client
//! gets 503 `SERVICE_UNAVAILABLE` with Retry-After, never a hung request.

use hotpath_core::config::Config;
use hotpath_core::db::{self, PoolLimits};
use sqlx::PgPool;

#[derive(Clone)]
pub struct Databases {
    pub writes: PgPool,
    pub queries: PgPool,
    pub facts: PgPool,
}

impl Databases {
    pub async fn connect(config: &Config) -> anyhow::Result<Databases> {
        let limits = |max_connections| PoolLimits {
            max_connections,
            acquire_timeout: config.db_acquire_timeout(),
            statement_timeout: Some(config.db_statement_timeout()),
        };
        let url = &config.database_url;
        Ok(Databases {
            writes: db::connect_with(url, limits(config.db_max_connections)).await?,
            queries: db::connect_with(url, limits(config.db_query_connections)).await?,
            facts: db::connect_with(url, limits(config.db_facts_connections)).await?,
        })
    }
}
