//! Write a Hotpath policy as one plain Rust function.
//!
//! A policy is a WebAssembly module with the exports of `policies/ABI.md`. This crate hides that
//! contract: the author writes
//!
//! ```
//! use hotpath_policy_sdk::{Code, Input, Verdict};
//!
//! fn validate(input: &Input) -> Verdict {
//!     if input.request.get("content").and_then(|c| c.as_str()) == Some("boom") {
//!         return Verdict::reject(Code::Forbidden, "no booms", serde_json::json!({}));
//!     }
//!     Verdict::Allow
//! }
//!
//! hotpath_policy_sdk::export_policy!(validate);
//! ```
//!
//! and builds the crate as a `cdylib` for `wasm32-unknown-unknown` (`policies/build.sh`).
//! [`export_policy!`] generates the exports `hotpath_abi_version`, `hotpath_alloc` and
//! `hotpath_validate` (the toolchain exports `memory`); it generates nothing on any other
//! target, so the same crate builds natively and its logic is unit-tested with `cargo test`,
//! through [`evaluate`] (the exact bytes-in, bytes-out path of the module) and
//! [`vectors::check`] (the crate's `vectors.json`).
//!
//! # What the generated exports do
//!
//! * `hotpath_abi_version()` returns [`ABI_VERSION`].
//! * `hotpath_alloc(len)` returns `len` fresh bytes (never 0 for `len >= 0`), or 0 when memory
//!   cannot grow (or `len < 0`). Nothing is ever freed: the host uses a fresh instance per call.
//! * `hotpath_validate(ptr, len)` parses the input, calls the policy function, serialises its
//!   [`Verdict`] and returns `(out_ptr << 32) | out_len`.
//!
//! # Input the policy cannot read
//!
//! The host always sends well-formed input, so input that does not parse as the ABI's input
//! object (not UTF-8 JSON, `user.id` missing, …) means a bug in the host, not a bad message.
//! The SDK then does not call the policy and answers `{"verdict": "error", "message": "…"}`:
//! a verdict outside the ABI, which the host counts as a **policy failure** (fail-closed by
//! default), so the error shows in `policy_failures_total` and the logs instead of being
//! mistaken for a rejection of the client's message.
//!
//! # Output limits
//!
//! A reject `message` is cut to 1,000 characters (the ABI's limit). Should a verdict still
//! serialise to more than 64 KiB (a huge id echoed in `details`), its details are dropped
//! (`{}`) so the verdict stays within the host's output limit; a normalised request that is
//! too large, or not a JSON object, is left as it is and the host reports the failure.

#[cfg(target_arch = "wasm32")]
mod heap;

use std::fmt;

use serde::Deserialize;
use serde_json::{Map, Value, json};

/// The ABI version this SDK implements (`hotpath_abi_version`).
pub const ABI_VERSION: i32 = 1;

/// The most characters of a reject `message` the host accepts.
pub const MAX_MESSAGE_CHARS: usize = 1_000;

/// The most bytes of output the host reads.
pub const MAX_OUTPUT_BYTES: usize = 64 * 1024;

/// What the host tells the policy about one message.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Input {
    /// The ABI version of the host, `1`.
    pub abi_version: u32,
    /// The authenticated sender.
    pub user: User,
    /// The request body exactly as parsed JSON (any JSON value: checking its shape is a
    /// policy's job), or as an earlier policy of the chain normalised it.
    pub request: Value,
    /// What the gateway knows about the conversation and the sender.
    #[serde(default)]
    pub facts: Facts,
}

/// The authenticated sender.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct User {
    /// The token's subject.
    pub id: String,
}

/// What the gateway knows, looked up before the chain runs.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Facts {
    /// The conversation named by `request.conversationId` when that is the UUID of an existing
    /// conversation, else `None`.
    #[serde(default)]
    pub conversation: Option<Conversation>,
    /// Every user the sender has blocked or is blocked by, sorted.
    #[serde(default)]
    pub sender_blocks: Vec<String>,
}

/// A conversation that exists.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Conversation {
    /// Its id, a UUID.
    pub id: String,
    /// Its type, such as `"direct"` or `"group"` (`"type"` on the wire).
    #[serde(rename = "type")]
    pub kind: String,
    pub is_active: bool,
    /// Its active members, sorted.
    #[serde(default)]
    pub members: Vec<String>,
}

impl Conversation {
    /// Whether `user_id` is an active member.
    pub fn has_member(&self, user_id: &str) -> bool {
        // Sorted by the ABI; a linear scan keeps this right even if it were not.
        self.members.iter().any(|m| m == user_id)
    }
}

impl Facts {
    /// Whether a block stands between the sender and `user_id`.
    pub fn blocks(&self, user_id: &str) -> bool {
        self.sender_blocks.iter().any(|b| b == user_id)
    }
}

/// The codes a policy may reject with (`policies/ABI.md`), each with its fixed HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    /// 400
    InvalidSchema,
    /// 400
    MissingRequiredField,
    /// 400
    InvalidFieldType,
    /// 400
    FieldTooLong,
    /// 400
    InvalidRecipient,
    /// 403
    Forbidden,
    /// 403
    NotConversationMember,
    /// 404
    ConversationNotFound,
    /// 409
    ConversationInactive,
    /// 409
    UserBlocked,
}

impl Code {
    pub const ALL: [Code; 10] = [
        Code::InvalidSchema,
        Code::MissingRequiredField,
        Code::InvalidFieldType,
        Code::FieldTooLong,
        Code::InvalidRecipient,
        Code::Forbidden,
        Code::NotConversationMember,
        Code::ConversationNotFound,
        Code::ConversationInactive,
        Code::UserBlocked,
    ];

    /// The wire string, such as `"FIELD_TOO_LONG"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::InvalidSchema => "INVALID_SCHEMA",
            Code::MissingRequiredField => "MISSING_REQUIRED_FIELD",
            Code::InvalidFieldType => "INVALID_FIELD_TYPE",
            Code::FieldTooLong => "FIELD_TOO_LONG",
            Code::InvalidRecipient => "INVALID_RECIPIENT",
            Code::Forbidden => "FORBIDDEN",
            Code::NotConversationMember => "NOT_CONVERSATION_MEMBER",
            Code::ConversationNotFound => "CONVERSATION_NOT_FOUND",
            Code::ConversationInactive => "CONVERSATION_INACTIVE",
            Code::UserBlocked => "USER_BLOCKED",
        }
    }

    /// The code for a wire string, if policies may use it.
    pub fn from_wire(code: &str) -> Option<Code> {
        Code::ALL.into_iter().find(|c| c.as_str() == code)
    }

    /// The HTTP status the gateway answers with.
    pub fn status(self) -> u16 {
        match self {
            Code::InvalidSchema
            | Code::MissingRequiredField
            | Code::InvalidFieldType
            | Code::FieldTooLong
            | Code::InvalidRecipient => 400,
            Code::Forbidden | Code::NotConversationMember => 403,
            Code::ConversationNotFound => 404,
            Code::ConversationInactive | Code::UserBlocked => 409,
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A policy's answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Let the message through unchanged.
    Allow,
    /// Let it through with the request replaced (it must be a JSON object): the later
    /// policies and the publish see this one.
    AllowNormalized(Value),
    /// Turn it down. `message` and `details` (an object) reach the client as
    /// `{"error": {"code", "message", "details"}}`.
    Reject {
        code: Code,
        message: String,
        details: Value,
    },
}

impl Verdict {
    /// A rejection.
    pub fn reject(code: Code, message: impl Into<String>, details: Value) -> Verdict {
        Verdict::Reject {
            code,
            message: message.into(),
            details,
        }
    }

    /// The output object of the ABI.
    pub fn to_json(&self) -> Value {
        match self {
            Verdict::Allow => json!({"verdict": "allow"}),
            Verdict::AllowNormalized(request) => json!({"verdict": "allow", "request": request}),
            Verdict::Reject {
                code,
                message,
                details,
            } => json!({
                "verdict": "reject",
                "code": code.as_str(),
                "message": truncate_chars(message, MAX_MESSAGE_CHARS),
                "details": details,
            }),
        }
    }
}

fn truncate_chars(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((end, _)) => &text[..end],
        None => text,
    }
}

/// The output for input the SDK could not read: a verdict outside the ABI, so the host counts
/// a policy failure (see the crate docs).
pub fn error_output(message: &str) -> Vec<u8> {
    let out = json!({"verdict": "error", "message": truncate_chars(message, MAX_MESSAGE_CHARS)});
    serde_json::to_vec(&out).unwrap_or_else(|_| br#"{"verdict":"error"}"#.to_vec())
}

/// Parses the ABI input.
pub fn parse_input(bytes: &[u8]) -> Result<Input, serde_json::Error> {
    // UTF-8 is checked once over the whole input, so that the parser need not check every
    // string on its own (`from_str` trusts what it is given; `from_slice` checks each string,
    // which was most of an evaluation's parsing time).
    let text = std::str::from_utf8(bytes).map_err(serde::de::Error::custom)?;
    // The gateway parsed the request with serde_json's default nesting limit, and the input
    // wraps it one level deeper: lift the limit so any request the gateway accepted parses.
    let mut deserializer = serde_json::Deserializer::from_str(text);
    deserializer.disable_recursion_limit();
    let input = Input::deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(input)
}

/// The output of [`Verdict::Allow`], the answer to almost every message.
const ALLOW_OUTPUT: &[u8] = br#"{"verdict":"allow"}"#;

/// Everything `hotpath_validate` does between the input bytes and the output bytes: parse,
/// call `policy`, serialise. Natively, tests call this to run a policy exactly as the module
/// would.
pub fn evaluate(input: &[u8], policy: fn(&Input) -> Verdict) -> Vec<u8> {
    let input = match parse_input(input) {
        Ok(input) => input,
        Err(error) => return error_output(&format!("policy input is not ABI v1 JSON: {error}")),
    };
    let verdict = policy(&input);
    // The instance is thrown away after this call, memory and all: walking the parsed input
    // to free it would be work for nothing (the bump allocator frees nothing anyway).
    #[cfg(target_arch = "wasm32")]
    std::mem::forget(input);
    if matches!(verdict, Verdict::Allow) {
        return ALLOW_OUTPUT.to_vec();
    }
    let out = match serde_json::to_vec(&verdict.to_json()) {
        Ok(out) => out,
        Err(error) => return error_output(&format!("cannot serialise the verdict: {error}")),
    };
    if out.len() > MAX_OUTPUT_BYTES
        && let Verdict::Reject { code, message, .. } = verdict
    {
        let smaller = Verdict::Reject {
            code,
            message,
            details: Value::Object(Map::new()),
        };
        return serde_json::to_vec(&smaller.to_json()).unwrap_or(out);
    }
    out
}

/// Rejections worded and shaped exactly like the gateway's native ones (`message` is what the
/// gateway's own rejection of that kind says, `details` has the same keys), so a policy that
/// takes over a native rule answers clients byte for byte the same.
pub mod rejections {
    use serde_json::{Value, json};

    use super::{Code, Verdict};

    /// `INVALID_SCHEMA`, message `invalid request: {message}`, the given details.
    pub fn invalid_schema(message: &str, details: Value) -> Verdict {
        Verdict::reject(
            Code::InvalidSchema,
            format!("invalid request: {message}"),
            details,
        )
    }

    /// `MISSING_REQUIRED_FIELD`, details `{field}`.
    pub fn missing_required_field(field: &str) -> Verdict {
        Verdict::reject(
            Code::MissingRequiredField,
            format!("missing required field: {field}"),
            json!({ "field": field }),
        )
    }

    /// `INVALID_FIELD_TYPE`, details `{field, expected}`.
    pub fn invalid_field_type(field: &str, expected: &str) -> Verdict {
        Verdict::reject(
            Code::InvalidFieldType,
            format!("field {field} must be {expected}"),
            json!({ "field": field, "expected": expected }),
        )
    }

    /// `FIELD_TOO_LONG`, details `{field, maxLength, actualLength}`.
    pub fn field_too_long(field: &str, max: usize, actual: usize) -> Verdict {
        Verdict::reject(
            Code::FieldTooLong,
            format!("field {field} is longer than {max} characters"),
            json!({ "field": field, "maxLength": max, "actualLength": actual }),
        )
    }

    /// `INVALID_RECIPIENT`, details `{recipientId, reason}`.
    pub fn invalid_recipient(recipient_id: &str, reason: &str) -> Verdict {
        Verdict::reject(
            Code::InvalidRecipient,
            format!("invalid recipient {recipient_id}: {reason}"),
            json!({ "recipientId": recipient_id, "reason": reason }),
        )
    }

    /// `FORBIDDEN`, details `{}`.
    pub fn forbidden(reason: &str) -> Verdict {
        Verdict::reject(Code::Forbidden, format!("forbidden: {reason}"), json!({}))
    }

    /// `NOT_CONVERSATION_MEMBER`, details `{userId, conversationId}`.
    pub fn not_conversation_member(user_id: &str, conversation_id: &str) -> Verdict {
        Verdict::reject(
            Code::NotConversationMember,
            format!("user {user_id} is not a member of conversation {conversation_id}"),
            json!({ "userId": user_id, "conversationId": conversation_id }),
        )
    }

    /// `CONVERSATION_NOT_FOUND`, details `{conversationId}`.
    pub fn conversation_not_found(conversation_id: &str) -> Verdict {
        Verdict::reject(
            Code::ConversationNotFound,
            format!("conversation not found: {conversation_id}"),
            json!({ "conversationId": conversation_id }),
        )
    }

    /// `CONVERSATION_INACTIVE`, details `{conversationId}`.
    pub fn conversation_inactive(conversation_id: &str) -> Verdict {
        Verdict::reject(
            Code::ConversationInactive,
            format!("conversation is inactive: {conversation_id}"),
            json!({ "conversationId": conversation_id }),
        )
    }

    /// `USER_BLOCKED`, details `{userId, otherUserId}`.
    pub fn user_blocked(user_id: &str, other_user_id: &str) -> Verdict {
        Verdict::reject(
            Code::UserBlocked,
            format!("a block between {user_id} and {other_user_id} prevents this message"),
            json!({ "userId": user_id, "otherUserId": other_user_id }),
        )
    }
}

/// The machinery behind [`export_policy!`]; not part of the API.
#[doc(hidden)]
pub mod __private {
    use super::{Input, Verdict, evaluate};

    /// `hotpath_alloc`: `len` bytes that are never freed, or 0.
    pub fn alloc(len: i32) -> i32 {
        let Ok(len) = usize::try_from(len) else {
            return 0;
        };
        let mut buffer: Vec<u8> = Vec::new();
        // At least one byte, so even `len == 0` gets a real, non-zero pointer.
        if buffer.try_reserve_exact(len.max(1)).is_err() {
            return 0;
        }
        let ptr = buffer.as_mut_ptr();
        std::mem::forget(buffer);
        ptr as usize as i32
    }

    /// `hotpath_validate`.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be memory the host wrote, as handed out by [`alloc`].
    pub unsafe fn validate(ptr: i32, len: i32, policy: fn(&Input) -> Verdict) -> i64 {
        let out = match usize::try_from(len) {
            Ok(0) => evaluate(&[], policy),
            Ok(len) if ptr != 0 => {
                // SAFETY: the caller hands over `len` initialised bytes at `ptr`.
                let input = unsafe { std::slice::from_raw_parts(ptr as usize as *const u8, len) };
                evaluate(input, policy)
            }
            _ => super::error_output("hotpath_validate: invalid input pointer or length"),
        };
        let out = out.leak();
        let out_ptr = out.as_ptr() as usize as u64 & 0xffff_ffff;
        let out_len = out.len() as u64 & 0xffff_ffff;
        ((out_ptr << 32) | out_len) as i64
    }
}

/// Generates the module's exports for a policy function `fn(&Input) -> Verdict`:
/// `hotpath_abi_version`, `hotpath_alloc` and `hotpath_validate` (policies/ABI.md). Use it once,
/// in the policy crate's root. On targets other than `wasm32` it expands to nothing.
#[macro_export]
macro_rules! export_policy {
    ($policy:path) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            #[unsafe(no_mangle)]
            pub extern "C" fn hotpath_abi_version() -> i32 {
                $crate::ABI_VERSION
            }

            #[unsafe(no_mangle)]
            pub extern "C" fn hotpath_alloc(len: i32) -> i32 {
                $crate::__private::alloc(len)
            }

            /// # Safety
            /// Called by the host only, with memory it got from `hotpath_alloc`.
            #[unsafe(no_mangle)]
            pub unsafe extern "C" fn hotpath_validate(ptr: i32, len: i32) -> i64 {
                let policy: fn(&$crate::Input) -> $crate::Verdict = $policy;
                // SAFETY: the host passes the block it got from `hotpath_alloc`, written.
                unsafe { $crate::__private::validate(ptr, len, policy) }
            }
        };
    };
}

/// Test vectors (the ABI's format), run natively against a policy function.
#[cfg(not(target_arch = "wasm32"))]
pub mod vectors {
    use serde::Deserialize;
    use serde_json::Value;

    use super::{Input, Verdict, evaluate};

    /// One case of a `vectors.json`.
    #[derive(Debug, Clone, Deserialize)]
    pub struct Case {
        pub name: String,
        pub input: Value,
        pub expect: Expect,
    }

    /// What a case expects; only the fields given are compared.
    #[derive(Debug, Clone, Deserialize)]
    pub struct Expect {
        pub verdict: String,
        #[serde(default)]
        pub code: Option<String>,
        #[serde(default)]
        pub request: Option<Value>,
    }

    /// Parses a `vectors.json`.
    pub fn parse(text: &str) -> Result<Vec<Case>, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// Runs one case through [`evaluate`] (the module's own path); returns the output object,
    /// or why it does not meet the expectation.
    pub fn run_case(case: &Case, policy: fn(&Input) -> Verdict) -> Result<Value, String> {
        let input = serde_json::to_vec(&case.input).map_err(|e| e.to_string())?;
        let out = evaluate(&input, policy);
        let out: Value = serde_json::from_slice(&out).map_err(|e| format!("output: {e}"))?;
        let field = |name: &str| out.get(name).and_then(Value::as_str).map(str::to_owned);
        let mut problems = Vec::new();
        if field("verdict").as_deref() != Some(case.expect.verdict.as_str()) {
            problems.push(format!("verdict is not {:?}", case.expect.verdict));
        }
        if let Some(code) = &case.expect.code
            && field("code").as_deref() != Some(code.as_str())
        {
            problems.push(format!("code is not {code:?}"));
        }
        if let Some(request) = &case.expect.request
            && out.get("request") != Some(request)
        {
            problems.push("request differs".to_string());
        }
        if problems.is_empty() {
            Ok(out)
        } else {
            Err(format!("{}; got {out}", problems.join(", ")))
        }
    }

    /// Runs every case of a `vectors.json`; returns how many passed, or every failure.
    pub fn check(text: &str, policy: fn(&Input) -> Verdict) -> Result<usize, String> {
        let cases = parse(text).map_err(|e| format!("vectors: {e}"))?;
        let failures: Vec<String> = cases
            .iter()
            .filter_map(|case| {
                run_case(case, policy)
                    .err()
                    .map(|why| format!("{}: {why}", case.name))
            })
            .collect();
        if failures.is_empty() {
            Ok(cases.len())
        } else {
            Err(failures.join("\n"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(_: &Input) -> Verdict {
        Verdict::Allow
    }

    fn echo_user(input: &Input) -> Verdict {
        Verdict::reject(
            Code::Forbidden,
            "x".repeat(2_000),
            json!({"user": input.user.id, "blocks": input.facts.sender_blocks}),
        )
    }

    fn out(bytes: Vec<u8>) -> Value {
        serde_json::from_slice(&bytes).unwrap()
    }

    const INPUT: &str = r#"{"abiVersion":1,"user":{"id":"alice"},"request":{"content":"hi"},
        "facts":{"conversation":{"id":"c","type":"group","isActive":true,"members":["alice","bob"]},
        "senderBlocks":["mallory"]}}"#;

    #[test]
    fn parses_the_abi_input() {
        let input = parse_input(INPUT.as_bytes()).unwrap();
        assert_eq!(input.abi_version, 1);
        assert_eq!(input.user.id, "alice");
        assert_eq!(input.request, json!({"content": "hi"}));
        let conversation = input.facts.conversation.as_ref().unwrap();
        assert_eq!(conversation.kind, "group");
        assert!(conversation.is_active && conversation.has_member("bob"));
        assert!(input.facts.blocks("mallory") && !input.facts.blocks("bob"));

        let bare = r#"{"abiVersion":1,"user":{"id":"a"},"request":null,"facts":{"conversation":null,"senderBlocks":[]}}"#;
        let input = parse_input(bare.as_bytes()).unwrap();
        assert_eq!(input.facts, Facts::default());
        assert_eq!(input.request, Value::Null);
    }

    #[test]
    fn writes_the_abi_output() {
        assert_eq!(
            out(evaluate(INPUT.as_bytes(), allow)),
            json!({"verdict": "allow"})
        );
        assert_eq!(
            Verdict::AllowNormalized(json!({"a": 1})).to_json(),
            json!({"verdict": "allow", "request": {"a": 1}})
        );
        let rejected = out(evaluate(INPUT.as_bytes(), echo_user));
        assert_eq!(rejected["code"], "FORBIDDEN");
        assert_eq!(
            rejected["message"].as_str().unwrap().len(),
            MAX_MESSAGE_CHARS
        );
        assert_eq!(
            rejected["details"],
            json!({"user": "alice", "blocks": ["mallory"]})
        );
    }

    #[test]
    fn unreadable_input_is_an_error_verdict() {
        for bad in [
            &b""[..],
            b"{",
            b"[]",
            br#"{"abiVersion":1}"#,
            b"\xff",
            b"{\"abiVersion\":1,\"user\":{\"id\":\"\xff\"},\"request\":{}}",
            br#"{"abiVersion":1,"user":{"id":"a"},"request":{}} x"#,
        ] {
            let output = out(evaluate(bad, allow));
            assert_eq!(output["verdict"], "error", "{bad:?}");
            assert!(output["message"].is_string());
        }
    }

    #[test]
    fn oversized_details_are_dropped() {
        fn huge(_: &Input) -> Verdict {
            Verdict::reject(
                Code::InvalidRecipient,
                "m",
                json!({"recipientId": "x".repeat(100_000)}),
            )
        }
        let output = evaluate(INPUT.as_bytes(), huge);
        assert!(output.len() < MAX_OUTPUT_BYTES);
        assert_eq!(
            out(output),
            json!({"verdict": "reject", "code": "INVALID_RECIPIENT", "message": "m", "details": {}})
        );
    }

    #[test]
    fn deep_requests_parse() {
        let deep = format!(
            r#"{{"abiVersion":1,"user":{{"id":"a"}},"request":{}1{},"facts":{{}}}}"#,
            "[".repeat(300),
            "]".repeat(300)
        );
        assert!(parse_input(deep.as_bytes()).is_ok());
    }

    #[test]
    fn codes_round_trip() {
        for code in Code::ALL {
            assert_eq!(Code::from_wire(code.as_str()), Some(code));
            assert!(matches!(code.status(), 400 | 403 | 404 | 409));
        }
        assert_eq!(Code::from_wire("INTERNAL_ERROR"), None);
    }

    #[test]
    fn alloc_refuses_a_negative_length() {
        // Natively the pointer does not fit an i32; only the refusal is meaningful here.
        assert_eq!(__private::alloc(-1), 0);
    }
}
