//! A publish JetStream calls a duplicate: a retry, or a key reused for a different message?
//!
//! Within its duplicate window the stream drops a second publish with the same `Nats-Msg-Id`
//! (the idempotency key) and answers `duplicate: true` with the stream sequence of the message
//! it kept. The key says only that the client named the same message again; whether it sent
//! the same message is what the request digests say (`hotpath_core::ids`). Equal (or one of
//! them unknown): a retry, answered 202 `idempotentHit: true` with the kept message's id.
//! Different: 409 `IDEMPOTENCY_KEY_REUSED` naming the kept message, because a 202 would be
//! a promise the stream has already broken (ADR 0005).
//!
//! Where the kept message is read: first the stream itself, by a direct get of that sequence
//! (cheap, served by any replica); then, if the stream no longer holds it, or holds another
//! request under that key, Postgres by key. A message leaves the stream only after it was
//! persisted (the consumers acknowledge after commit, and a work-queue stream deletes on
//! acknowledgement), so "not in the stream" means "in Postgres" unless it was dead-lettered.
//! Postgres also settles the one case the stream cannot: a key reused after the window
//! (rejected by the consumers later) and then the original retried within the new window;
//! the stream kept the reuse, Postgres holds the original the retry matches.
//!
//! This runs only for duplicates, so the hot path of a first send pays nothing for it.

use hotpath_core::envelope::Envelope;
use hotpath_core::ids::conflicts;
use hotpath_core::rejection::Rejection;
use uuid::Uuid;

use crate::http::db_error;
use crate::producer::Published;
use crate::state::AppState;
use crate::store::messages::{self, KeyedMessage};

/// The message that `envelope`, published as a duplicate, is a retry of; or the rejection
/// when its key already names a different message, or when nothing can tell (the kept message
/// cannot be read: 503, so the client retries, and a retry after the window is stored, or
/// judged by the consumers).
pub async fn retried(
    state: &AppState,
    envelope: &Envelope,
    published: &Published,
) -> Result<Uuid, Rejection> {
    let incoming = envelope.request_digest.as_deref();
    let kept = match state
        .producer
        .kept(&published.stream, published.stream_sequence)
        .await
    {
        Ok(kept) => kept.filter(|kept| kept.idempotency_key == envelope.idempotency_key),
        Err(error) => {
            tracing::warn!(
                stream = published.stream,
                stream_seq = published.stream_sequence,
                error = format!("{error:#}"),
                "cannot read the message a duplicate names; asking Postgres"
            );
            None
        }
    };
    if let Some(kept) = &kept
        && !conflicts(kept.request_digest.as_deref(), incoming)
    {
        return Ok(kept.message_id);
    }

    let stored = messages::by_idempotency_key(&state.pool, &envelope.idempotency_key)
        .await
        .map_err(db_error)?;
    match (stored, kept) {
        (Some(stored), _) if !conflicts(stored.request_digest.as_deref(), incoming) => {
            Ok(stored.id)
        }
        (
            Some(KeyedMessage {
                id: original_message_id,
                ..
            }),
            _,
        )
        | (
            None,
            Some(Envelope {
                message_id: original_message_id,
                ..
            }),
        ) => Err(Rejection::IdempotencyKeyReused {
            original_message_id,
        }),
        (None, None) => {
            tracing::warn!(
                idempotency_key = envelope.idempotency_key,
                stream_seq = published.stream_sequence,
                "a duplicate names a message that is neither in the stream nor stored"
            );
            Err(Rejection::EnqueueUnavailable {
                reason: "the message this idempotency key names cannot be read now".into(),
                retry_after_secs: 1,
            })
        }
    }
}
