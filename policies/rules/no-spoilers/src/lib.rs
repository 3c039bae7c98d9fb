//! No spoilers in group conversations: a message whose content mentions "spoiler" is refused
//! in groups (direct conversations are left alone).

use hotpath_policy_sdk::{Code, Input, Verdict, export_policy};
use serde_json::json;

const BANNED: &str = "spoiler";

pub fn validate(input: &Input) -> Verdict {
    let in_group = input.facts.conversation.as_ref().is_some_and(|c| c.kind == "group");
    let content = input.request.get("content").and_then(|c| c.as_str()).unwrap_or("");
    if in_group && content.to_lowercase().contains(BANNED) {
        return Verdict::reject(Code::Forbidden, "no spoilers in group conversations", json!({"word": BANNED}));
    }
    Verdict::Allow
}

export_policy!(validate);
