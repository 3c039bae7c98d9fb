//! Idempotency keys, request digests, and the message ids derived from them.
//!
//! The key is what makes a retry harmless: JetStream drops a second publish with the same
//! `Nats-Msg-Id` inside its duplicate window, and Postgres's unique index on the key drops it
//! forever after. But a key only names a message; it does not say what the message was. The
//! request digest does: it covers everything that makes two sends "the same message", so a
//! reuse of the key for a different request can be told apart from a retry and refused
//! instead of silently dropped (ADR 0005).
//!
//! The message id is a pure function of (key, digest): a client that retries gets the very
//! same `messageId` back, while a different request under a reused key gets an id of its own,
//! which the status route and the `rejected` event can name.

use serde_json::{Map, Value};
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

/// What a send asks for, as far as "is it the same message?" goes: everything the stored
/// message is made of, as the client gave it, and nothing the gateway derives (the sender and
/// conversation are in the key already; the recipients resolved from the conversation's
/// members may change between a send and its retry, so they are not part of it).
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub content: &'a str,
    pub content_type: &'a str,
    /// An absent `metadata` is `{}`: both store the same message.
    pub metadata: &'a Map<String, Value>,
    /// `recipientIds` as the client sent them: absent (every other member) is not any list.
    pub recipient_ids: Option<&'a [String]>,
    /// An absent `priority` is `normal`: both store the same message.
    pub priority: &'a str,
}

/// The request digest: hex of SHA-256 over the request's parts, each in a canonical text so
/// that equal requests give equal digests however they were written: metadata as JSON with
/// every object's keys sorted (at any depth), recipients as a sorted JSON array (their order
/// means nothing; the schema policy refuses repeats) or `null` when absent.
pub fn request_digest(request: &Request<'_>) -> String {
    let mut metadata = String::new();
    canonical_json(&Value::Object(request.metadata.clone()), &mut metadata);
    let recipients = match request.recipient_ids {
        Some(ids) => {
            let mut sorted: Vec<&String> = ids.iter().collect();
            sorted.sort();
            Value::from(sorted.into_iter().cloned().collect::<Vec<_>>()).to_string()
        }
        None => "null".to_string(),
    };
    digest_hex(&[
        "request",
        request.content,
        request.content_type,
        &metadata,
        &recipients,
        request.priority,
    ])
}

/// Whether a send with digest `incoming` is a different message than the one its key already
/// names (digest `original`). A digest missing on either side (an envelope or a row written
/// before digests existed) never conflicts: there is nothing to compare, and treating it as
/// the retry it almost always is keeps what such keys always did.
pub fn conflicts(original: Option<&str>, incoming: Option<&str>) -> bool {
    matches!((original, incoming), (Some(a), Some(b)) if a != b)
}

/// The message id of (key, request digest): a version-8 UUID built from SHA-256 over both.
pub fn message_id(idempotency_key: &str, request_digest: &str) -> Uuid {
    let digest = digest(&[idempotency_key, request_digest]);
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    Uuid::new_v8(bytes)
}

/// Hex of SHA-256 over the parts (see [`digest`]). 128 bits of the digest are kept: far beyond
/// any collision risk for message keys.
fn digest_hex(parts: &[&str]) -> String {
    hex::encode(&digest(parts)[..16])
}

/// SHA-256 over the parts, each length-prefixed so that ("ab","c") and ("a","bc") differ.
fn digest(parts: &[&str]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    hasher.finalize().into()
}

/// `value` as JSON text with every object's keys in sorted order, whatever order the map
/// keeps (serde_json's `Map` is sorted unless its `preserve_order` feature is on, which any
/// crate in the build could turn on). Strings and numbers are written as serde_json writes
/// them, so the text is one-to-one with the value.
fn canonical_json(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (n, (key, value)) in entries.into_iter().enumerate() {
                if n > 0 {
                    out.push(',');
                }
                out.push_str(&Value::from(key.as_str()).to_string());
                out.push(':');
                canonical_json(value, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (n, item) in items.iter().enumerate() {
                if n > 0 {
                    out.push(',');
                }
                canonical_json(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
    fn message_id_is_a_pure_function_of_key_and_digest() {
        let id = message_id("client_abc", "d1");
        assert_eq!(id, message_id("client_abc", "d1"));
        assert_ne!(id, message_id("client_abd", "d1"));
        assert_ne!(id, message_id("client_abc", "d2"));
        assert_eq!(id.get_version_num(), 8);
    }

    fn metadata(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            other => panic!("metadata must be an object, not {other}"),
        }
    }

    fn digest_of(
        content: &str,
        metadata: &Map<String, Value>,
        recipients: Option<&[String]>,
    ) -> String {
        request_digest(&Request {
            content,
            content_type: "text",
            metadata,
            recipient_ids: recipients,
            priority: "normal",
        })
    }

    #[test]
    fn the_digest_does_not_depend_on_how_metadata_was_written() {
        let written: Map<String, Value> =
            serde_json::from_str(r#"{"b": 1, "a": {"y": [1, {"q": 2, "p": 1}], "x": "s"}}"#)
                .unwrap();
        let reordered: Map<String, Value> =
            serde_json::from_str(r#"{"a": {"x": "s", "y": [1, {"p": 1, "q": 2}]}, "b": 1}"#)
                .unwrap();
        assert_eq!(
            digest_of("hi", &written, None),
            digest_of("hi", &reordered, None)
        );
        let mut out = String::new();
        canonical_json(&Value::Object(written), &mut out);
        assert_eq!(out, r#"{"a":{"x":"s","y":[1,{"p":1,"q":2}]},"b":1}"#);
        // But a different value, or an array in another order, is another message.
        assert_ne!(
            digest_of("hi", &metadata(json!({"b": 2})), None),
            digest_of("hi", &metadata(json!({"b": 1})), None)
        );
        assert_ne!(
            digest_of("hi", &metadata(json!({"l": [1, 2]})), None),
            digest_of("hi", &metadata(json!({"l": [2, 1]})), None)
        );
    }

    #[test]
    fn absent_recipients_are_not_an_empty_list_and_order_does_not_matter() {
        let none = Map::new();
        let empty: Vec<String> = vec![];
        let bob_carol = vec!["bob".to_string(), "carol".to_string()];
        let carol_bob = vec!["carol".to_string(), "bob".to_string()];
        let bob = vec!["bob".to_string()];
        assert_ne!(
            digest_of("hi", &none, None),
            digest_of("hi", &none, Some(&empty))
        );
        assert_eq!(
            digest_of("hi", &none, Some(&bob_carol)),
            digest_of("hi", &none, Some(&carol_bob))
        );
        assert_ne!(
            digest_of("hi", &none, Some(&bob_carol)),
            digest_of("hi", &none, Some(&bob))
        );
    }

    #[test]
    fn every_part_of_the_request_counts() {
        let none = Map::new();
        let base = Request {
            content: "hi",
            content_type: "text",
            metadata: &none,
            recipient_ids: None,
            priority: "normal",
        };
        let digest = request_digest(&base);
        let changed = [
            Request {
                content: "hi!",
                ..base
            },
            Request {
                content_type: "image",
                ..base
            },
            Request {
                priority: "high",
                ..base
            },
        ];
        for request in changed {
            assert_ne!(request_digest(&request), digest, "{request:?}");
        }
        // Parts cannot run into each other.
        assert_ne!(
            request_digest(&Request {
                content: "ab",
                content_type: "c",
                ..base
            }),
            request_digest(&Request {
                content: "a",
                content_type: "bc",
                ..base
            })
        );
    }

    #[test]
    fn only_two_known_and_different_digests_conflict() {
        assert!(conflicts(Some("a"), Some("b")));
        assert!(!conflicts(Some("a"), Some("a")));
        assert!(!conflicts(None, Some("b")));
        assert!(!conflicts(Some("a"), None));
        assert!(!conflicts(None, None));
    }
}
