//! Every way a request can be turned down, as one enum.
//!
//! Each variant maps 1:1 to a wire code and a telemetry label; the HTTP status, code, message,
//! details and label all come from the `match`es below and nowhere else, so handlers never
//! invent strings. The wire shape is `{"error": {"code", "message", "details"}}`.

use serde_json::{Value, json};
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    #[error("invalid request: {message}")]
    InvalidSchema { message: String, details: Value },
    #[error("missing required field: {field}")]
    MissingRequiredField { field: String },
    #[error("field {field} must be {expected}")]
    InvalidFieldType { field: String, expected: String },
    #[error("field {field} is longer than {max} characters")]
    FieldTooLong {
        field: String,
        max: usize,
        actual: usize,
    },
    #[error("invalid recipient {recipient_id}: {reason}")]
    InvalidRecipient {
        recipient_id: String,
        reason: String,
    },
    #[error("unauthorized: {reason}")]
    Unauthorized { reason: String },
    #[error("forbidden: {reason}")]
    Forbidden { reason: String },
    #[error("user {user_id} is not a member of conversation {conversation_id}")]
    NotConversationMember {
        user_id: String,
        conversation_id: String,
    },
    #[error("conversation not found: {conversation_id}")]
    ConversationNotFound { conversation_id: String },
    #[error("conversation is inactive: {conversation_id}")]
    ConversationInactive { conversation_id: String },
    #[error("a block between {user_id} and {other_user_id} prevents this message")]
    UserBlocked {
        user_id: String,
        other_user_id: String,
    },
    /// The request reuses an idempotency key (its `clientMessageId`, or without one the same
    /// text in the same second) that already names a different message: not a retry, and
    /// never silently dropped (ADR 0005). Also the reason of a message that is `rejected`.
    #[error(
        "this idempotency key already names a different message ({original_message_id}): \
         send a new message with a new clientMessageId"
    )]
    IdempotencyKeyReused { original_message_id: Uuid },
    /// The conversation would have more active members than the gateway allows.
    #[error("a conversation has at most {max_members} members")]
    ConversationFull {
        max_members: usize,
        /// The conversation being added to; none when it is being created.
        conversation_id: Option<String>,
    },
    /// A `sync` frame arrived while the socket's previous one was still running: a socket
    /// catches up one conversation at a time.
    #[error("a sync is already running on this socket; send the next after its sync.done")]
    SyncInProgress,
    #[error("message not found: {message_id}")]
    MessageNotFound { message_id: String },
    /// The caller has no device with that push token. The token itself is never echoed: it is
    /// a credential for pushing to someone's phone.
    #[error("device not found")]
    DeviceNotFound,
    /// The caller has not blocked `user_id` (`DELETE /v1/blocks/{userId}`).
    #[error("you have not blocked {user_id}")]
    BlockNotFound { user_id: String },
    #[error("no such route")]
    RouteNotFound,
    /// The route exists but does not take this method (the answer carries `Allow`).
    #[error("{method} is not a method of this route")]
    MethodNotAllowed { method: String },
    #[error("payload larger than {limit_bytes} bytes")]
    PayloadTooLarge { limit_bytes: usize },
    /// The request's body did not arrive within the server's body read timeout (a client
    /// that trickles its body, or stalls). The connection is closed after this answer.
    #[error("the request body did not arrive within {timeout_secs} s")]
    RequestTimeout { timeout_secs: u64 },
    #[error("rate limit exceeded")]
    RateLimitExceeded { retry_after_secs: u64 },
    /// The stream could not take the message right now (NATS down, publish timed out, stream
    /// full). Retrying later with the same `clientMessageId` is safe.
    #[error("message could not be enqueued now: {reason}")]
    EnqueueUnavailable {
        reason: String,
        retry_after_secs: u64,
    },
    /// The backlog (accepted messages not yet persisted) has reached its bound: the consumers
    /// are behind. Refused before anything is published, so nothing is lost; retrying later
    /// with the same `clientMessageId` is safe.
    #[error(
        "the message backlog is full ({backlog_messages} messages, {backlog_bytes} bytes waiting to be persisted); retry later"
    )]
    BacklogFull {
        backlog_bytes: u64,
        backlog_messages: u64,
        max_bytes: u64,
        max_messages: u64,
        retry_after_secs: u64,
    },
    /// An unexpected failure while enqueueing.
    #[error("message could not be enqueued: {reason}")]
    EnqueueFailed { reason: String },
    /// A dependency other than the stream (Postgres) is unreachable.
    #[error("service unavailable: {reason}")]
    ServiceUnavailable {
        reason: String,
        retry_after_secs: u64,
    },
    /// A rejection decided by a policy, with one of the codes policies may give
    /// (`policies/ABI.md`): same status and code as the native rejection of that class.
    #[error("{message}")]
    Policy {
        code: PolicyCode,
        message: String,
        details: Value,
    },
    /// A failure that is nobody's fault but ours; logged with its cause.
    #[error("internal error")]
    Internal { reason: String },
}

impl Rejection {
    pub fn status(&self) -> u16 {
        match self {
            Rejection::InvalidSchema { .. }
            | Rejection::MissingRequiredField { .. }
            | Rejection::InvalidFieldType { .. }
            | Rejection::FieldTooLong { .. }
            | Rejection::InvalidRecipient { .. } => 400,
            Rejection::Unauthorized { .. } => 401,
            Rejection::Forbidden { .. } | Rejection::NotConversationMember { .. } => 403,
            Rejection::ConversationNotFound { .. }
            | Rejection::MessageNotFound { .. }
            | Rejection::DeviceNotFound
            | Rejection::BlockNotFound { .. }
            | Rejection::RouteNotFound => 404,
            Rejection::MethodNotAllowed { .. } => 405,
            Rejection::ConversationInactive { .. }
            | Rejection::UserBlocked { .. }
            | Rejection::IdempotencyKeyReused { .. }
            | Rejection::ConversationFull { .. }
            | Rejection::SyncInProgress => 409,
            Rejection::RequestTimeout { .. } => 408,
            Rejection::PayloadTooLarge { .. } => 413,
            Rejection::RateLimitExceeded { .. } => 429,
            Rejection::EnqueueFailed { .. } | Rejection::Internal { .. } => 500,
            Rejection::Policy { code, .. } => code.status(),
            Rejection::EnqueueUnavailable { .. }
            | Rejection::BacklogFull { .. }
            | Rejection::ServiceUnavailable { .. } => 503,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Rejection::InvalidSchema { .. } => "INVALID_SCHEMA",
            Rejection::MissingRequiredField { .. } => "MISSING_REQUIRED_FIELD",
            Rejection::InvalidFieldType { .. } => "INVALID_FIELD_TYPE",
            Rejection::FieldTooLong { .. } => "FIELD_TOO_LONG",
            Rejection::InvalidRecipient { .. } => "INVALID_RECIPIENT",
            Rejection::Unauthorized { .. } => "UNAUTHORIZED",
            Rejection::Forbidden { .. } => "FORBIDDEN",
            Rejection::NotConversationMember { .. } => "NOT_CONVERSATION_MEMBER",
            Rejection::ConversationNotFound { .. } => "CONVERSATION_NOT_FOUND",
            Rejection::ConversationInactive { .. } => "CONVERSATION_INACTIVE",
            Rejection::UserBlocked { .. } => "USER_BLOCKED",
            Rejection::IdempotencyKeyReused { .. } => "IDEMPOTENCY_KEY_REUSED",
            Rejection::ConversationFull { .. } => "CONVERSATION_FULL",
            Rejection::SyncInProgress => "SYNC_IN_PROGRESS",
            Rejection::MessageNotFound { .. } => "MESSAGE_NOT_FOUND",
            Rejection::DeviceNotFound => "DEVICE_NOT_FOUND",
            Rejection::BlockNotFound { .. } => "BLOCK_NOT_FOUND",
            Rejection::RouteNotFound => "NOT_FOUND",
            Rejection::MethodNotAllowed { .. } => "METHOD_NOT_ALLOWED",
            Rejection::PayloadTooLarge { .. } => "PAYLOAD_TOO_LARGE",
            Rejection::RequestTimeout { .. } => "REQUEST_TIMEOUT",
            Rejection::RateLimitExceeded { .. } => "RATE_LIMIT_EXCEEDED",
            Rejection::EnqueueUnavailable { .. } | Rejection::EnqueueFailed { .. } => {
                "ENQUEUE_FAILED"
            }
            Rejection::BacklogFull { .. } => "BACKLOG_FULL",
            Rejection::ServiceUnavailable { .. } => "SERVICE_UNAVAILABLE",
            Rejection::Internal { .. } => "INTERNAL_ERROR",
            Rejection::Policy { code, .. } => code.as_str(),
        }
    }

    /// The `reason` label of `producer_reject_total`.
    pub fn telemetry_label(&self) -> &'static str {
        match self {
            Rejection::InvalidSchema { .. } => "invalid_schema",
            Rejection::MissingRequiredField { .. } => "missing_required_field",
            Rejection::InvalidFieldType { .. } => "invalid_field_type",
            Rejection::FieldTooLong { .. } => "field_too_long",
            Rejection::InvalidRecipient { .. } => "invalid_recipient",
            Rejection::Unauthorized { .. } => "unauthorized",
            Rejection::Forbidden { .. } => "forbidden",
            Rejection::NotConversationMember { .. } => "not_conversation_member",
            Rejection::ConversationNotFound { .. } => "conversation_not_found",
            Rejection::ConversationInactive { .. } => "conversation_inactive",
            Rejection::UserBlocked { .. } => "user_blocked",
            Rejection::IdempotencyKeyReused { .. } => "idempotency_key_reused",
            Rejection::ConversationFull { .. } => "conversation_full",
            Rejection::SyncInProgress => "sync_in_progress",
            Rejection::MessageNotFound { .. } => "message_not_found",
            Rejection::DeviceNotFound => "device_not_found",
            Rejection::BlockNotFound { .. } => "block_not_found",
            Rejection::RouteNotFound => "route_not_found",
            Rejection::MethodNotAllowed { .. } => "method_not_allowed",
            Rejection::PayloadTooLarge { .. } => "payload_too_large",
            Rejection::RequestTimeout { .. } => "request_timeout",
            Rejection::RateLimitExceeded { .. } => "rate_limit_exceeded",
            Rejection::EnqueueUnavailable { .. } => "enqueue_unavailable",
            Rejection::EnqueueFailed { .. } => "enqueue_failed",
            Rejection::BacklogFull { .. } => "backlog_full",
            Rejection::ServiceUnavailable { .. } => "service_unavailable",
            Rejection::Internal { .. } => "internal_error",
            Rejection::Policy { code, .. } => code.telemetry_label(),
        }
    }

    /// Seconds for the `Retry-After` header, where waiting helps.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Rejection::RateLimitExceeded { retry_after_secs }
            | Rejection::EnqueueUnavailable {
                retry_after_secs, ..
            }
            | Rejection::BacklogFull {
                retry_after_secs, ..
            }
            | Rejection::ServiceUnavailable {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            _ => None,
        }
    }

    pub fn details(&self) -> Value {
        match self {
            Rejection::InvalidSchema { details, .. } => details.clone(),
            Rejection::MissingRequiredField { field } => json!({ "field": field }),
            Rejection::InvalidFieldType { field, expected } => {
                json!({ "field": field, "expected": expected })
            }
            Rejection::FieldTooLong { field, max, actual } => {
                json!({ "field": field, "maxLength": max, "actualLength": actual })
            }
            Rejection::InvalidRecipient {
                recipient_id,
                reason,
            } => {
                json!({ "recipientId": recipient_id, "reason": reason })
            }
            Rejection::Unauthorized { .. } | Rejection::Forbidden { .. } => json!({}),
            Rejection::NotConversationMember {
                user_id,
                conversation_id,
            } => {
                json!({ "userId": user_id, "conversationId": conversation_id })
            }
            Rejection::ConversationNotFound { conversation_id }
            | Rejection::ConversationInactive { conversation_id } => {
                json!({ "conversationId": conversation_id })
            }
            Rejection::UserBlocked {
                user_id,
                other_user_id,
            } => {
                json!({ "userId": user_id, "otherUserId": other_user_id })
            }
            Rejection::IdempotencyKeyReused {
                original_message_id,
            } => json!({ "originalMessageId": original_message_id }),
            Rejection::ConversationFull {
                max_members,
                conversation_id: Some(conversation_id),
            } => json!({ "maxMembers": max_members, "conversationId": conversation_id }),
            Rejection::ConversationFull {
                max_members,
                conversation_id: None,
            } => json!({ "maxMembers": max_members }),
            Rejection::SyncInProgress => json!({}),
            Rejection::MessageNotFound { message_id } => json!({ "messageId": message_id }),
            Rejection::BlockNotFound { user_id } => json!({ "userId": user_id }),
            Rejection::DeviceNotFound | Rejection::RouteNotFound => json!({}),
            Rejection::MethodNotAllowed { method } => json!({ "method": method }),
            Rejection::PayloadTooLarge { limit_bytes } => json!({ "limitBytes": limit_bytes }),
            Rejection::RequestTimeout { timeout_secs } => json!({ "timeoutSeconds": timeout_secs }),
            Rejection::RateLimitExceeded { retry_after_secs }
            | Rejection::EnqueueUnavailable {
                retry_after_secs, ..
            }
            | Rejection::ServiceUnavailable {
                retry_after_secs, ..
            } => {
                json!({ "retryAfterSeconds": retry_after_secs })
            }
            Rejection::BacklogFull {
                backlog_bytes,
                backlog_messages,
                max_bytes,
                max_messages,
                retry_after_secs,
            } => json!({
                "backlogBytes": backlog_bytes,
                "backlogMessages": backlog_messages,
                "maxBytes": max_bytes,
                "maxMessages": max_messages,
                "retryAfterSeconds": retry_after_secs,
            }),
            Rejection::EnqueueFailed { .. } | Rejection::Internal { .. } => json!({}),
            Rejection::Policy { details, .. } => details.clone(),
        }
    }

    /// `{code, message, details}`: the `error` of the body, and the `reason` of a message
    /// whose state is `rejected` (status route, `message.state.changed`).
    pub fn reason(&self) -> Value {
        json!({
            "code": self.code(),
            "message": self.to_string(),
            "details": self.details(),
        })
    }

    /// The JSON body sent to the client.
    pub fn body(&self) -> Value {
        json!({ "error": self.reason() })
    }
}

/// The codes a policy may reject with, each with its fixed status (`policies/ABI.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyCode {
    InvalidSchema,
    MissingRequiredField,
    InvalidFieldType,
    FieldTooLong,
    InvalidRecipient,
    Forbidden,
    NotConversationMember,
    ConversationNotFound,
    ConversationInactive,
    UserBlocked,
}

impl PolicyCode {
    pub const ALL: [PolicyCode; 10] = [
        PolicyCode::InvalidSchema,
        PolicyCode::MissingRequiredField,
        PolicyCode::InvalidFieldType,
        PolicyCode::FieldTooLong,
        PolicyCode::InvalidRecipient,
        PolicyCode::Forbidden,
        PolicyCode::NotConversationMember,
        PolicyCode::ConversationNotFound,
        PolicyCode::ConversationInactive,
        PolicyCode::UserBlocked,
    ];

    /// The code for a wire string, if policies may use it.
    pub fn from_wire(code: &str) -> Option<PolicyCode> {
        PolicyCode::ALL.into_iter().find(|c| c.as_str() == code)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PolicyCode::InvalidSchema => "INVALID_SCHEMA",
            PolicyCode::MissingRequiredField => "MISSING_REQUIRED_FIELD",
            PolicyCode::InvalidFieldType => "INVALID_FIELD_TYPE",
            PolicyCode::FieldTooLong => "FIELD_TOO_LONG",
            PolicyCode::InvalidRecipient => "INVALID_RECIPIENT",
            PolicyCode::Forbidden => "FORBIDDEN",
            PolicyCode::NotConversationMember => "NOT_CONVERSATION_MEMBER",
            PolicyCode::ConversationNotFound => "CONVERSATION_NOT_FOUND",
            PolicyCode::ConversationInactive => "CONVERSATION_INACTIVE",
            PolicyCode::UserBlocked => "USER_BLOCKED",
        }
    }

    pub fn status(self) -> u16 {
        match self {
            PolicyCode::InvalidSchema
            | PolicyCode::MissingRequiredField
            | PolicyCode::InvalidFieldType
            | PolicyCode::FieldTooLong
            | PolicyCode::InvalidRecipient => 400,
            PolicyCode::Forbidden | PolicyCode::NotConversationMember => 403,
            PolicyCode::ConversationNotFound => 404,
            PolicyCode::ConversationInactive | PolicyCode::UserBlocked => 409,
        }
    }

    /// The same labels as the native rejections of this class.
    pub fn telemetry_label(self) -> &'static str {
        match self {
            PolicyCode::InvalidSchema => "invalid_schema",
            PolicyCode::MissingRequiredField => "missing_required_field",
            PolicyCode::InvalidFieldType => "invalid_field_type",
            PolicyCode::FieldTooLong => "field_too_long",
            PolicyCode::InvalidRecipient => "invalid_recipient",
            PolicyCode::Forbidden => "forbidden",
            PolicyCode::NotConversationMember => "not_conversation_member",
            PolicyCode::ConversationNotFound => "conversation_not_found",
            PolicyCode::ConversationInactive => "conversation_inactive",
            PolicyCode::UserBlocked => "user_blocked",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_shape_matches_the_seed() {
        let rejection = Rejection::ConversationInactive {
            conversation_id: "conv_123".into(),
        };
        assert_eq!(rejection.status(), 409);
        assert_eq!(
            rejection.body(),
            json!({"error": {
                "code": "CONVERSATION_INACTIVE",
                "message": "conversation is inactive: conv_123",
                "details": {"conversationId": "conv_123"}
            }})
        );
    }

    #[test]
    fn policy_codes_match_the_native_rejections() {
        let natives = [
            Rejection::InvalidSchema {
                message: String::new(),
                details: json!({}),
            },
            Rejection::MissingRequiredField {
                field: String::new(),
            },
            Rejection::InvalidFieldType {
                field: String::new(),
                expected: String::new(),
            },
            Rejection::FieldTooLong {
                field: String::new(),
                max: 0,
                actual: 0,
            },
            Rejection::InvalidRecipient {
                recipient_id: String::new(),
                reason: String::new(),
            },
            Rejection::Forbidden {
                reason: String::new(),
            },
            Rejection::NotConversationMember {
                user_id: String::new(),
                conversation_id: String::new(),
            },
            Rejection::ConversationNotFound {
                conversation_id: String::new(),
            },
            Rejection::ConversationInactive {
                conversation_id: String::new(),
            },
            Rejection::UserBlocked {
                user_id: String::new(),
                other_user_id: String::new(),
            },
        ];
        for (native, code) in natives.iter().zip(PolicyCode::ALL) {
            let policy = Rejection::Policy {
                code,
                message: "m".into(),
                details: json!({}),
            };
            assert_eq!(
                (policy.status(), policy.code()),
                (native.status(), native.code())
            );
            assert_eq!(policy.telemetry_label(), native.telemetry_label());
            assert_eq!(PolicyCode::from_wire(code.as_str()), Some(code));
        }
        assert_eq!(PolicyCode::from_wire("ENQUEUE_FAILED"), None);
    }

    #[test]
    fn an_unknown_device_is_404_without_its_token() {
        let rejection = Rejection::DeviceNotFound;
        assert_eq!(rejection.status(), 404);
        assert_eq!(rejection.telemetry_label(), "device_not_found");
        assert_eq!(rejection.retry_after_secs(), None);
        assert_eq!(
            rejection.body(),
            json!({"error": {
                "code": "DEVICE_NOT_FOUND",
                "message": "device not found",
                "details": {}
            }})
        );
    }

    #[test]
    fn a_late_body_is_408_without_retry_after() {
        let rejection = Rejection::RequestTimeout { timeout_secs: 10 };
        assert_eq!(rejection.status(), 408);
        assert_eq!(rejection.telemetry_label(), "request_timeout");
        assert_eq!(rejection.retry_after_secs(), None);
        assert_eq!(
            rejection.body(),
            json!({"error": {
                "code": "REQUEST_TIMEOUT",
                "message": "the request body did not arrive within 10 s",
                "details": {"timeoutSeconds": 10}
            }})
        );
    }

    #[test]
    fn a_reused_key_is_409_naming_the_original() {
        let original = Uuid::nil();
        let rejection = Rejection::IdempotencyKeyReused {
            original_message_id: original,
        };
        assert_eq!(rejection.status(), 409);
        assert_eq!(rejection.telemetry_label(), "idempotency_key_reused");
        let body = rejection.body();
        assert_eq!(body["error"]["code"], "IDEMPOTENCY_KEY_REUSED");
        assert_eq!(
            body["error"]["details"],
            json!({"originalMessageId": original})
        );
        assert_eq!(body["error"], rejection.reason());
    }

    #[test]
    fn waiting_rejections_carry_retry_after() {
        assert_eq!(
            Rejection::RateLimitExceeded {
                retry_after_secs: 2
            }
            .retry_after_secs(),
            Some(2)
        );
        assert_eq!(Rejection::RouteNotFound.retry_after_secs(), None);
        let unavailable = Rejection::EnqueueUnavailable {
            reason: "nats down".into(),
            retry_after_secs: 1,
        };
        assert_eq!(
            (unavailable.status(), unavailable.code()),
            (503, "ENQUEUE_FAILED")
        );
        let full = Rejection::BacklogFull {
            backlog_bytes: 5000,
            backlog_messages: 10,
            max_bytes: 4096,
            max_messages: 100,
            retry_after_secs: 1,
        };
        assert_eq!(
            (full.status(), full.code(), full.telemetry_label()),
            (503, "BACKLOG_FULL", "backlog_full")
        );
        assert_eq!(full.retry_after_secs(), Some(1));
        assert_eq!(
            full.details(),
            json!({"backlogBytes": 5000, "backlogMessages": 10, "maxBytes": 4096,
                   "maxMessages": 100, "retryAfterSeconds": 1})
        );
    }
}
