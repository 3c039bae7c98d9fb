//! Policies on trial: their counts, and the decision samples they leave.
//!
//! A candidate (`hotpath policy push --mode shadow|canary`) is evaluated beside the chain;
//! where its verdict differs from the enforcing chain's, the gateway records a
//! [`DecisionSample`]: ids, lengths and the content type of the send, its content only when
//! the operator opted in for that policy. Samples are bounded twice: at most
//! [`SAMPLES_PER_SEC`] per candidate per gateway (more differences are only counted), and a
//! queue of [`SAMPLE_QUEUE`] to the task that publishes them (full: the sample is dropped and
//! counted), so neither a noisy candidate nor a slow NATS can hold a send up.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_nats::Client;
use chrono::{DateTime, Utc};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use hotpath_core::policy_store::{
    Candidate, DecisionSample, Mode, PolicyCounts, SampledVerdict, decisions_subject,
};
use hotpath_policy_host::Policy;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::metrics::PolicyMetrics;

/// The most decision samples one candidate leaves per second on one gateway.
pub const SAMPLES_PER_SEC: u32 = 20;
/// Samples waiting to be published.
pub const SAMPLE_QUEUE: usize = 1024;
/// The most characters of an id (conversation, client message, content type) a sample keeps.
pub const MAX_ID_CHARS: usize = 128;

/// A candidate, compiled, with its counts and its sampling budget.
pub struct OnTrial {
    pub candidate: Candidate,
    pub policy: Policy,
    pub counts: Arc<Counts>,
    pub samples: Arc<DefaultDirectRateLimiter>,
}

impl OnTrial {
    pub fn new(candidate: Candidate, policy: Policy, counts: Arc<Counts>) -> OnTrial {
        let quota = Quota::per_second(NonZeroU32::new(SAMPLES_PER_SEC).unwrap_or(NonZeroU32::MIN));
        OnTrial {
            candidate,
            policy,
            counts,
            samples: Arc::new(RateLimiter::direct(quota)),
        }
    }
}

/// What one policy decided since its activation on this gateway.
#[derive(Debug, Default)]
pub struct Counts {
    evaluated: AtomicU64,
    rejected: AtomicU64,
    failed: AtomicU64,
    enforced: AtomicU64,
    differed: AtomicU64,
}

impl Counts {
    pub fn evaluated(&self) {
        self.evaluated.fetch_add(1, Ordering::Relaxed);
    }
    pub fn rejected(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }
    pub fn failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }
    pub fn enforced(&self) {
        self.enforced.fetch_add(1, Ordering::Relaxed);
    }
    pub fn differed(&self) {
        self.differed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(
        &self,
        name: &str,
        digest: &str,
        mode: Mode,
        activated_at: DateTime<Utc>,
    ) -> PolicyCounts {
        PolicyCounts {
            name: name.to_string(),
            digest: digest.to_string(),
            mode,
            activated_at: Some(activated_at),
            evaluated: self.evaluated.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            enforced: self.enforced.load(Ordering::Relaxed),
            differed: self.differed.load(Ordering::Relaxed),
        }
    }
}

/// The two verdicts of a send that differed: `None` is allow, else the rejection's code.
pub struct Verdicts {
    pub enforced: Option<&'static str>,
    pub candidate: Option<&'static str>,
}

fn sampled(verdict: Option<&str>) -> SampledVerdict {
    match verdict {
        None => SampledVerdict {
            verdict: "allow".into(),
            code: None,
        },
        Some(code) => SampledVerdict {
            verdict: "reject".into(),
            code: Some(code.to_string()),
        },
    }
}

/// The request path's end of the sample queue.
#[derive(Clone)]
pub struct DecisionSink {
    gateway: String,
    queue: mpsc::Sender<DecisionSample>,
    metrics: PolicyMetrics,
}

impl DecisionSink {
    /// The sink, and the task that publishes what it is given to NATS until shutdown.
    pub fn start(
        nats: Client,
        gateway: String,
        metrics: PolicyMetrics,
        shutdown: CancellationToken,
    ) -> DecisionSink {
        let (queue, mut samples) = mpsc::channel::<DecisionSample>(SAMPLE_QUEUE);
        let published = metrics.clone();
        tokio::spawn(async move {
            loop {
                let sample = tokio::select! {
                    sample = samples.recv() => match sample {
                        Some(sample) => sample,
                        None => return,
                    },
                    () = shutdown.cancelled() => return,
                };
                let Ok(payload) = serde_json::to_vec(&sample) else {
                    continue;
                };
                // A core publish: the stream POLICY_DECISIONS captures the subject. A sample is
                // an aid to the operator, not data the system owes anyone.
                match nats
                    .publish(decisions_subject(&sample.policy), payload.into())
                    .await
                {
                    Ok(()) => published.sample(&sample.policy, "published"),
                    Err(error) => {
                        tracing::debug!(%error, "decision sample not published");
                        published.sample(&sample.policy, "dropped");
                    }
                }
            }
        });
        DecisionSink {
            gateway,
            queue,
            metrics,
        }
    }

    /// Records one differing decision of `trial` on a send of `user_id`, within its budget.
    pub fn sample(&self, trial: &OnTrial, user_id: &str, request: &Value, verdicts: Verdicts) {
        let name = &trial.candidate.name;
        if trial.samples.check().is_err() {
            self.metrics.sample(name, "over_budget");
            return;
        }
        let text = |field: &str| request.get(field).and_then(Value::as_str);
        // Ids are the client's strings: kept, but never more than a short prefix of one.
        let id = |field: &str| text(field).map(|s| s.chars().take(MAX_ID_CHARS).collect());
        let content = text("content");
        let sample = DecisionSample {
            policy: name.clone(),
            digest: trial.candidate.digest.clone(),
            mode: trial.candidate.mode,
            gateway: self.gateway.clone(),
            at: Utc::now(),
            user_id: user_id.to_string(),
            conversation_id: id("conversationId"),
            client_message_id: id("clientMessageId"),
            content_type: id("contentType"),
            content_chars: content.map(|c| c.chars().count()),
            enforced: sampled(verdicts.enforced),
            candidate: sampled(verdicts.candidate),
            content: content
                .filter(|_| trial.candidate.sample_content)
                .map(str::to_string),
        };
        if self.queue.try_send(sample).is_err() {
            self.metrics.sample(name, "dropped");
        }
    }
}
