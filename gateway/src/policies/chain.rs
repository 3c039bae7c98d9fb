//! Running the active chain for one request, with the policies on trial beside it.

use std::collections::HashSet;
use std::time::Instant;

use chrono::{DateTime, Utc};
use hotpath_core::policy_store::Mode;
use hotpath_core::rejection::Rejection;
use hotpath_policy_host::{ConversationInput, Decision, Evaluation, Policy, input_json};
use serde_json::Value;

use super::metrics::PolicyMetrics;
use super::trial::{Counts, DecisionSink, OnTrial, Verdicts};
use crate::facts::ConversationFacts;

/// The policies in force, in order, the candidates on trial, and the chain version they came
/// from.
#[derive(Default)]
pub struct ActiveChain {
    pub version: u64,
    pub policies: Vec<Enforcing>,
    pub candidates: Vec<OnTrial>,
    /// Where differing decisions of candidates go (none in a gateway without NATS, as in
    /// unit tests).
    pub samples: Option<DecisionSink>,
}

/// A policy of the chain and what it decided since it was activated.
pub struct Enforcing {
    pub policy: Policy,
    pub activated_at: DateTime<Utc>,
    pub counts: std::sync::Arc<Counts>,
}

/// One step of a send's enforcing chain: a chain policy, or a canary in its place.
struct Step<'a> {
    policy: &'a Policy,
    counts: &'a Counts,
    canary: bool,
}

impl ActiveChain {
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The enforcing chain of a send: each policy, or the canary of the same name where the
    /// canary enforces for this sender, then the new canaries that do. `enforces[i]`: whether
    /// candidate `i` enforces for this sender (its hash is computed once per send). Allocates
    /// nothing.
    fn steps<'a>(&'a self, enforces: &'a [bool]) -> impl Iterator<Item = Step<'a>> {
        let canaries = move || {
            self.candidates
                .iter()
                .zip(enforces)
                .filter(|(_, enforcing)| **enforcing)
                .map(|(candidate, _)| candidate)
        };
        let chain = self.policies.iter().map(move |entry| {
            match canaries().find(|c| c.candidate.name == entry.policy.name()) {
                Some(c) => Step {
                    policy: &c.policy,
                    counts: &c.counts,
                    canary: true,
                },
                None => Step {
                    policy: &entry.policy,
                    counts: &entry.counts,
                    canary: false,
                },
            }
        });
        let new = canaries()
            .filter(|c| {
                !self
                    .policies
                    .iter()
                    .any(|p| p.policy.name() == c.candidate.name)
            })
            .map(|c| Step {
                policy: &c.policy,
                counts: &c.counts,
                canary: true,
            });
        chain.chain(new)
    }

    /// Runs every policy in order; the first rejection wins. Returns the request as the last
    /// normalising policy left it (`None`: unchanged). Then every candidate that does not
    /// enforce for this sender is evaluated on what the chain saw last, and only counted
    /// (and sampled where it would have answered otherwise): it never changes the answer.
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
        let mut outcome = Ok(());
        // Empty (and so no allocation) without candidates.
        let enforces: Vec<bool> = self
            .candidates
            .iter()
            .map(|c| c.candidate.enforces_for(user_id))
            .collect();
        for step in self.steps(&enforces) {
            step.counts.evaluated();
            if step.canary {
                step.counts.enforced();
            }
            let started = Instant::now();
            let evaluation = step.policy.evaluate(&input);
            metrics.evaluated(step.policy.name(), started.elapsed());
            if let Evaluation::Failed(failure) = &evaluation {
                tracing::warn!(policy = step.policy.name(), digest = step.policy.digest(), %failure, "policy failed");
                metrics.failed(step.policy.name(), failure.kind.as_str());
                step.counts.failed();
            }
            match evaluation.decide(step.policy) {
                Decision::Allow => metrics.verdict(step.policy.name(), "allow"),
                Decision::AllowNormalized(value) => {
                    metrics.verdict(step.policy.name(), "allow");
                    input = input_for(&value);
                    normalized = Some(value);
                }
                Decision::Reject(rejection) => {
                    metrics.verdict(step.policy.name(), rejection.code());
                    step.counts.rejected();
                    outcome = Err(rejection);
                    break;
                }
            }
        }
        let enforced = match &outcome {
            Ok(()) => None,
            Err(rejection) => Some(rejection.code()),
        };
        for (candidate, enforcing) in self.candidates.iter().zip(&enforces) {
            if !enforcing {
                self.shadow(
                    metrics,
                    candidate,
                    &input,
                    user_id,
                    normalized.as_ref().unwrap_or(request),
                    enforced,
                );
            }
        }
        outcome.map(|()| normalized)
    }

    /// Evaluates `candidate` in shadow on `input`: counted, timed, sampled when its verdict
    /// differs from the enforced one (`None`: allowed).
    fn shadow(
        &self,
        metrics: &PolicyMetrics,
        candidate: &OnTrial,
        input: &[u8],
        user_id: &str,
        request: &Value,
        enforced: Option<&'static str>,
    ) {
        let name = candidate.policy.name();
        candidate.counts.evaluated();
        let started = Instant::now();
        let evaluation = candidate.policy.evaluate(input);
        metrics.shadow_evaluated(name, started.elapsed());
        if let Evaluation::Failed(failure) = &evaluation {
            metrics.shadow_failed(name, failure.kind.as_str());
            candidate.counts.failed();
        }
        let would = match evaluation.decide(&candidate.policy) {
            Decision::Allow | Decision::AllowNormalized(_) => None,
            Decision::Reject(rejection) => Some(rejection.code()),
        };
        metrics.shadow_verdict(name, would.unwrap_or("allow"));
        if would.is_some() {
            candidate.counts.rejected();
        }
        if would != enforced {
            candidate.counts.differed();
            if let Some(sink) = &self.samples {
                sink.sample(
                    candidate,
                    user_id,
                    request,
                    Verdicts {
                        enforced,
                        candidate: would,
                    },
                );
            }
        }
    }

    /// What each policy and candidate decided, for the gateway's status report.
    pub fn counts(&self) -> Vec<hotpath_core::policy_store::PolicyCounts> {
        let enforcing = self.policies.iter().map(|entry| {
            entry.counts.snapshot(
                entry.policy.name(),
                entry.policy.digest(),
                Mode::Enforce,
                entry.activated_at,
            )
        });
        let candidates = self.candidates.iter().map(|c| {
            c.counts.snapshot(
                &c.candidate.name,
                &c.candidate.digest,
                c.candidate.mode,
                c.candidate.activated_at,
            )
        });
        enforcing.chain(candidates).collect()
    }
}
