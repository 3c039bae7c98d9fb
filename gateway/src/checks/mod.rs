//! The ordered chain of checks every message passes before it is published.
//!
//! A check sees the request exactly as the client sent it (parsed JSON, not yet typed, so a
//! wrong type is the check's finding rather than a deserialiser's), the authenticated user, and
//! the facts the gateway holds about the conversation and the sender. It answers with a
//! [`Verdict`]. This is the interface WebAssembly policies implement: the native checks here are
//! the first two policies, `schema` and `authz`.

mod authz;
mod schema;

use std::collections::HashSet;
use std::sync::Arc;

use hotpath_core::rejection::Rejection;
use serde_json::Value;

pub use authz::Authz;
pub use schema::{
    ALLOWED_CONTENT_TYPES, MAX_CLIENT_MESSAGE_ID_CHARS, MAX_CONTENT_CHARS, MAX_RECIPIENTS, Schema,
};

use crate::facts::ConversationFacts;

/// What a check knows when it decides.
pub struct CheckInput<'a> {
    /// The authenticated sender (the token's subject).
    pub user_id: &'a str,
    /// The request body as parsed JSON.
    pub request: &'a Value,
    /// The conversation named by the request, if it exists.
    pub conversation: Option<&'a ConversationFacts>,
    /// Users the sender has blocked or is blocked by.
    pub sender_blocks: &'a HashSet<String>,
}

/// A check's answer.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    Allow,
    /// Allow, with the request rewritten (trimmed, stripped): later checks and the publish see
    /// the rewritten request.
    AllowNormalized(Value),
    Reject(Rejection),
}

pub trait Check: Send + Sync {
    /// A short stable name, used in logs and metrics.
    fn name(&self) -> &str;
    fn evaluate(&self, input: &CheckInput<'_>) -> Verdict;
}

/// Checks in order; the first rejection wins.
#[derive(Clone)]
pub struct Chain {
    checks: Arc<Vec<Box<dyn Check>>>,
}

impl Chain {
    pub fn new(checks: Vec<Box<dyn Check>>) -> Chain {
        Chain {
            checks: Arc::new(checks),
        }
    }

    /// The shipped chain: schema first (no facts needed), then authorization.
    pub fn standard() -> Chain {
        Chain::new(vec![Box::new(Schema), Box::new(Authz)])
    }

    /// Runs every check; returns the request as the last normalising check left it.
    pub fn run(&self, input: CheckInput<'_>) -> Result<Option<Value>, Rejection> {
        let mut normalized: Option<Value> = None;
        for check in self.checks.iter() {
            let request = normalized.as_ref().unwrap_or(input.request);
            let current = CheckInput { request, ..input };
            match check.evaluate(&current) {
                Verdict::Allow => {}
                Verdict::AllowNormalized(value) => normalized = Some(value),
                Verdict::Reject(rejection) => return Err(rejection),
            }
        }
        Ok(normalized)
    }
}

impl<'a> Clone for CheckInput<'a> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<'a> Copy for CheckInput<'a> {}
