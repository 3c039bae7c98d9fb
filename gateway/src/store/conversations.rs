//! The `conversations` and `conversation_members` tables, together: a conversation is read
//! with its members, and a membership change locks its conversation.
//!
//! Leaving marks a member's row inactive (`is_active`, `left_at`) rather than deleting it, and
//! joining again reactivates the same row.

use chrono::{DateTime, Utc};
use hotpath_core::domain::ConversationKind;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// A conversation with its active members, as the facts cache keeps it.
#[derive(Debug, sqlx::FromRow)]
pub struct ConversationRow {
    pub kind: ConversationKind,
    pub is_active: bool,
    pub active_members: Vec<String>,
}

/// The conversation `id` with its active members, if it exists.
pub async fn with_members(pool: &PgPool, id: Uuid) -> Result<Option<ConversationRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT c.type AS kind, c.is_active,
                COALESCE(array_agg(m.user_id) FILTER (WHERE m.is_active), '{}') AS active_members
           FROM conversations c
           LEFT JOIN conversation_members m ON m.conversation_id = c.id
          WHERE c.id = $1
          GROUP BY c.id",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// A conversation as its member's list shows it: with its active members and the highest seq
/// handed out, from which a client reads the newest page of history.
#[derive(Debug, serde::Serialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct MemberConversation {
    pub conversation_id: Uuid,
    #[serde(rename = "type")]
    pub kind: ConversationKind,
    pub is_active: bool,
    pub members: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub last_seq: i64,
}

/// Up to `limit` conversations of which `user_id` is an active member, newest first.
pub async fn of_member(
    pool: &PgPool,
    user_id: &str,
    limit: i64,
) -> Result<Vec<MemberConversation>, sqlx::Error> {
    sqlx::query_as(
        "SELECT c.id AS conversation_id, c.type AS kind, c.is_active, c.created_at, c.last_seq,
                COALESCE(array_agg(m.user_id ORDER BY m.user_id) FILTER (WHERE m.is_active), '{}')
                    AS members
           FROM conversation_members mine
           JOIN conversations c ON c.id = mine.conversation_id
           LEFT JOIN conversation_members m ON m.conversation_id = c.id
          WHERE mine.user_id = $1 AND mine.is_active
          GROUP BY c.id
          ORDER BY c.created_at DESC, c.id
          LIMIT $2",
    )
    .bind(user_id)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Creates the conversation (active, without members) and returns when it was created.
pub async fn insert(
    conn: &mut PgConnection,
    id: Uuid,
    kind: ConversationKind,
    created_by: &str,
    push_preview: bool,
) -> Result<DateTime<Utc>, sqlx::Error> {
    let (created_at,): (DateTime<Utc>,) = sqlx::query_as(
        "INSERT INTO conversations (id, type, created_by, push_preview) VALUES ($1, $2, $3, $4)
         RETURNING created_at",
    )
    .bind(id)
    .bind(kind)
    .bind(created_by)
    .bind(push_preview)
    .fetch_one(conn)
    .await?;
    Ok(created_at)
}

/// Makes each of `members` an active member of the new conversation `id`.
pub async fn insert_members(
    conn: &mut PgConnection,
    id: Uuid,
    members: &[String],
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO conversation_members (conversation_id, user_id) SELECT $1, unnest($2::text[])",
    )
    .bind(id)
    .bind(members)
    .execute(conn)
    .await
    .map(drop)
}

/// Locks the conversation's row until the transaction ends, so that concurrent membership
/// changes of one conversation happen one after the other.
pub async fn lock(conn: &mut PgConnection, id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT 1 FROM conversations WHERE id = $1 FOR UPDATE")
        .bind(id)
        .execute(conn)
        .await
        .map(drop)
}

/// How many active members the conversation has, and whether `user_id` is one of them.
#[derive(Debug, sqlx::FromRow)]
pub struct Membership {
    pub active_members: i64,
    pub is_member: bool,
}

/// The conversation's active members now; read after [`lock`], the count holds until the
/// transaction ends.
pub async fn membership(
    conn: &mut PgConnection,
    id: Uuid,
    user_id: &str,
) -> Result<Membership, sqlx::Error> {
    sqlx::query_as(
        "SELECT count(*) AS active_members, coalesce(bool_or(user_id = $2), false) AS is_member
           FROM conversation_members WHERE conversation_id = $1 AND is_active",
    )
    .bind(id)
    .bind(user_id)
    .fetch_one(conn)
    .await
}

/// Makes `user_id` an active member: a new one, or one who had left.
pub async fn add_member(
    conn: &mut PgConnection,
    id: Uuid,
    user_id: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO conversation_members (conversation_id, user_id) VALUES ($1, $2)
         ON CONFLICT (conversation_id, user_id) DO UPDATE SET is_active = true, left_at = NULL",
    )
    .bind(id)
    .bind(user_id)
    .execute(conn)
    .await
    .map(drop)
}

/// Marks `user_id` as having left, if it was an active member.
pub async fn remove_member(pool: &PgPool, id: Uuid, user_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE conversation_members SET is_active = false, left_at = now()
          WHERE conversation_id = $1 AND user_id = $2 AND is_active",
    )
    .bind(id)
    .bind(user_id)
    .execute(pool)
    .await
    .map(drop)
}

/// No more messages can be sent to the conversation.
pub async fn deactivate(pool: &PgPool, id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE conversations SET is_active = false WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await
        .map(drop)
}

/// Whether the conversation's pushes may show message content.
pub async fn set_push_preview(
    pool: &PgPool,
    id: Uuid,
    push_preview: bool,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE conversations SET push_preview = $2 WHERE id = $1")
        .bind(id)
        .bind(push_preview)
        .execute(pool)
        .await
        .map(drop)
}
