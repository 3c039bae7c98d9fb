//! The `authz` check: the seed authorizer's rules, against the cached facts.
//!
//! Order matters and follows the seed: spoofed sender, then the conversation exists, is
//! active, the sender is an active member, every recipient is an active member, and no block
//! stands between the sender and a recipient.

use hotpath_core::rejection::Rejection;
use serde_json::Value;

use super::{Check, CheckInput, Verdict};

pub struct Authz;

impl Check for Authz {
    fn name(&self) -> &str {
        "authz"
    }

    fn evaluate(&self, input: &CheckInput<'_>) -> Verdict {
        match authorize(input) {
            Ok(()) => Verdict::Allow,
            Err(rejection) => Verdict::Reject(rejection),
        }
    }
}

fn authorize(input: &CheckInput<'_>) -> Result<(), Rejection> {
    let request = input.request;
    if let Some(Value::String(claimed)) = request.get("senderId")
        && claimed != input.user_id
    {
        return Err(Rejection::Forbidden {
            reason: "senderId must be the authenticated user".into(),
        });
    }

    let conversation_id = request
        .get("conversationId")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let Some(conversation) = input.conversation else {
        return Err(Rejection::ConversationNotFound {
            conversation_id: conversation_id.into(),
        });
    };
    if !conversation.is_active {
        return Err(Rejection::ConversationInactive {
            conversation_id: conversation_id.into(),
        });
    }
    if !conversation.active_members.contains(input.user_id) {
        return Err(Rejection::NotConversationMember {
            user_id: input.user_id.into(),
            conversation_id: conversation_id.into(),
        });
    }

    let explicit = request.get("recipientIds").and_then(Value::as_array);
    if let Some(recipients) = explicit {
        for recipient in recipients.iter().filter_map(Value::as_str) {
            if recipient == input.user_id {
                return Err(Rejection::InvalidRecipient {
                    recipient_id: recipient.into(),
                    reason: "the sender cannot be a recipient".into(),
                });
            }
            if !conversation.active_members.contains(recipient) {
                return Err(Rejection::InvalidRecipient {
                    recipient_id: recipient.into(),
                    reason: "not an active member of the conversation".into(),
                });
            }
        }
    }

    let blocked = |recipient: &str| input.sender_blocks.contains(recipient);
    let hit = match explicit {
        Some(recipients) => recipients
            .iter()
            .filter_map(Value::as_str)
            .find(|r| blocked(r)),
        None => conversation
            .active_members
            .iter()
            .map(String::as_str)
            .filter(|m| *m != input.user_id)
            .find(|m| blocked(m)),
    };
    if let Some(other) = hit {
        return Err(Rejection::UserBlocked {
            user_id: input.user_id.into(),
            other_user_id: other.into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashSet};

    use serde_json::json;
    use uuid::Uuid;

    use super::*;
    use crate::facts::ConversationFacts;

    fn conversation(active: bool, members: &[&str]) -> ConversationFacts {
        ConversationFacts {
            id: Uuid::nil(),
            kind: "group".into(),
            is_active: active,
            active_members: members
                .iter()
                .map(|m| m.to_string())
                .collect::<BTreeSet<_>>(),
        }
    }

    fn code(
        request: Value,
        conv: Option<&ConversationFacts>,
        blocks: &[&str],
    ) -> Option<&'static str> {
        let blocks: HashSet<String> = blocks.iter().map(|b| b.to_string()).collect();
        let input = CheckInput {
            user_id: "alice",
            request: &request,
            conversation: conv,
            sender_blocks: &blocks,
        };
        authorize(&input).err().map(|r| r.code())
    }

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
}
