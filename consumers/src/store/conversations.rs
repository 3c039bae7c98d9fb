//! The `conversations` table, as delivery uses it: the row each batch locks, whose `last_seq`
//! the batch statement ([`super::messages::insert_batch`]) numbers new messages from.

use std::collections::HashSet;

use sqlx::PgConnection;
use uuid::Uuid;

/// Locks the conversations among `ids` that exist (`FOR UPDATE`, in id order), in `tx`, and
/// says which they are. `ids` should be sorted and without repeats.
pub(crate) async fn lock_existing(
    tx: &mut PgConnection,
    ids: &[Uuid],
) -> Result<HashSet<Uuid>, sqlx::Error> {
    let existing: Vec<(Uuid,)> =
        sqlx::query_as("SELECT id FROM conversations WHERE id = ANY($1) ORDER BY id FOR UPDATE")
            .bind(ids)
            .fetch_all(tx)
            .await?;
    Ok(existing.into_iter().map(|(id,)| id).collect())
}
