//! Every SQL statement the gateway runs, by table.
//!
//! Each file holds the statements of one table, or of tables that are only ever read together
//! (a conversation and its members): plain async functions that take the pool or connection
//! to run on and return typed rows. A schema change (a renamed column, a new index to use)
//! touches the one file of its table, and the statements a change can break are in front of
//! whoever makes it; the handlers read as what they do, not how the rows are spelt.
//!
//! The functions never choose a pool: the caller passes it, so which pool a request path
//! uses stays visible where the request is handled (`databases.rs` says why there are three):
//!
//! | caller | pool |
//! | --- | --- |
//! | `facts` (conversations with members, blocks on a cache miss) | `facts` |
//! | status, history, `sync`, receipt checks | `queries` (`AppState::queries`) |
//! | conversations, members, blocks, devices, readiness, duplicate sends | `writes` (`AppState::pool`) |
//!
//! Statements that must commit together take a `&mut PgConnection`, which the caller's
//! transaction derefs to; the caller begins and commits it, so what is atomic is decided (and
//! seen) in the handler too. Errors stay `sqlx::Error`: the caller maps them, to 503 or 500 with
//! `http::db_error` on request paths, to the facts cache's own answer in `facts`.
//!
//! A row that a route answers as it is (a history message, a device, a block) derives
//! `Serialize` here, so the JSON is the row and cannot drift from it.

pub mod blocks;
pub mod conversations;
pub mod devices;
pub mod message_rejections;
pub mod messages;
pub mod receipts;

use sqlx::PgPool;

/// The cheapest statement, for readiness: Postgres answers on `pool`.
pub async fn ping(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT 1").execute(pool).await.map(drop)
}
