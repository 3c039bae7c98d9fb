//! The JSON frames of `GET /v1/ws` (`docs/websocket.md`): what a client may send, and the
//! replies the gateway writes itself. What the delivery consumers push (`message.new`,
//! `message.state.changed`) is `hotpath_core::events`.
//!
//! A frame that cannot be understood is answered with an `error` frame carrying the same codes
//! as HTTP; it never closes the connection.

use axum::extract::ws::Utf8Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use hotpath_core::receipts::ReceiptState;
use hotpath_core::rejection::Rejection;
use serde_json::{Map, Value, json};
use uuid::Uuid;

use crate::routes::send::SendAccepted;

/// Longest `reqId` echoed back.
pub const MAX_REQ_ID_LEN: usize = 255;

/// A frame from the client.
#[derive(Debug, PartialEq)]
pub enum ClientFrame {
    /// The body of `POST /v1/messages`, with the frame's own fields taken out.
    Send {
        req_id: Option<String>,
        body: Value,
        /// Stands in for HTTP's `X-Correlation-Id`.
        correlation_id: Option<Uuid>,
    },
    /// Every persisted message of the conversation after `after_seq`, then `sync.done`.
    Sync {
        req_id: Option<String>,
        conversation_id: String,
        after_seq: i64,
    },
    Ping {
        req_id: Option<String>,
    },
    /// A receipt: the client got (`delivered`) or showed (`read`) a message it receives.
    Ack {
        req_id: Option<String>,
        message_id: String,
        state: ReceiptState,
    },
    /// A newer token for the socket (`super::expiry`), before the current one expires.
    Refresh {
        req_id: Option<String>,
        token: String,
    },
}

/// A frame that was refused, with its `reqId` when it could be read.
#[derive(Debug, PartialEq)]
pub struct FrameError {
    pub req_id: Option<String>,
    pub rejection: Rejection,
}

/// Reads a text frame.
pub fn parse(text: &str) -> Result<ClientFrame, FrameError> {
    let anonymous = |rejection| FrameError {
        req_id: None,
        rejection,
    };
    let mut object = json_object(text).map_err(anonymous)?;
    let req_id = req_id(&mut object).map_err(anonymous)?;
    // Only a refusal needs its own copy of the id; a frame takes the id itself.
    let refuse = |rejection| FrameError {
        req_id: req_id.clone(),
        rejection,
    };
    let kind = frame_type(&mut object).map_err(refuse)?;
    match kind.as_str() {
        "send" => {
            let correlation_id = correlation_id(&mut object).map_err(refuse)?;
            Ok(ClientFrame::Send {
                req_id,
                body: Value::Object(object),
                correlation_id,
            })
        }
        "sync" => {
            let conversation_id = required_string(&object, "conversationId").map_err(refuse)?;
            let after_seq = after_seq(&object).map_err(refuse)?;
            Ok(ClientFrame::Sync {
                req_id,
                conversation_id,
                after_seq,
            })
        }
        "ping" => Ok(ClientFrame::Ping { req_id }),
        "ack" => {
            let message_id = required_string(&object, "messageId").map_err(refuse)?;
            let state = receipt_state(&object).map_err(refuse)?;
            Ok(ClientFrame::Ack {
                req_id,
                message_id,
                state,
            })
        }
        "refresh" => {
            let token = required_string(&object, "token").map_err(refuse)?;
            Ok(ClientFrame::Refresh { req_id, token })
        }
        other => Err(refuse(Rejection::InvalidSchema {
            message: format!("unknown frame type {other:?}"),
            details: json!({
                "type": other,
                "expected": ["send", "sync", "ping", "ack", "refresh"],
            }),
        })),
    }
}

/// The frame as a JSON object, the only shape a frame has.
fn json_object(text: &str) -> Result<Map<String, Value>, Rejection> {
    let value: Value = serde_json::from_str(text).map_err(|error| Rejection::InvalidSchema {
        message: format!("frame is not valid JSON: {error}"),
        details: json!({"line": error.line(), "column": error.column()}),
    })?;
    match value {
        Value::Object(object) => Ok(object),
        _ => Err(invalid("a frame must be a JSON object")),
    }
}

/// Takes `type` out of the frame: the kind of frame, a string.
fn frame_type(object: &mut Map<String, Value>) -> Result<String, Rejection> {
    match object.remove("type") {
        Some(Value::String(kind)) => Ok(kind),
        Some(_) => Err(field_type("type", "a string")),
        None => Err(missing("type")),
    }
}

/// Takes a `send` frame's `correlationId` out of it: a UUID string, or none. A string that is
/// no UUID is ignored, as HTTP ignores such an `X-Correlation-Id`, and a new id is made.
fn correlation_id(object: &mut Map<String, Value>) -> Result<Option<Uuid>, Rejection> {
    match object.remove("correlationId") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(id)) => Ok(Uuid::parse_str(&id).ok()),
        Some(_) => Err(field_type("correlationId", "a string")),
    }
}

/// A string field the frame must have (null counts as missing).
fn required_string(object: &Map<String, Value>, field: &str) -> Result<String, Rejection> {
    match object.get(field) {
        Some(Value::String(value)) => Ok(value.clone()),
        Some(Value::Null) | None => Err(missing(field)),
        Some(_) => Err(field_type(field, "a string")),
    }
}

/// A `sync` frame's `afterSeq`: a non-negative integer, 0 when absent.
fn after_seq(object: &Map<String, Value>) -> Result<i64, Rejection> {
    match object.get("afterSeq") {
        Some(Value::Null) | None => Ok(0),
        Some(value) => match value.as_i64() {
            Some(seq) if seq >= 0 => Ok(seq),
            _ => Err(field_type("afterSeq", "a non-negative integer")),
        },
    }
}

/// An `ack` frame's `state`: `delivered` or `read`; any other value, of any type, is refused
/// as the one schema error that lists both.
fn receipt_state(object: &Map<String, Value>) -> Result<ReceiptState, Rejection> {
    let state = match object.get("state") {
        Some(Value::String(state)) => state.parse::<ReceiptState>().ok(),
        Some(Value::Null) | None => return Err(missing("state")),
        Some(_) => None,
    };
    state.ok_or_else(|| Rejection::InvalidSchema {
        message: "state must be \"delivered\" or \"read\"".into(),
        details: json!({"field": "state", "expected": ["delivered", "read"]}),
    })
}

/// Takes `reqId` out of the frame: absent, or a string of bounded length.
fn req_id(object: &mut Map<String, Value>) -> Result<Option<String>, Rejection> {
    match object.remove("reqId") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(id)) if id.chars().count() <= MAX_REQ_ID_LEN => Ok(Some(id)),
        Some(Value::String(id)) => Err(Rejection::FieldTooLong {
            field: "reqId".into(),
            max: MAX_REQ_ID_LEN,
            actual: id.chars().count(),
        }),
        Some(_) => Err(field_type("reqId", "a string")),
    }
}

fn invalid(message: &str) -> Rejection {
    Rejection::InvalidSchema {
        message: message.into(),
        details: json!({}),
    }
}

fn missing(field: &str) -> Rejection {
    Rejection::MissingRequiredField {
        field: field.into(),
    }
}

fn field_type(field: &str, expected: &str) -> Rejection {
    Rejection::InvalidFieldType {
        field: field.into(),
        expected: expected.into(),
    }
}

/// `{"type": kind, "reqId"?, ...fields}`.
fn frame(kind: &str, req_id: Option<&str>, fields: Value) -> Utf8Bytes {
    let mut object = Map::new();
    object.insert("type".into(), kind.into());
    if let Some(id) = req_id {
        object.insert("reqId".into(), id.into());
    }
    if let Value::Object(fields) = fields {
        object.extend(fields);
    }
    Value::Object(object).to_string().into()
}

/// `send.ack`: the 202 body of `POST /v1/messages`, as a frame.
pub fn send_ack(req_id: Option<&str>, accepted: &SendAccepted) -> Utf8Bytes {
    // Serialising the accepted body (ids, strings, a timestamp) cannot fail.
    let fields = serde_json::to_value(accepted).expect("send.ack serialises");
    frame("send.ack", req_id, fields)
}

/// `error`: `{"error": {code, message, details}}` as HTTP sends it.
pub fn error(req_id: Option<&str>, rejection: &Rejection) -> Utf8Bytes {
    frame("error", req_id, rejection.body())
}

/// A receipt was taken (it is recorded shortly after, and the sender told).
pub fn ack_ok(req_id: Option<&str>) -> Utf8Bytes {
    frame("ack.ok", req_id, json!({}))
}

pub fn pong(req_id: Option<&str>) -> Utf8Bytes {
    frame("pong", req_id, json!({}))
}

/// A token expiry (`exp`, Unix seconds) as the RFC 3339 time the other frames use.
fn expiry_time(expires_at: u64) -> String {
    i64::try_from(expires_at)
        .ok()
        .and_then(|secs| DateTime::from_timestamp(secs, 0))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
        .to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// A `refresh` was taken: the socket now lives until `expires_at`.
pub fn refreshed(req_id: Option<&str>, expires_at: u64) -> Utf8Bytes {
    frame(
        "refreshed",
        req_id,
        json!({"expiresAt": expiry_time(expires_at)}),
    )
}

/// The socket's token expires soon: send a `refresh` before `expires_at` to stay connected.
pub fn token_expiring(expires_at: u64) -> Utf8Bytes {
    frame(
        "token.expiring",
        None,
        json!({"expiresAt": expiry_time(expires_at)}),
    )
}

/// Ends a `sync`: everything up to `last_seq` was sent (`afterSeq` when nothing was new).
pub fn sync_done(req_id: Option<&str>, conversation_id: Uuid, last_seq: i64) -> Utf8Bytes {
    frame(
        "sync.done",
        req_id,
        json!({"conversationId": conversation_id, "lastSeq": last_seq}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(text: &str) -> &'static str {
        parse(text).unwrap_err().rejection.code()
    }

    #[test]
    fn send_frames_lose_their_frame_fields() {
        let frame = parse(
            r#"{"type":"send","reqId":"r1","conversationId":"c","content":"hi","contentType":"text"}"#,
        )
        .unwrap();
        assert_eq!(
            frame,
            ClientFrame::Send {
                req_id: Some("r1".into()),
                body: json!({"conversationId":"c","content":"hi","contentType":"text"}),
                correlation_id: None,
            }
        );
    }

    #[test]
    fn sync_and_ping_frames_parse() {
        assert_eq!(
            parse(r#"{"type":"sync","conversationId":"c","afterSeq":5}"#).unwrap(),
            ClientFrame::Sync {
                req_id: None,
                conversation_id: "c".into(),
                after_seq: 5
            }
        );
        assert_eq!(
            parse(r#"{"type":"ping","reqId":"p"}"#).unwrap(),
            ClientFrame::Ping {
                req_id: Some("p".into())
            }
        );
    }

    #[test]
    fn ack_frames_parse_and_bad_states_are_invalid_schema() {
        assert_eq!(
            parse(r#"{"type":"ack","reqId":"a","messageId":"m","state":"read"}"#).unwrap(),
            ClientFrame::Ack {
                req_id: Some("a".into()),
                message_id: "m".into(),
                state: ReceiptState::Read,
            }
        );
        assert_eq!(
            code(r#"{"type":"ack","messageId":"m","state":"sent"}"#),
            "INVALID_SCHEMA"
        );
        assert_eq!(
            code(r#"{"type":"ack","messageId":"m","state":3}"#),
            "INVALID_SCHEMA"
        );
        assert_eq!(
            code(r#"{"type":"ack","state":"read"}"#),
            "MISSING_REQUIRED_FIELD"
        );
        assert_eq!(
            code(r#"{"type":"ack","messageId":"m"}"#),
            "MISSING_REQUIRED_FIELD"
        );
        let ok: Value = serde_json::from_str(&ack_ok(Some("a"))).unwrap();
        assert_eq!(ok, json!({"type": "ack.ok", "reqId": "a"}));
    }

    #[test]
    fn refresh_frames_carry_a_token_and_answers_name_the_expiry() {
        assert_eq!(
            parse(r#"{"type":"refresh","reqId":"r","token":"t"}"#).unwrap(),
            ClientFrame::Refresh {
                req_id: Some("r".into()),
                token: "t".into(),
            }
        );
        assert_eq!(code(r#"{"type":"refresh"}"#), "MISSING_REQUIRED_FIELD");
        assert_eq!(
            code(r#"{"type":"refresh","token":5}"#),
            "INVALID_FIELD_TYPE"
        );
        let refreshed: Value = serde_json::from_str(&refreshed(Some("r"), 1_735_732_800)).unwrap();
        assert_eq!(
            refreshed,
            json!({"type": "refreshed", "reqId": "r", "expiresAt": "2025-01-01T12:00:00Z"})
        );
        let expiring: Value = serde_json::from_str(&token_expiring(u64::MAX)).unwrap();
        assert_eq!(expiring["type"], "token.expiring");
        assert!(expiring["expiresAt"].is_string());
    }

    #[test]
    fn bad_frames_get_the_http_codes_and_keep_their_req_id() {
        assert_eq!(code("not json"), "INVALID_SCHEMA");
        assert_eq!(code("[1,2]"), "INVALID_SCHEMA");
        assert_eq!(code(r#"{"reqId":"x"}"#), "MISSING_REQUIRED_FIELD");
        assert_eq!(code(r#"{"type":7}"#), "INVALID_FIELD_TYPE");
        assert_eq!(code(r#"{"type":"sync"}"#), "MISSING_REQUIRED_FIELD");
        assert_eq!(
            code(r#"{"type":"sync","conversationId":"c","afterSeq":-1}"#),
            "INVALID_FIELD_TYPE"
        );
        let long = format!(r#"{{"type":"ping","reqId":"{}"}}"#, "x".repeat(300));
        assert_eq!(code(&long), "FIELD_TOO_LONG");
        let unknown = parse(r#"{"type":"dance","reqId":"r9"}"#).unwrap_err();
        assert_eq!(unknown.req_id.as_deref(), Some("r9"));
        assert_eq!(unknown.rejection.code(), "INVALID_SCHEMA");
    }

    #[test]
    fn replies_carry_type_and_req_id() {
        let reply: Value = serde_json::from_str(&error(
            Some("r1"),
            &Rejection::PayloadTooLarge { limit_bytes: 10 },
        ))
        .unwrap();
        assert_eq!(reply["type"], "error");
        assert_eq!(reply["reqId"], "r1");
        assert_eq!(reply["error"]["code"], "PAYLOAD_TOO_LARGE");
        let pong: Value = serde_json::from_str(&pong(None)).unwrap();
        assert_eq!(pong, json!({"type": "pong"}));
    }
}
