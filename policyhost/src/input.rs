//! The ABI's input JSON (`policies/ABI.md`, "Input").

use serde::Serialize;
use serde_json::Value;

use crate::ABI_VERSION;

/// The conversation a request names, as a policy sees it.
#[derive(Debug, Clone)]
pub struct ConversationInput<'a> {
    pub id: &'a str,
    /// `"direct"`, `"group"`...: the ABI's `type`.
    pub kind: &'a str,
    pub is_active: bool,
    /// The active members, in any order ([`input_json`] sorts them).
    pub members: Vec<&'a str>,
}

/// Builds the input of one evaluation. `members` and `sender_blocks` are sorted here, whatever
/// order they come in, so the same facts always make the same bytes: the ABI promises a policy
/// a deterministic input, which is what makes its test vectors meaningful.
pub fn input_json<'a>(
    user_id: &str,
    request: &Value,
    conversation: Option<ConversationInput<'_>>,
    sender_blocks: impl IntoIterator<Item = &'a str>,
) -> Vec<u8> {
    let mut blocks: Vec<&str> = sender_blocks.into_iter().collect();
    blocks.sort_unstable();
    let conversation = conversation.map(|mut c| {
        c.members.sort_unstable();
        Conversation {
            id: c.id,
            kind: c.kind,
            is_active: c.is_active,
            members: c.members,
        }
    });
    let input = Input {
        abi_version: ABI_VERSION,
        user: User { id: user_id },
        request,
        facts: Facts {
            conversation,
            sender_blocks: blocks,
        },
    };
    // Serialising strings, booleans and a `Value` (whose keys are strings) cannot fail.
    serde_json::to_vec(&input).expect("the input is always serialisable")
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Input<'a> {
    abi_version: i32,
    user: User<'a>,
    request: &'a Value,
    facts: Facts<'a>,
}

#[derive(Serialize)]
struct User<'a> {
    id: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Facts<'a> {
    conversation: Option<Conversation<'a>>,
    sender_blocks: Vec<&'a str>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Conversation<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    is_active: bool,
    members: Vec<&'a str>,
}
