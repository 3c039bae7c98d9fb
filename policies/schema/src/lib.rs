//! The `schema` policy: the gateway's native `schema` check (`gateway/src/checks/schema.rs`)
//! as a WebAssembly module. Same rules, in the same order, with the same codes, messages and
//! details; it needs no facts and never normalises.

use std::collections::BTreeSet;

use hotpath_policy_sdk::rejections::{
    field_too_long, invalid_field_type, invalid_recipient, invalid_schema, missing_required_field,
};
use hotpath_policy_sdk::{Input, Verdict};
use serde_json::{Map, Value, json};

pub const MAX_CONTENT_CHARS: usize = 10_000;
pub const MAX_CLIENT_MESSAGE_ID_CHARS: usize = 255;
pub const MAX_RECIPIENTS: usize = 1000;
pub const ALLOWED_CONTENT_TYPES: &[&str] = &["text", "image", "file", "audio", "video", "location"];
const ALLOWED_PRIORITIES: &[&str] = &["low", "normal", "high"];
/// `hotpath_core::auth::MAX_USER_ID_LEN`.
pub const MAX_USER_ID_LEN: usize = 128;

hotpath_policy_sdk::export_policy!(validate);

/// The policy.
pub fn validate(input: &Input) -> Verdict {
    match check(&input.request) {
        Ok(()) => Verdict::Allow,
        Err(rejection) => rejection,
    }
}

/// User ids are opaque strings of 1–128 characters from `[A-Za-z0-9._@:-]`
/// (`hotpath_core::auth::is_valid_user_id`).
pub fn is_valid_user_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_USER_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._@:-".contains(&b))
}

fn check(request: &Value) -> Result<(), Verdict> {
    let Value::Object(body) = request else {
        return Err(invalid_schema(
            "request body must be a JSON object",
            json!({}),
        ));
    };

    let conversation_id = required_string(body, "conversationId")?;
    if conversation_id.is_empty() {
        return Err(invalid_schema(
            "conversationId must not be empty",
            json!({"field": "conversationId"}),
        ));
    }

    let content = required_string(body, "content")?;
    if content.is_empty() {
        return Err(invalid_schema(
            "content must not be empty",
            json!({"field": "content"}),
        ));
    }
    max_chars("content", content, MAX_CONTENT_CHARS)?;
    no_nul("content", content)?;

    let content_type = required_string(body, "contentType")?;
    if !ALLOWED_CONTENT_TYPES.contains(&content_type) {
        return Err(invalid_schema(
            &format!(
                "contentType must be one of {}",
                ALLOWED_CONTENT_TYPES.join(", ")
            ),
            json!({"field": "contentType", "allowed": ALLOWED_CONTENT_TYPES}),
        ));
    }

    if let Some(client_id) = optional_string(body, "clientMessageId")? {
        if client_id.is_empty() {
            return Err(invalid_schema(
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
        return Err(invalid_schema(
            &format!("priority must be one of {}", ALLOWED_PRIORITIES.join(", ")),
            json!({"field": "priority", "allowed": ALLOWED_PRIORITIES}),
        ));
    }

    if let Some(recipients) = body.get("recipientIds") {
        check_recipients(recipients)?;
    }

    if let Some(metadata) = body.get("metadata") {
        if !metadata.is_object() {
            return Err(invalid_field_type("metadata", "an object"));
        }
        if contains_nul(metadata) {
            return Err(invalid_schema(
                "metadata must not contain NUL characters",
                json!({"field": "metadata"}),
            ));
        }
    }
    Ok(())
}

fn check_recipients(recipients: &Value) -> Result<(), Verdict> {
    let Value::Array(list) = recipients else {
        return Err(invalid_field_type("recipientIds", "an array of user ids"));
    };
    if list.len() > MAX_RECIPIENTS {
        return Err(invalid_schema(
            &format!("at most {MAX_RECIPIENTS} recipients are allowed"),
            json!({"field": "recipientIds", "max": MAX_RECIPIENTS, "actual": list.len()}),
        ));
    }
    if list.is_empty() {
        return Err(invalid_schema(
            "recipientIds must not be empty when given",
            json!({"field": "recipientIds"}),
        ));
    }
    let mut seen = BTreeSet::new();
    for item in list {
        let Value::String(id) = item else {
            return Err(invalid_field_type("recipientIds", "an array of user ids"));
        };
        if !is_valid_user_id(id) {
            return Err(invalid_recipient(id, "not a valid user id"));
        }
        if !seen.insert(id.as_str()) {
            return Err(invalid_recipient(id, "listed more than once"));
        }
    }
    Ok(())
}

fn required_string<'a>(body: &'a Map<String, Value>, field: &str) -> Result<&'a str, Verdict> {
    match body.get(field) {
        None | Some(Value::Null) => Err(missing_required_field(field)),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(invalid_field_type(field, "a string")),
    }
}

fn optional_string<'a>(
    body: &'a Map<String, Value>,
    field: &str,
) -> Result<Option<&'a str>, Verdict> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(invalid_field_type(field, "a string")),
    }
}

fn max_chars(field: &str, value: &str, max: usize) -> Result<(), Verdict> {
    // Byte length bounds the char count from above: only count when it could matter.
    if value.len() > max {
        let actual = value.chars().count();
        if actual > max {
            return Err(field_too_long(field, max, actual));
        }
    }
    Ok(())
}

/// Postgres text and jsonb cannot hold NUL.
fn no_nul(field: &str, value: &str) -> Result<(), Verdict> {
    if value.contains('\0') {
        return Err(invalid_schema(
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

#[cfg(test)]
mod tests {
    use hotpath_policy_sdk::Code;

    use super::*;

    fn input(request: Value) -> Input {
        Input {
            abi_version: 1,
            user: hotpath_policy_sdk::User { id: "alice".into() },
            request,
            facts: Default::default(),
        }
    }

    fn verdict(request: Value) -> Verdict {
        validate(&input(request))
    }

    fn code(request: Value) -> Option<&'static str> {
        match verdict(request) {
            Verdict::Reject { code, .. } => Some(code.as_str()),
            Verdict::Allow => None,
            other => panic!("schema never normalises: {other:?}"),
        }
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
    fn vectors_pass() {
        let passed = hotpath_policy_sdk::vectors::check(include_str!("../vectors.json"), validate)
            .unwrap_or_else(|failures| panic!("vectors failed:\n{failures}"));
        assert!(passed >= 12, "only {passed} vectors");
    }

    #[test]
    fn vectors_cover_every_code() {
        let cases = hotpath_policy_sdk::vectors::parse(include_str!("../vectors.json")).unwrap();
        for code in [
            "INVALID_SCHEMA",
            "MISSING_REQUIRED_FIELD",
            "INVALID_FIELD_TYPE",
            "FIELD_TOO_LONG",
            "INVALID_RECIPIENT",
        ] {
            assert!(
                cases.iter().any(|c| c.expect.code.as_deref() == Some(code)),
                "no vector for {code}"
            );
        }
        assert!(cases.iter().any(|c| c.expect.verdict == "allow"));
    }

    #[test]
    fn accepts_a_minimal_message() {
        assert_eq!(code(valid()), None);
    }

    // The native check's own cases (gateway/src/checks/schema.rs), verbatim.
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

    /// Messages and details are the native rejection's `to_string()` and `details()`.
    #[test]
    fn messages_and_details_match_the_native_rejections() {
        let cases = [
            (
                json!("x"),
                Code::InvalidSchema,
                "invalid request: request body must be a JSON object",
                json!({}),
            ),
            (
                json!({"conversationId": null}),
                Code::MissingRequiredField,
                "missing required field: conversationId",
                json!({"field": "conversationId"}),
            ),
            (
                with("conversationId", json!("")),
                Code::InvalidSchema,
                "invalid request: conversationId must not be empty",
                json!({"field": "conversationId"}),
            ),
            (
                with("content", json!(true)),
                Code::InvalidFieldType,
                "field content must be a string",
                json!({"field": "content", "expected": "a string"}),
            ),
            (
                with("content", json!("ü".repeat(10_002))),
                Code::FieldTooLong,
                "field content is longer than 10000 characters",
                json!({"field": "content", "maxLength": 10_000, "actualLength": 10_002}),
            ),
            (
                with("contentType", json!("exe")),
                Code::InvalidSchema,
                "invalid request: contentType must be one of text, image, file, audio, video, location",
                json!({"field": "contentType", "allowed": ALLOWED_CONTENT_TYPES}),
            ),
            (
                with("clientMessageId", json!("")),
                Code::InvalidSchema,
                "invalid request: clientMessageId must not be empty",
                json!({"field": "clientMessageId"}),
            ),
            (
                with("clientMessageId", json!("a\u{0}")),
                Code::InvalidSchema,
                "invalid request: clientMessageId must not contain NUL characters",
                json!({"field": "clientMessageId"}),
            ),
            (
                with("priority", json!("urgent")),
                Code::InvalidSchema,
                "invalid request: priority must be one of low, normal, high",
                json!({"field": "priority", "allowed": ["low", "normal", "high"]}),
            ),
            (
                with(
                    "recipientIds",
                    json!((0..1001).map(|i| format!("u{i}")).collect::<Vec<_>>()),
                ),
                Code::InvalidSchema,
                "invalid request: at most 1000 recipients are allowed",
                json!({"field": "recipientIds", "max": 1000, "actual": 1001}),
            ),
            (
                with("recipientIds", json!([])),
                Code::InvalidSchema,
                "invalid request: recipientIds must not be empty when given",
                json!({"field": "recipientIds"}),
            ),
            (
                with("recipientIds", json!({})),
                Code::InvalidFieldType,
                "field recipientIds must be an array of user ids",
                json!({"field": "recipientIds", "expected": "an array of user ids"}),
            ),
            (
                with("recipientIds", json!(["bob", "b b"])),
                Code::InvalidRecipient,
                "invalid recipient b b: not a valid user id",
                json!({"recipientId": "b b", "reason": "not a valid user id"}),
            ),
            (
                with("recipientIds", json!(["bob", "bob"])),
                Code::InvalidRecipient,
                "invalid recipient bob: listed more than once",
                json!({"recipientId": "bob", "reason": "listed more than once"}),
            ),
            (
                with("metadata", json!([])),
                Code::InvalidFieldType,
                "field metadata must be an object",
                json!({"field": "metadata", "expected": "an object"}),
            ),
            (
                with("metadata", json!({"a\u{0}": 1})),
                Code::InvalidSchema,
                "invalid request: metadata must not contain NUL characters",
                json!({"field": "metadata"}),
            ),
        ];
        for (request, code, message, details) in cases {
            assert_eq!(
                verdict(request.clone()),
                Verdict::reject(code, message, details),
                "{request}"
            );
        }
    }

    #[test]
    fn rules_run_in_the_native_order() {
        // Several faults at once: the first rule in the native order decides.
        let request = json!({"conversationId": "", "content": 5, "contentType": "exe"});
        assert_eq!(code(request), Some("INVALID_SCHEMA"));
        let request = json!({"conversationId": "c", "content": "", "contentType": 1});
        assert_eq!(code(request), Some("INVALID_SCHEMA"));
        let request =
            json!({"conversationId": "c", "content": "hi", "contentType": 1, "metadata": 1});
        assert_eq!(code(request), Some("INVALID_FIELD_TYPE"));
        let request = with("priority", json!(3));
        assert_eq!(code(request), Some("INVALID_FIELD_TYPE"));
        // Nulls count as absent; unknown fields are ignored.
        let mut request = valid();
        for field in ["clientMessageId", "senderId", "priority"] {
            request[field] = Value::Null;
        }
        request["extra"] = json!({"x": [1, 2]});
        assert_eq!(code(request), None);
        assert!(!is_valid_user_id(&"a".repeat(129)) && is_valid_user_id(&"a".repeat(128)));
        assert!(is_valid_user_id("a.b_c@d:e-f") && !is_valid_user_id("é"));
    }
}
