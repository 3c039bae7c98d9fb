//! The `schema` check: the seed validator's rules, on the raw JSON.

use hotpath_core::auth::is_valid_user_id;
use hotpath_core::rejection::Rejection;
use serde_json::{Map, Value, json};

use super::{Check, CheckInput, Verdict};

pub const MAX_CONTENT_CHARS: usize = 10_000;
pub const MAX_CLIENT_MESSAGE_ID_CHARS: usize = 255;
pub const MAX_RECIPIENTS: usize = 1000;
pub const ALLOWED_CONTENT_TYPES: &[&str] = &["text", "image", "file", "audio", "video", "location"];
const ALLOWED_PRIORITIES: &[&str] = &["low", "normal", "high"];

pub struct Schema;

impl Check for Schema {
    fn name(&self) -> &str {
        "schema"
    }

    fn evaluate(&self, input: &CheckInput<'_>) -> Verdict {
        match validate(input.request) {
            Ok(()) => Verdict::Allow,
            Err(rejection) => Verdict::Reject(rejection),
        }
    }
}

fn validate(request: &Value) -> Result<(), Rejection> {
    let Value::Object(body) = request else {
        return Err(invalid("request body must be a JSON object", json!({})));
    };

    let conversation_id = required_string(body, "conversationId")?;
    if conversation_id.is_empty() {
        return Err(invalid(
            "conversationId must not be empty",
            json!({"field": "conversationId"}),
        ));
    }

    let content = required_string(body, "content")?;
    if content.is_empty() {
        return Err(invalid(
            "content must not be empty",
            json!({"field": "content"}),
        ));
    }
    max_chars("content", content, MAX_CONTENT_CHARS)?;
    no_nul("content", content)?;

    let content_type = required_string(body, "contentType")?;
    if !ALLOWED_CONTENT_TYPES.contains(&content_type) {
        return Err(invalid(
            &format!(
                "contentType must be one of {}",
                ALLOWED_CONTENT_TYPES.join(", ")
            ),
            json!({"field": "contentType", "allowed": ALLOWED_CONTENT_TYPES}),
        ));
    }

    if let Some(client_id) = optional_string(body, "clientMessageId")? {
        if client_id.is_empty() {
            return Err(invalid(
                "clientMessageId must not be empty",
                json!({"field": "clientMessageId"}),
            ));
        }
        max_chars("clientMessageId", client_id, MAX_CLIENT_MESSAGE_ID_CHARS)?;
        no_nul("clientMessageId", client_id)?;
    }

    optional_string(body, "senderId")?;

    if let Some(priority) = optional_string(body, "priority")?
        && !ALLOWED_PRIORITIES.contains(&priority)
    {
        return Err(invalid(
            &format!("priority must be one of {}", ALLOWED_PRIORITIES.join(", ")),
            json!({"field": "priority", "allowed": ALLOWED_PRIORITIES}),
        ));
    }

    if let Some(recipients) = body.get("recipientIds") {
        validate_recipients(recipients)?;
    }

    if let Some(metadata) = body.get("metadata") {
        if !metadata.is_object() {
            return Err(type_error("metadata", "an object"));
        }
        if contains_nul(metadata) {
            return Err(invalid(
                "metadata must not contain NUL characters",
                json!({"field": "metadata"}),
            ));
        }
    }
    Ok(())
}

fn validate_recipients(recipients: &Value) -> Result<(), Rejection> {
    let Value::Array(list) = recipients else {
        return Err(type_error("recipientIds", "an array of user ids"));
    };
    if list.len() > MAX_RECIPIENTS {
        return Err(invalid(
            &format!("at most {MAX_RECIPIENTS} recipients are allowed"),
            json!({"field": "recipientIds", "max": MAX_RECIPIENTS, "actual": list.len()}),
        ));
    }
    if list.is_empty() {
        return Err(invalid(
            "recipientIds must not be empty when given",
            json!({"field": "recipientIds"}),
        ));
    }
    let mut seen = std::collections::HashSet::with_capacity(list.len());
    for item in list {
        let Value::String(id) = item else {
            return Err(type_error("recipientIds", "an array of user ids"));
        };
        if !is_valid_user_id(id) {
            return Err(Rejection::InvalidRecipient {
                recipient_id: id.clone(),
                reason: "not a valid user id".into(),
            });
        }
        if !seen.insert(id.as_str()) {
            return Err(Rejection::InvalidRecipient {
                recipient_id: id.clone(),
                reason: "listed more than once".into(),
            });
        }
    }
    Ok(())
}

fn required_string<'a>(body: &'a Map<String, Value>, field: &str) -> Result<&'a str, Rejection> {
    match body.get(field) {
        None | Some(Value::Null) => Err(Rejection::MissingRequiredField {
            field: field.into(),
        }),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(type_error(field, "a string")),
    }
}

fn optional_string<'a>(
    body: &'a Map<String, Value>,
    field: &str,
) -> Result<Option<&'a str>, Rejection> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(type_error(field, "a string")),
    }
}

fn max_chars(field: &str, value: &str, max: usize) -> Result<(), Rejection> {
    // Byte length bounds the char count from above: only count when it could matter.
    if value.len() > max {
        let actual = value.chars().count();
        if actual > max {
            return Err(Rejection::FieldTooLong {
                field: field.into(),
                max,
                actual,
            });
        }
    }
    Ok(())
}

/// Postgres text and jsonb cannot hold NUL; refusing it here keeps such a message from being
/// accepted and then failing forever in the consumer.
fn no_nul(field: &str, value: &str) -> Result<(), Rejection> {
    if value.contains('\0') {
        return Err(invalid(
            &format!("{field} must not contain NUL characters"),
            json!({"field": field}),
        ));
    }
    Ok(())
}

fn contains_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(contains_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)),
        _ => false,
    }
}

fn invalid(message: &str, details: Value) -> Rejection {
    Rejection::InvalidSchema {
        message: message.into(),
        details,
    }
}

fn type_error(field: &str, expected: &str) -> Rejection {
    Rejection::InvalidFieldType {
        field: field.into(),
        expected: expected.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(request: Value) -> Option<&'static str> {
        validate(&request).err().map(|r| r.code())
    }

    fn valid() -> Value {
        json!({"conversationId": "c", "content": "hi", "contentType": "text"})
    }

    fn with(field: &str, value: Value) -> Value {
        let mut request = valid();
        request[field] = value;
        request
    }

    #[test]
    fn accepts_a_minimal_message() {
        assert_eq!(code(valid()), None);
    }

    #[test]
    fn each_rule_has_its_code() {
        assert_eq!(code(json!([1])), Some("INVALID_SCHEMA"));
        assert_eq!(
            code(json!({"content": "hi", "contentType": "text"})),
            Some("MISSING_REQUIRED_FIELD")
        );
        assert_eq!(code(with("content", json!(5))), Some("INVALID_FIELD_TYPE"));
        assert_eq!(
            code(with("content", json!("x".repeat(10_001)))),
            Some("FIELD_TOO_LONG")
        );
        assert_eq!(code(with("content", json!("é".repeat(10_000)))), None);
        assert_eq!(
            code(with("clientMessageId", json!("x".repeat(256)))),
            Some("FIELD_TOO_LONG")
        );
        assert_eq!(
            code(with("contentType", json!("exe"))),
            Some("INVALID_SCHEMA")
        );
        assert_eq!(
            code(with("metadata", json!("x"))),
            Some("INVALID_FIELD_TYPE")
        );
        assert_eq!(
            code(with("metadata", json!({"a": "\u{0}"}))),
            Some("INVALID_SCHEMA")
        );
        assert_eq!(
            code(with("content", json!("a\u{0}b"))),
            Some("INVALID_SCHEMA")
        );
        assert_eq!(
            code(with("priority", json!("urgent"))),
            Some("INVALID_SCHEMA")
        );
        assert_eq!(code(with("senderId", json!(1))), Some("INVALID_FIELD_TYPE"));
    }

    #[test]
    fn recipients_are_bounded_typed_and_unique() {
        let many: Vec<String> = (0..1001).map(|i| format!("u{i}")).collect();
        assert_eq!(
            code(with("recipientIds", json!(many))),
            Some("INVALID_SCHEMA")
        );
        assert_eq!(
            code(with("recipientIds", json!("bob"))),
            Some("INVALID_FIELD_TYPE")
        );
        assert_eq!(
            code(with("recipientIds", json!([1]))),
            Some("INVALID_FIELD_TYPE")
        );
        assert_eq!(
            code(with("recipientIds", json!(["not valid"]))),
            Some("INVALID_RECIPIENT")
        );
        assert_eq!(
            code(with("recipientIds", json!(["bob", "bob"]))),
            Some("INVALID_RECIPIENT")
        );
        assert_eq!(code(with("recipientIds", json!(["bob"]))), None);
    }
}
