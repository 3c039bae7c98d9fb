//! The `authz` policy: who may send to whom, against the facts the host passes in.
//!
//! Order matters and follows the seed's native check: spoofed sender, then the conversation
//! exists, is active, the sender is an active member, every explicit recipient is another
//! active member, and blocks leave the message someone to go to. It never normalises. It does
//! not check the request's shape (that is `schema`, which runs first): values of the wrong type
//! are passed over exactly as the native check passed them over.
//!
//! A block keeps a pair apart, not a group: the gateway leaves everyone a block stands between
//! with the sender (whichever of the two made it) out of the message's recipients, so in a
//! group the others still hear the sender. What this policy refuses is a message that blocks
//! would leave with no recipient at all: every direct message across a block, and a group
//! message naming only people the sender is kept apart from. A message that had no recipient
//! to begin with (a group whose other members all left) is not the blocks' doing and passes.

use hotpath_policy_sdk::rejections::{
    conversation_inactive, conversation_not_found, forbidden, invalid_recipient,
    not_conversation_member, user_blocked,
};
use hotpath_policy_sdk::{Input, Verdict};
use serde_json::Value;

hotpath_policy_sdk::export_policy!(validate);

/// The policy.
pub fn validate(input: &Input) -> Verdict {
    match authorize(input) {
        Ok(()) => Verdict::Allow,
        Err(rejection) => rejection,
    }
}

fn authorize(input: &Input) -> Result<(), Verdict> {
    let request = &input.request;
    let user_id = input.user.id.as_str();
    if let Some(Value::String(claimed)) = request.get("senderId")
        && claimed != user_id
    {
        return Err(forbidden("senderId must be the authenticated user"));
    }

    let conversation_id = request
        .get("conversationId")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let Some(conversation) = &input.facts.conversation else {
        return Err(conversation_not_found(conversation_id));
    };
    if !conversation.is_active {
        return Err(conversation_inactive(conversation_id));
    }
    if !conversation.has_member(user_id) {
        return Err(not_conversation_member(user_id, conversation_id));
    }

    let explicit = request.get("recipientIds").and_then(Value::as_array);
    if let Some(recipients) = explicit {
        for recipient in recipients.iter().filter_map(Value::as_str) {
            if recipient == user_id {
                return Err(invalid_recipient(
                    recipient,
                    "the sender cannot be a recipient",
                ));
            }
            if !conversation.has_member(recipient) {
                return Err(invalid_recipient(
                    recipient,
                    "not an active member of the conversation",
                ));
            }
        }
    }

    let recipients: Vec<&str> = match explicit {
        Some(recipients) => recipients.iter().filter_map(Value::as_str).collect(),
        None => {
            // The ABI sends `members` sorted; sorting here keeps the named user the same even
            // if a host did not.
            let mut members: Vec<&str> = conversation.members.iter().map(String::as_str).collect();
            members.sort_unstable();
            members.retain(|m| *m != user_id);
            members
        }
    };
    // Refused only when blocks leave nobody; the gateway drops the blocked from the rest.
    if recipients.iter().all(|r| input.facts.blocks(r))
        && let Some(first) = recipients.first()
    {
        return Err(user_blocked(user_id, first));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use hotpath_policy_sdk::{Code, Conversation, Facts, User};
    use serde_json::json;

    use super::*;

    fn conversation(active: bool, members: &[&str]) -> Conversation {
        Conversation {
            id: "00000000-0000-0000-0000-000000000000".into(),
            kind: "group".into(),
            is_active: active,
            members: members.iter().map(|m| m.to_string()).collect(),
        }
    }

    fn verdict(request: Value, conv: Option<&Conversation>, blocks: &[&str]) -> Verdict {
        validate(&Input {
            abi_version: 1,
            user: User { id: "alice".into() },
            request,
            facts: Facts {
                conversation: conv.cloned(),
                sender_blocks: blocks.iter().map(|b| b.to_string()).collect(),
            },
        })
    }

    fn code(request: Value, conv: Option<&Conversation>, blocks: &[&str]) -> Option<&'static str> {
        match verdict(request, conv, blocks) {
            Verdict::Reject { code, .. } => Some(code.as_str()),
            Verdict::Allow => None,
            other => panic!("authz never normalises: {other:?}"),
        }
    }

    #[test]
    fn vectors_pass() {
        let passed = hotpath_policy_sdk::vectors::check(include_str!("../vectors.json"), validate)
            .unwrap_or_else(|failures| panic!("vectors failed:\n{failures}"));
        assert!(passed >= 8, "only {passed} vectors");
    }

    #[test]
    fn vectors_cover_every_code() {
        let cases = hotpath_policy_sdk::vectors::parse(include_str!("../vectors.json")).unwrap();
        for code in [
            "FORBIDDEN",
            "CONVERSATION_NOT_FOUND",
            "CONVERSATION_INACTIVE",
            "NOT_CONVERSATION_MEMBER",
            "INVALID_RECIPIENT",
            "USER_BLOCKED",
        ] {
            assert!(
                cases.iter().any(|c| c.expect.code.as_deref() == Some(code)),
                "no vector for {code}"
            );
        }
        assert!(cases.iter().any(|c| c.expect.verdict == "allow"));
    }

    // The native check's own cases (gateway/src/checks/authz.rs), verbatim.
    #[test]
    fn follows_the_seed_order() {
        let open = conversation(true, &["alice", "bob"]);
        let closed = conversation(false, &["alice", "bob"]);
        let others = conversation(true, &["bob", "carol"]);
        let base = json!({"conversationId": "c"});
        assert_eq!(
            code(
                json!({"conversationId": "c", "senderId": "bob"}),
                Some(&open),
                &[]
            ),
            Some("FORBIDDEN")
        );
        assert_eq!(
            code(base.clone(), None, &[]),
            Some("CONVERSATION_NOT_FOUND")
        );
        assert_eq!(
            code(base.clone(), Some(&closed), &[]),
            Some("CONVERSATION_INACTIVE")
        );
        assert_eq!(
            code(base.clone(), Some(&others), &[]),
            Some("NOT_CONVERSATION_MEMBER")
        );
        assert_eq!(
            code(base.clone(), Some(&open), &["bob"]),
            Some("USER_BLOCKED")
        );
        assert_eq!(code(base, Some(&open), &[]), None);
    }

    #[test]
    fn explicit_recipients_must_be_other_active_members() {
        let open = conversation(true, &["alice", "bob"]);
        let to = |r: &str| json!({"conversationId": "c", "recipientIds": [r]});
        assert_eq!(
            code(to("carol"), Some(&open), &[]),
            Some("INVALID_RECIPIENT")
        );
        assert_eq!(
            code(to("alice"), Some(&open), &[]),
            Some("INVALID_RECIPIENT")
        );
        assert_eq!(code(to("bob"), Some(&open), &[]), None);
        assert_eq!(
            code(
                json!({"conversationId": "c", "senderId": "alice"}),
                Some(&open),
                &[]
            ),
            None
        );
    }

    /// Messages and details are the native rejection's `to_string()` and `details()`.
    #[test]
    fn messages_and_details_match_the_native_rejections() {
        let open = conversation(true, &["alice", "bob", "carol", "dave"]);
        let closed = conversation(false, &["alice", "bob"]);
        let others = conversation(true, &["bob"]);
        let c = "3f1c0000-0000-0000-0000-000000000001";
        let cases = [
            (
                json!({"conversationId": c, "senderId": "bob"}),
                Some(&open),
                &[][..],
                Verdict::reject(
                    Code::Forbidden,
                    "forbidden: senderId must be the authenticated user",
                    json!({}),
                ),
            ),
            (
                json!({"conversationId": c}),
                None,
                &[],
                Verdict::reject(
                    Code::ConversationNotFound,
                    format!("conversation not found: {c}"),
                    json!({"conversationId": c}),
                ),
            ),
            (
                json!({"conversationId": 7}),
                None,
                &[],
                Verdict::reject(
                    Code::ConversationNotFound,
                    "conversation not found: ",
                    json!({"conversationId": ""}),
                ),
            ),
            (
                json!({"conversationId": c}),
                Some(&closed),
                &[],
                Verdict::reject(
                    Code::ConversationInactive,
                    format!("conversation is inactive: {c}"),
                    json!({"conversationId": c}),
                ),
            ),
            (
                json!({"conversationId": c}),
                Some(&others),
                &[],
                Verdict::reject(
                    Code::NotConversationMember,
                    format!("user alice is not a member of conversation {c}"),
                    json!({"userId": "alice", "conversationId": c}),
                ),
            ),
            (
                json!({"conversationId": c, "recipientIds": ["bob", "alice"]}),
                Some(&open),
                &[],
                Verdict::reject(
                    Code::InvalidRecipient,
                    "invalid recipient alice: the sender cannot be a recipient",
                    json!({"recipientId": "alice", "reason": "the sender cannot be a recipient"}),
                ),
            ),
            (
                json!({"conversationId": c, "recipientIds": ["bob", "erin"]}),
                Some(&open),
                &[],
                Verdict::reject(
                    Code::InvalidRecipient,
                    "invalid recipient erin: not an active member of the conversation",
                    json!({"recipientId": "erin", "reason": "not an active member of the conversation"}),
                ),
            ),
            (
                json!({"conversationId": c, "recipientIds": ["carol", "bob"]}),
                Some(&open),
                &["bob", "carol"],
                Verdict::reject(
                    Code::UserBlocked,
                    "a block between alice and carol prevents this message",
                    json!({"userId": "alice", "otherUserId": "carol"}),
                ),
            ),
            (
                json!({"conversationId": c}),
                Some(&open),
                &["dave", "carol", "bob"],
                Verdict::reject(
                    Code::UserBlocked,
                    "a block between alice and bob prevents this message",
                    json!({"userId": "alice", "otherUserId": "bob"}),
                ),
            ),
        ];
        for (request, conv, blocks, expected) in cases {
            assert_eq!(
                verdict(request.clone(), conv, blocks),
                expected,
                "{request}"
            );
        }
    }

    #[test]
    fn a_block_is_refused_only_when_it_leaves_no_recipient() {
        let group = conversation(true, &["alice", "bob", "carol"]);
        let direct = Conversation {
            kind: "direct".into(),
            ..conversation(true, &["alice", "carol"])
        };
        let to = |recipients: Value| json!({"conversationId": "c", "recipientIds": recipients});
        // In a group the others still hear the sender (the gateway leaves carol out)...
        assert_eq!(code(json!({}), Some(&group), &["carol"]), None);
        assert_eq!(
            code(to(json!(["bob", "carol"])), Some(&group), &["carol"]),
            None
        );
        // ...but naming only people the sender is kept apart from reaches nobody.
        assert_eq!(
            code(to(json!(["carol"])), Some(&group), &["carol"]),
            Some("USER_BLOCKED")
        );
        assert_eq!(
            code(json!({}), Some(&group), &["bob", "carol"]),
            Some("USER_BLOCKED")
        );
        // A direct message across a block has nobody else to go to.
        assert_eq!(
            code(json!({}), Some(&direct), &["carol"]),
            Some("USER_BLOCKED")
        );
        // A group with nobody else in it was empty before any block.
        let alone = conversation(true, &["alice"]);
        assert_eq!(code(json!({}), Some(&alone), &["carol"]), None);
    }

    #[test]
    fn passes_over_what_the_native_check_passes_over() {
        let open = conversation(true, &["alice", "bob"]);
        // A non-string senderId or recipient, a non-array recipientIds: schema's business.
        assert_eq!(code(json!({"senderId": 5}), Some(&open), &[]), None);
        assert_eq!(
            code(json!({"recipientIds": [1, "bob"]}), Some(&open), &[]),
            None
        );
        // recipientIds that is not an array counts as absent: every member is a recipient.
        assert_eq!(
            code(json!({"recipientIds": "bob"}), Some(&open), &["bob"]),
            Some("USER_BLOCKED")
        );
        // Explicit recipients limit the block check to them.
        let three = conversation(true, &["alice", "bob", "carol"]);
        assert_eq!(
            code(json!({"recipientIds": ["bob"]}), Some(&three), &["carol"]),
            None
        );
        // A block with someone outside the conversation does not matter.
        assert_eq!(code(json!({}), Some(&open), &["mallory"]), None);
        // A request that is not an object has no fields.
        assert_eq!(code(json!([1]), None, &[]), Some("CONVERSATION_NOT_FOUND"));
        // The sender blocking themself is not a block with a recipient.
        assert_eq!(code(json!({}), Some(&open), &["alice"]), None);
    }
}
