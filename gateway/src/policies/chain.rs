//! Running the active chain for one request.

use std::collections::HashSet;
use std::time::Instant;

use hotpath_core::rejection::Rejection;
use hotpath_policy_host::{ConversationInput, Decision, Evaluation, Policy, input_json};
use serde_json::Value;

use super::metrics::PolicyMetrics;
use crate::facts::ConversationFacts;

/// The policies in force, in order, and the chain version they came from.
#[derive(Default)]
pub struct ActiveChain {
    pub version: u64,
    pub policies: Vec<Policy>,
}

impl ActiveChain {
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// Runs every policy in order; the first rejection wins. Returns the request as the last
    /// normalising policy left it (`None`: unchanged).
    ///
    /// Evaluation runs on the calling task: a policy takes microseconds, and a misbehaving one
    /// is stopped at the host's deadline (10 ms), so this never blocks the runtime for long.
    pub fn run(
        &self,
        metrics: &PolicyMetrics,
        user_id: &str,
        request: &Value,
        conversation: Option<&ConversationFacts>,
        sender_blocks: &HashSet<String>,
    ) -> Result<Option<Value>, Rejection> {
        let conversation_id = conversation.map(|c| c.id.to_string());
        let input_for = |request: &Value| {
            let facts =
                conversation
                    .zip(conversation_id.as_deref())
                    .map(|(c, id)| ConversationInput {
                        id,
                        kind: c.kind.as_str(),
                        is_active: c.is_active,
                        members: c.active_members.iter().map(String::as_str).collect(),
                    });
            input_json(
                user_id,
                request,
                facts,
                sender_blocks.iter().map(String::as_str),
            )
        };
        // Written once, and again only after a policy rewrote the request.
        let mut input = input_for(request);
        let mut normalized: Option<Value> = None;
        for policy in &self.policies {
            let started = Instant::now();
            let evaluation = policy.evaluate(&input);
            metrics.evaluated(policy.name(), started.elapsed());
            if let Evaluation::Failed(failure) = &evaluation {
                tracing::warn!(policy = policy.name(), digest = policy.digest(), %failure, "policy failed");
                metrics.failed(policy.name(), failure.kind.as_str());
            }
            match evaluation.decide(policy) {
                Decision::Allow => metrics.verdict(policy.name(), "allow"),
                Decision::AllowNormalized(value) => {
                    metrics.verdict(policy.name(), "allow");
                    input = input_for(&value);
                    normalized = Some(value);
                }
                Decision::Reject(rejection) => {
                    metrics.verdict(policy.name(), rejection.code());
                    return Err(rejection);
                }
            }
        }
        Ok(normalized)
    }
}
