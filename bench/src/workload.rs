//! What the benchmark sends: users with tokens, group conversations they belong to, and one
//! deterministic message per sequence number.
//!
//! The HTTP phases and the baselines draw from the same generator, so the raw JetStream
//! publishes and the raw inserts carry the same sizes, recipient lists and ids as the
//! messages that went through the gateway.

use anyhow::Context as _;
use chrono::Utc;
use futures::{StreamExt as _, TryStreamExt as _};
use hotpath_core::auth;
use hotpath_core::domain::{ContentType, Priority};
use hotpath_core::envelope::{ENVELOPE_VERSION, Envelope};
use hotpath_core::ids::{self, idempotency_key, message_id, request_digest};
use reqwest::header::HeaderValue;
use serde_json::{Map, Value, json};
use uuid::Uuid;

/// Length of every message's text: a typical chat line, well under the gateway's limit.
pub const CONTENT_CHARS: usize = 200;
/// Smallest group the benchmark creates (when there are enough users).
const MIN_GROUP_MEMBERS: usize = 4;
/// Largest group a gateway with the default `HOTPATH_MAX_MEMBERS` lets anyone create.
pub const MAX_GROUP_MEMBERS: usize = hotpath_core::config::DEFAULT_MAX_MEMBERS;
/// About how many conversations each user belongs to, so a user's sends spread over several.
const MEMBERSHIPS_PER_USER: usize = 3;
/// Tokens outlive any benchmark run.
const TOKEN_TTL_SECS: u64 = 86_400;
/// Conversations created at once during setup.
const CREATE_CONCURRENCY: usize = 8;

/// Sentences the message texts are built from. ASCII only, so cutting a text at any byte
/// offset leaves valid UTF-8.
const SENTENCES: [&str; 8] = [
    "Hey team, quick update on the release: staging is green and the smoke tests passed.",
    "Can someone review the pull request for the billing fix before lunch, please?",
    "I moved the planning meeting to Thursday at 10:30 because half of us are travelling.",
    "The dashboard looks slow again this morning; I am checking the database metrics now.",
    "Thanks for the help yesterday, the customer confirmed the export works for them.",
    "Reminder: the office is closed on Monday, so please plan your deploys accordingly.",
    "Does anyone know where the design notes for the new onboarding flow ended up?",
    "Lunch order is going out in ten minutes, reply here if you want to join us today.",
];

/// A benchmark user: its id, a ready `Authorization` header, and its conversations.
pub struct User {
    pub id: String,
    /// The bare token (for `/v1/ws?token=…`).
    pub token: String,
    pub authorization: HeaderValue,
    /// Indexes into [`Workload::conversations`].
    pub conversations: Vec<usize>,
}

/// A group conversation created through the API.
pub struct Conversation {
    pub id: Uuid,
    /// Every member, the creator first.
    pub members: Vec<String>,
}

/// Everything the benchmark sends, set up once per run.
pub struct Workload {
    /// Makes this run's `clientMessageId`s unique, so no send is ever an idempotent repeat of
    /// an earlier run's.
    pub run_id: String,
    pub users: Vec<User>,
    pub conversations: Vec<Conversation>,
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct GroupSizes {
    pub min: usize,
    pub max: usize,
}

/// One message: who sends what where.
pub struct Message<'a> {
    pub user: &'a User,
    /// The sender's index in [`Workload::users`].
    pub user_index: usize,
    pub conversation: &'a Conversation,
    pub client_message_id: String,
    pub content: String,
}

impl Workload {
    /// Mints tokens for `users` users `bench-u<i>` and creates `conversations` group
    /// conversations through the gateway's API.
    pub async fn set_up(
        http: &reqwest::Client,
        gateway: &str,
        secret: &[u8],
        users: usize,
        conversations: usize,
    ) -> anyhow::Result<Workload> {
        let ids: Vec<String> = (0..users).map(|i| format!("bench-u{i}")).collect();
        let tokens = ids
            .iter()
            .map(|id| auth::mint_hs256_token(secret, id, TOKEN_TTL_SECS))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let authorizations = tokens
            .iter()
            .map(|token| authorization(token))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let groups = plan_groups(users, conversations);

        let created: Vec<Uuid> = futures::stream::iter(groups.iter().map(|members| {
            let creator = &authorizations[members[0]];
            let others: Vec<&str> = members[1..].iter().map(|&u| ids[u].as_str()).collect();
            create_conversation(http, gateway, creator, others)
        }))
        .buffered(CREATE_CONCURRENCY)
        .try_collect()
        .await?;

        let mut memberships: Vec<Vec<usize>> = vec![Vec::new(); users];
        for (conversation, members) in groups.iter().enumerate() {
            for &user in members {
                memberships[user].push(conversation);
            }
        }
        let users = ids
            .into_iter()
            .zip(tokens)
            .zip(authorizations)
            .zip(memberships)
            .map(|(((id, token), authorization), conversations)| User {
                id,
                token,
                authorization,
                conversations,
            })
            .collect::<Vec<_>>();
        let conversations = created
            .into_iter()
            .zip(&groups)
            .map(|(id, members)| Conversation {
                id,
                members: members.iter().map(|&u| users[u].id.clone()).collect(),
            })
            .collect();
        Ok(Workload {
            run_id: Uuid::new_v4().simple().to_string(),
            users,
            conversations,
        })
    }

    /// Message number `seq`. Users take turns (`seq mod users`), so each sends exactly every
    /// `users`-th message: evenly spaced, never a burst that trips the per-user rate limit.
    /// Each user cycles through its own conversations.
    pub fn message(&self, seq: u64) -> Message<'_> {
        let users = self.users.len() as u64;
        let user_index = (seq % users) as usize;
        let user = &self.users[user_index];
        let turn = (seq / users) as usize;
        let conversation = &self.conversations[user.conversations[turn % user.conversations.len()]];
        Message {
            user,
            user_index,
            conversation,
            client_message_id: format!("bench-{}-{seq}", self.run_id),
            content: content(seq),
        }
    }

    /// The envelope the gateway would publish for message `seq`: same derivation of key,
    /// request digest and id, recipients = every other member, as `routes/send.rs` does.
    pub fn envelope(&self, seq: u64) -> Envelope {
        let message = self.message(seq);
        let accepted_at = Utc::now();
        let conversation_id = message.conversation.id;
        let key = idempotency_key(
            &message.user.id,
            Some(&message.client_message_id),
            &conversation_id.to_string(),
            &message.content,
            accepted_at.timestamp(),
        );
        let metadata = serde_json::Map::new();
        let digest = request_digest(&ids::Request {
            content: &message.content,
            content_type: "text",
            metadata: &metadata,
            recipient_ids: None,
            priority: "normal",
        });
        Envelope {
            version: ENVELOPE_VERSION,
            message_id: message_id(&key, &digest),
            correlation_id: Uuid::new_v4(),
            idempotency_key: key,
            conversation_id,
            sender_id: message.user.id.clone(),
            content: message.content,
            content_type: ContentType::Text,
            recipient_ids: message
                .conversation
                .members
                .iter()
                .filter(|m| **m != message.user.id)
                .cloned()
                .collect(),
            metadata,
            priority: Priority::Normal,
            accepted_at,
            request_digest: Some(digest),
        }
    }

    pub fn conversation_ids(&self) -> Vec<Uuid> {
        self.conversations.iter().map(|c| c.id).collect()
    }

    /// Smallest and largest conversation size, for the report.
    pub fn group_sizes(&self) -> GroupSizes {
        let sizes = || self.conversations.iter().map(|c| c.members.len());
        GroupSizes {
            min: sizes().min().unwrap_or(0),
            max: sizes().max().unwrap_or(0),
        }
    }
}

impl Message<'_> {
    /// The `POST /v1/messages` body.
    pub fn request_body(&self) -> Vec<u8> {
        Value::Object(self.fields()).to_string().into_bytes()
    }

    /// The WebSocket `send` frame (`docs/websocket.md`): the same body, with the frame's
    /// `type` and the `reqId` its answer will carry.
    pub fn send_frame(&self, req_id: &str) -> String {
        let mut fields = self.fields();
        fields.insert("type".into(), "send".into());
        fields.insert("reqId".into(), req_id.into());
        Value::Object(fields).to_string()
    }

    fn fields(&self) -> Map<String, Value> {
        let mut fields = Map::new();
        fields.insert(
            "conversationId".into(),
            self.conversation.id.to_string().into(),
        );
        fields.insert("content".into(), self.content.as_str().into());
        fields.insert("contentType".into(), "text".into());
        fields.insert(
            "clientMessageId".into(),
            self.client_message_id.as_str().into(),
        );
        fields
    }
}

/// Which users belong to which conversation: conversation `c` gets a run of consecutive users
/// starting at `c * users / conversations`. Runs are at least as long as the gaps between
/// their starts, so every user belongs to at least one conversation, and about
/// [`MEMBERSHIPS_PER_USER`] of them (fewer when groups hit [`MAX_GROUP_MEMBERS`]; the caller
/// makes sure `users / conversations` fits). The first member is the creator.
fn plan_groups(users: usize, conversations: usize) -> Vec<Vec<usize>> {
    let per_group = (MEMBERSHIPS_PER_USER * users.div_ceil(conversations))
        .clamp(MIN_GROUP_MEMBERS, MAX_GROUP_MEMBERS)
        .min(users);
    (0..conversations)
        .map(|c| {
            let start = c * users / conversations;
            (0..per_group).map(|j| (start + j) % users).collect()
        })
        .collect()
}

/// A text of exactly [`CONTENT_CHARS`] characters, varying with `seq`.
fn content(seq: u64) -> String {
    let mut text = String::with_capacity(CONTENT_CHARS + 100);
    let mut sentence = seq as usize;
    while text.len() < CONTENT_CHARS {
        text.push_str(SENTENCES[sentence % SENTENCES.len()]);
        text.push(' ');
        sentence += 3;
    }
    // SENTENCES are ASCII, so every byte offset is a character boundary.
    text.truncate(CONTENT_CHARS);
    text
}

fn authorization(token: &str) -> anyhow::Result<HeaderValue> {
    let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
        .context("a minted token is not a valid header value")?;
    value.set_sensitive(true);
    Ok(value)
}

/// `POST /v1/conversations` as `creator`; returns the new conversation's id.
async fn create_conversation(
    http: &reqwest::Client,
    gateway: &str,
    creator: &HeaderValue,
    others: Vec<&str>,
) -> anyhow::Result<Uuid> {
    let response = http
        .post(format!("{gateway}/v1/conversations"))
        .header(reqwest::header::AUTHORIZATION, creator.clone())
        .json(&json!({"type": "group", "members": others}))
        .send()
        .await
        .with_context(|| format!("creating a conversation at {gateway}"))?;
    let status = response.status();
    let body: Value = response
        .json()
        .await
        .context("reading the create-conversation answer")?;
    anyhow::ensure!(
        status == reqwest::StatusCode::CREATED,
        "creating a conversation answered {status}: {body}"
    );
    body["conversationId"]
        .as_str()
        .and_then(|id| Uuid::parse_str(id).ok())
        .with_context(|| format!("no conversationId in {body}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_user_belongs_to_a_group_of_distinct_members() {
        for (users, conversations) in [(80, 64), (512, 64), (2, 64), (1, 1), (2000, 2)] {
            let groups = plan_groups(users, conversations);
            assert_eq!(groups.len(), conversations);
            let mut seen = vec![false; users];
            for group in &groups {
                let distinct: std::collections::HashSet<_> = group.iter().collect();
                assert_eq!(distinct.len(), group.len(), "{users}/{conversations}");
                assert!(group.len() <= MAX_GROUP_MEMBERS);
                for &u in group {
                    seen[u] = true;
                }
            }
            assert!(seen.iter().all(|s| *s), "{users}/{conversations}");
        }
    }

    #[test]
    fn contents_are_ascii_and_of_fixed_length() {
        assert!(SENTENCES.iter().all(|s| s.is_ascii()));
        for seq in 0..20 {
            assert_eq!(content(seq).len(), CONTENT_CHARS);
        }
        assert_ne!(content(0), content(1));
    }
}
