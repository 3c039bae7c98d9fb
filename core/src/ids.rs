//! Idempotency keys and the message ids derived from them.
//!
//! The key is what makes a retry harmless: JetStream drops a second publish with the same
//! `Nats-Msg-Id` inside its duplicate window, and Postgres's unique index on the key drops it
//! forever after. The message id is a pure function of the key, so a client that retries gets
//! the very same `messageId` back.

use sha2::{Digest, Sha256};
use uuid::Uuid;

/// The key for a message (the README's "Idempotency and order"):
///
/// * with a `clientMessageId`: SHA-256 over (sender, conversation, clientMessageId). Scoped to
///   the sender, so one user cannot suppress another's message by reusing an id, and to the
///   conversation, so a client that numbers its ids per conversation never collides with
///   itself. A clientMessageId names one message of one sender in one conversation, forever.
///   (Keys stored before the conversation was part of it, SHA-256 over (sender,
///   clientMessageId), stay valid: the unique index is on the key, whatever its recipe.)
/// * without one: SHA-256 over (conversation, sender, content, one-second window), which folds
///   an accidental double submit of the same text within the same second into one message.
pub fn idempotency_key(
    sender_id: &str,
    client_message_id: Option<&str>,
    conversation_id: &str,
    content: &str,
    unix_seconds: i64,
) -> String {
    match client_message_id {
        Some(client_id) => format!(
            "client_{}",
            digest_hex(&["client", sender_id, conversation_id, client_id])
        ),
        None => {
            let window = unix_seconds.to_string();
            format!(
                "idem_{}",
                digest_hex(&["content", conversation_id, sender_id, content, &window])
            )
        }
    }
}

/// The message id for a key: a version-8 UUID built from SHA-256 over the key.
pub fn message_id(idempotency_key: &str) -> Uuid {
    let digest = Sha256::digest(idempotency_key.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    Uuid::new_v8(bytes)
}

/// Hex of SHA-256 over the parts, each length-prefixed so that ("ab","c") and ("a","bc") differ.
/// 128 bits of the digest are kept: far beyond any collision risk for message keys.
fn digest_hex(parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    hex::encode(&hasher.finalize()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_key_ignores_content_and_time_but_not_sender_or_conversation() {
        let a = idempotency_key("alice", Some("m-1"), "c1", "hello", 100);
        let again = idempotency_key("alice", Some("m-1"), "c1", "other", 999);
        let bob = idempotency_key("bob", Some("m-1"), "c1", "hello", 100);
        let elsewhere = idempotency_key("alice", Some("m-1"), "c2", "hello", 100);
        assert_eq!(a, again);
        assert_ne!(a, bob);
        assert_ne!(a, elsewhere);
        assert!(a.starts_with("client_"));
    }

    #[test]
    fn content_key_changes_with_the_second() {
        let a = idempotency_key("alice", None, "c1", "hello", 100);
        assert_eq!(a, idempotency_key("alice", None, "c1", "hello", 100));
        assert_ne!(a, idempotency_key("alice", None, "c1", "hello", 101));
        assert!(a.starts_with("idem_"));
    }

    #[test]
    fn parts_are_not_ambiguous() {
        assert_ne!(
            idempotency_key("ab", Some("c"), "", "", 0),
            idempotency_key("a", Some("bc"), "", "", 0)
        );
    }

    #[test]
    fn message_id_is_a_pure_function_of_the_key() {
        let id = message_id("client_abc");
        assert_eq!(id, message_id("client_abc"));
        assert_ne!(id, message_id("client_abd"));
        assert_eq!(id.get_version_num(), 8);
    }
}
