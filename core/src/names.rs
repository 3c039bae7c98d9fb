//! Every NATS name Hotpath uses, in one place.
//!
//! Operators replay and inspect with the `nats` CLI, so these names are part of the public
//! contract: change them only with a migration plan. The stream and consumer definitions
//! themselves live as JSON in `nats/` (see [`crate::streams`]).

use sha2::{Digest, Sha256};

use crate::domain::{DlqSource, Platform, ReceiptState};

/// The backlog: accepted messages not yet persisted, one subject per partition. A work queue:
/// a message leaves it when its delivery consumer acknowledges it, after it is in Postgres.
pub const MESSAGES_STREAM: &str = "MESSAGES";
/// The replay window: persisted messages, copied here by the delivery consumers, bounded by
/// age and bytes (oldest dropped first). What `hotpath replay` and operators replay from.
pub const REPLAY_STREAM: &str = "REPLAY";
/// Stream holding what could never be processed, with the reason in headers.
pub const DLQ_STREAM: &str = "DLQ";
/// Stream holding delivered/read receipts from clients, one subject per partition.
pub const RECEIPTS_STREAM: &str = "RECEIPTS";
/// The one durable pull consumer that records receipts (all partitions, shared by replicas).
pub const RECEIPTS_CONSUMER: &str = "receipts";
/// Work-queue stream of push tasks: one per (message, offline recipient, platform), on
/// `push.<platform>`; each task is removed once its push workers are done with it.
pub const PUSH_STREAM: &str = "PUSH";
/// NATS core subject on which fact changes (conversations, members, blocks) are announced so
/// that every gateway drops its cached copy.
pub const FACTS_INVALIDATE_SUBJECT: &str = "hotpath.facts.invalidate";
/// NATS core subject on which the consumers announce that a conversation got new messages, so
/// gateways drop their cached history pages of it. Payload: [`crate::announcements::HistoryChanged`].
pub const HISTORY_INVALIDATE_SUBJECT: &str = "hotpath.cache.history";
/// NATS core subject on which the gateways announce that a user registered a device, so the
/// delivery consumers drop what they cached about that user's devices. Payload:
/// [`crate::announcements::DevicesChanged`].
pub const DEVICES_CHANGED_SUBJECT: &str = "hotpath.devices.changed";
/// KV bucket saying which socket nodes hold a user's open WebSockets (see
/// [`crate::presence`]).
pub const PRESENCE_BUCKET: &str = "PRESENCE";
/// KV bucket of partition leases: one key per partition ([`partition_lease_key`]) whose value
/// names the consumer process that holds it, and one per consumer replica
/// ([`replica_liveness_key`]) saying it runs; the bucket's max age is the lease TTL.
pub const PARTITION_LEASES_BUCKET: &str = "PARTITION_LEASES";

/// Subject a message of `partition` is published to.
pub fn message_subject(partition: u32) -> String {
    format!("msgs.in.{partition}")
}

/// Subject of the replay window's copy of a persisted message of `partition`.
pub fn replay_subject(partition: u32) -> String {
    format!("replay.msgs.{partition}")
}

/// The partition of a replay window copy's subject (`replay.msgs.<p>` → p); `None` for any
/// other subject.
pub fn partition_of_replay_subject(subject: &str) -> Option<u32> {
    subject.strip_prefix("replay.msgs.")?.parse().ok()
}

/// Subject a receipt for a message of a conversation in `partition` is published to.
pub fn receipt_subject(partition: u32) -> String {
    format!("receipts.{partition}")
}

/// `Nats-Msg-Id` of a receipt: one per (message, user, state), so repeated acks collapse.
pub fn receipt_msg_id(message_id: &str, user_id: &str, state: ReceiptState) -> String {
    format!("{message_id}:{user_id}:{state}")
}

/// Durable pull consumer that persists `partition`.
pub fn delivery_consumer(partition: u32) -> String {
    format!("delivery-{partition}")
}

/// The key of `partition`'s lease in [`PARTITION_LEASES_BUCKET`].
pub fn partition_lease_key(partition: u32) -> String {
    format!("partition-{partition}")
}

/// The liveness key of consumer replica `replica` of `replicas` in [`PARTITION_LEASES_BUCKET`]:
/// present while some process runs as that replica, so the other replicas leave its share to
/// it (`replica-1-of-2`).
pub fn replica_liveness_key(replica: u32, replicas: u32) -> String {
    format!("replica-{replica}-of-{replicas}")
}

/// Subject of push tasks for devices of `platform` (`push.apns`, `push.fcm`).
pub fn push_subject(platform: Platform) -> String {
    format!("push.{platform}")
}

/// Durable pull consumer of the push workers for `platform`: one per platform, so a provider
/// that is down holds back only its own tasks.
pub fn push_consumer(platform: Platform) -> String {
    format!("push-{platform}")
}

/// `Nats-Msg-Id` of a push task: one per (message, recipient, platform), so a delivery batch
/// processed twice schedules each push once.
pub fn push_task_msg_id(message_id: &str, user_id: &str, platform: Platform) -> String {
    format!("push:{message_id}:{}:{platform}", user_token(user_id))
}

/// DLQ subject for what failed in `source` (`dlq.messages`, …).
pub fn dlq_subject(source: DlqSource) -> String {
    format!("dlq.{source}")
}

/// Separates the frames of one payload on `deliver.user.<id>`: fanout sends a user a batch's
/// frames together. Frames are compact JSON, which never contains a raw newline (one inside a
/// string is written `\n`).
pub const FRAME_SEPARATOR: u8 = b'\n';

/// NATS core subject carrying what a connected user should see (`message.new`,
/// `message.state.changed`): every socket node with one of the user's WebSockets subscribes to
/// it, and the delivery consumers publish to it.
pub fn deliver_subject(user_id: &str) -> String {
    format!("deliver.user.{}", user_token(user_id))
}

/// The user's key in [`PRESENCE_BUCKET`].
pub fn presence_key(user_id: &str) -> String {
    user_token(user_id)
}

/// A user id as a single token that is valid both in a NATS subject and as a KV key.
///
/// User ids may hold `.`, `@` and `:` (see `auth::is_valid_user_id`); a `.` would split a
/// subject into several tokens, and KV keys allow only `[-/_=.a-zA-Z0-9]`. So every byte
/// outside `[A-Za-z0-9_-]` becomes `=` and two uppercase hex digits (`=` itself included),
/// which keeps the common ids readable (`alice` stays `alice`) and the mapping one-to-one.
pub fn user_token(user_id: &str) -> String {
    let mut token = String::with_capacity(user_id.len());
    for byte in user_id.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-' {
            token.push(char::from(byte));
        } else {
            token.push_str(&format!("={byte:02X}"));
        }
    }
    token
}

/// The partition a conversation belongs to: the first eight bytes of SHA-256 over its id,
/// modulo the partition count. Stable across processes, versions and languages, so every
/// gateway routes a conversation to the same subject and one consumer sees its whole order.
pub fn partition_of(conversation_id: &str, partitions: u32) -> u32 {
    let digest = Sha256::digest(conversation_id.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) % u64::from(partitions.max(1))) as u32
}

/// Where an operator's replay consumer on `REPLAY` delivers (`nats consumer add REPLAY …
/// --target hotpath.replay.intake`): every consumer process listens and restores what arrives
/// into Postgres with its seq (ADR 0012).
pub const REPLAY_INTAKE_SUBJECT: &str = "hotpath.replay.intake";

/// The queue group the consumer processes listen on [`REPLAY_INTAKE_SUBJECT`] in, so each
/// entry is restored by one of them; the replay consumer's `--deliver-group`.
pub const REPLAY_INTAKE_GROUP: &str = "hotpath-replay-intake";

/// Header names the delivery consumer sets on a replay window copy: where the message sits
/// in Postgres, so a replay restores a lost row exactly as it was (`hotpath replay`, the
/// replay intake). The partition is the copy's subject ([`replay_subject`]).
pub mod replay_headers {
    /// The message's per-conversation seq.
    pub const SEQ: &str = "Hotpath-Seq";
    /// The `MESSAGES` sequence it was persisted from (the row's `stream_seq`).
    pub const STREAM_SEQ: &str = "Hotpath-Stream-Seq";
}

/// Header names Hotpath sets on DLQ entries.
pub mod dlq_headers {
    pub const REASON: &str = "Hotpath-Dlq-Reason";
    pub const SOURCE_STREAM: &str = "Hotpath-Dlq-Source-Stream";
    pub const SOURCE_SUBJECT: &str = "Hotpath-Dlq-Source-Subject";
    pub const SOURCE_SEQUENCE: &str = "Hotpath-Dlq-Source-Sequence";
    pub const DELIVERIES: &str = "Hotpath-Dlq-Deliveries";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_come_from_replay_window_subjects() {
        assert_eq!(partition_of_replay_subject("replay.msgs.12"), Some(12));
        assert_eq!(partition_of_replay_subject(&replay_subject(3)), Some(3));
        assert_eq!(partition_of_replay_subject("msgs.in.3"), None);
        assert_eq!(partition_of_replay_subject("replay.msgs.x"), None);
    }

    #[test]
    fn partition_is_stable_and_in_range() {
        let p = partition_of("3f1c2a8e-0000-4000-8000-000000000001", 16);
        assert!(p < 16);
        assert_eq!(p, partition_of("3f1c2a8e-0000-4000-8000-000000000001", 16));
        assert_eq!(partition_of("anything", 1), 0);
    }

    #[test]
    fn user_tokens_are_single_subject_tokens_and_valid_kv_keys() {
        assert_eq!(user_token("alice"), "alice");
        assert_eq!(user_token("user_1-x"), "user_1-x");
        assert_eq!(user_token("a.b@c:d"), "a=2Eb=40c=3Ad");
        // `=` is escaped too, so two different ids never share a token.
        assert_ne!(user_token("a=2E"), user_token("a."));
        assert_eq!(deliver_subject("bob.smith"), "deliver.user.bob=2Esmith");
        let kv_key = |k: &str| {
            k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-/_=.".contains(&b))
        };
        assert!(kv_key(&presence_key("x.y@z:1")));
        assert!(!presence_key("x.y").contains('.'));
    }

    #[test]
    fn partitions_spread_conversations() {
        let used: std::collections::HashSet<u32> = (0..200)
            .map(|i| partition_of(&format!("conversation-{i}"), 16))
            .collect();
        assert_eq!(used.len(), 16);
    }
}
