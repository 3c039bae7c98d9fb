//! Keeping the gateway's chain equal to the one in NATS.
//!
//! On every change of the chain key: fetch each module by digest (compiled modules are kept, so
//! only new digests compile), compile it off the request path, run its test vectors, and only
//! when every policy of the new chain passes, swap the whole chain in at once. A chain that
//! fails anywhere is refused: the old chain keeps serving, and the refusal is logged, counted
//! and reported under this gateway's key in `POLICY_STATUS` (shown by `hotpath policy list`).
//! Candidates (shadow, canary) are compiled and self-tested the same way and swap in with the
//! chain. What each policy decided since its activation is counted (counts survive swaps that
//! leave the policy as it was) and reported every [`COUNTS_EVERY`] while it changes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use chrono::DateTime;
use chrono::Utc;
use futures::StreamExt;
use hotpath_core::policy_store::{Chain, GatewayStatus, Mode, PolicyStore};
use hotpath_policy_host::{OnError, Policy, PolicyEngine, run_vectors};
use tokio_util::sync::CancellationToken;

use super::chain::{ActiveChain, Enforcing};
use super::metrics::PolicyMetrics;
use super::trial::{Counts, DecisionSink, OnTrial};

/// A compiled module is reusable for the same (name, digest, on_error).
type CompiledKey = (String, String, String);
/// Counts belong to one activation: (name, digest, mode, activated at).
type CountsKey = (String, String, Mode, DateTime<Utc>);
/// A report to repeat: (chain version, state, reason).
type LastReport = (u64, String, Option<String>);

/// How often the counts are reported while they change.
pub const COUNTS_EVERY: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct PolicySync {
    engine: PolicyEngine,
    store: PolicyStore,
    active: Arc<ArcSwap<ActiveChain>>,
    metrics: PolicyMetrics,
    gateway_id: String,
    /// Compiled and self-tested modules by (name, digest, on_error).
    compiled: Arc<Mutex<HashMap<CompiledKey, Policy>>>,
    /// The counts of every activation in the chain now.
    counts: Arc<Mutex<HashMap<CountsKey, Arc<Counts>>>>,
    samples: Option<DecisionSink>,
    /// The last report (chain version, state, reason), repeated with fresh counts.
    last: Arc<Mutex<Option<LastReport>>>,
}

impl PolicySync {
    pub fn new(
        engine: PolicyEngine,
        store: PolicyStore,
        active: Arc<ArcSwap<ActiveChain>>,
        metrics: PolicyMetrics,
        gateway_id: String,
        samples: Option<DecisionSink>,
    ) -> PolicySync {
        PolicySync {
            engine,
            store,
            active,
            metrics,
            gateway_id,
            compiled: Arc::default(),
            counts: Arc::default(),
            samples,
            last: Arc::default(),
        }
    }

    /// Loads the chain as it is now (so a gateway is ready only with its policies), then
    /// follows changes until shutdown.
    pub async fn start(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut changes = Box::pin(self.store.watch_chain().await?);
        // The watch begins with the current value, if there is one.
        if let Ok(Some(first)) = tokio::time::timeout(Duration::from_secs(2), changes.next()).await
        {
            self.apply(first).await;
        }
        tokio::spawn(self.clone().report_counts(shutdown.clone()));
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    change = changes.next() => match change {
                        Some(chain) => self.apply(chain).await,
                        None => {
                            tracing::warn!("policy chain watch ended; resubscribing");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            match self.store.watch_chain().await {
                                Ok(watch) => changes = Box::pin(watch),
                                Err(error) => tracing::warn!(%error, "cannot watch the policy chain"),
                            }
                        }
                    },
                    () = shutdown.cancelled() => return,
                }
            }
        });
        Ok(())
    }

    async fn apply(&self, chain: Chain) {
        let current = self.active.load();
        if chain.version != 0 && chain.version == current.version {
            return;
        }
        match self.prepare(&chain).await {
            Ok((policies, candidates)) => {
                let names: Vec<&str> = policies.iter().map(|e| e.policy.name()).collect();
                let trials: Vec<String> = candidates
                    .iter()
                    .map(|c| {
                        format!(
                            "{} ({} {}%)",
                            c.candidate.name,
                            c.candidate.mode.as_str(),
                            c.candidate.percent
                        )
                    })
                    .collect();
                tracing::info!(version = chain.version, policies = ?names, candidates = ?trials, "policy chain swapped in");
                self.metrics.swapped(chain.version, &names);
                self.active.store(Arc::new(ActiveChain {
                    version: chain.version,
                    policies,
                    candidates,
                    samples: self.samples.clone(),
                }));
                self.forget_what_left_the_chain();
                self.report(&chain, "active", None).await;
            }
            Err(error) => {
                let reason = format!("{error:#}");
                tracing::error!(version = chain.version, %reason, "policy chain refused; keeping the current one");
                self.metrics.refused();
                self.report(&chain, "refused", Some(reason)).await;
            }
        }
    }

    /// Every policy and candidate of `chain`, compiled and self-tested.
    async fn prepare(&self, chain: &Chain) -> anyhow::Result<(Vec<Enforcing>, Vec<OnTrial>)> {
        let mut policies = Vec::with_capacity(chain.policies.len());
        for entry in &chain.policies {
            let policy = self
                .policy(&entry.name, &entry.digest, &entry.on_error)
                .await
                .with_context(|| format!("policy {}", entry.name))?;
            let counts = self.counts_of((
                entry.name.clone(),
                entry.digest.clone(),
                Mode::Enforce,
                entry.activated_at,
            ));
            policies.push(Enforcing {
                policy,
                activated_at: entry.activated_at,
                counts,
            });
        }
        let mut candidates = Vec::with_capacity(chain.candidates.len());
        for candidate in &chain.candidates {
            let policy = self
                .policy(&candidate.name, &candidate.digest, &candidate.on_error)
                .await
                .with_context(|| format!("candidate {}", candidate.name))?;
            let counts = self.counts_of((
                candidate.name.clone(),
                candidate.digest.clone(),
                candidate.mode,
                candidate.activated_at,
            ));
            candidates.push(OnTrial::new(candidate.clone(), policy, counts));
        }
        Ok((policies, candidates))
    }

    fn counts_of(&self, key: CountsKey) -> Arc<Counts> {
        match self.counts.lock() {
            Ok(mut counts) => counts.entry(key).or_default().clone(),
            Err(_) => Arc::default(),
        }
    }

    /// Forgets the counts of activations, and the compiled modules, no longer in the chain
    /// (a module pushed again, or rolled back to, is compiled again: off the request path), so
    /// neither grows with every push.
    fn forget_what_left_the_chain(&self) {
        let active = self.active.load();
        let current: Vec<CountsKey> = active
            .counts()
            .into_iter()
            .filter_map(|c| Some((c.name, c.digest, c.mode, c.activated_at?)))
            .collect();
        if let Ok(mut counts) = self.counts.lock() {
            counts.retain(|key, _| current.contains(key));
        }
        let modules: Vec<(&str, &str)> = active
            .policies
            .iter()
            .map(|e| (e.policy.name(), e.policy.digest()))
            .chain(
                active
                    .candidates
                    .iter()
                    .map(|c| (c.candidate.name.as_str(), c.candidate.digest.as_str())),
            )
            .collect();
        if let Ok(mut compiled) = self.compiled.lock() {
            compiled
                .retain(|(name, digest, _), _| modules.contains(&(name.as_str(), digest.as_str())));
        }
    }

    async fn policy(&self, name: &str, digest: &str, on_error: &str) -> anyhow::Result<Policy> {
        let key = (name.to_string(), digest.to_string(), on_error.to_string());
        let on_error = match on_error {
            "allow" => OnError::Allow,
            _ => OnError::Deny,
        };
        if let Some(policy) = self.cached(&key) {
            return Ok(policy);
        }
        let bytes = self.store.module(digest).await?;
        let vectors = self.store.vectors(digest).await?;
        let engine = self.engine.clone();
        let name = name.to_string();
        // Compiling and running vectors is CPU work: keep it off the async workers.
        let policy = tokio::task::spawn_blocking(move || -> anyhow::Result<Policy> {
            let policy = engine
                .load(&name, &bytes, on_error)
                .map_err(anyhow::Error::from)?;
            if let Some(vectors) = vectors {
                let report = run_vectors(&policy, &vectors).map_err(anyhow::Error::from)?;
                if !report.ok() {
                    let failures: Vec<String> =
                        report.failed.iter().map(ToString::to_string).collect();
                    anyhow::bail!(
                        "failed {} test vector(s): {}",
                        failures.len(),
                        failures.join("; ")
                    );
                }
            }
            Ok(policy)
        })
        .await
        .context("compiling the policy")??;
        if let Ok(mut compiled) = self.compiled.lock() {
            compiled.insert(key, policy.clone());
        }
        Ok(policy)
    }

    fn cached(&self, key: &CompiledKey) -> Option<Policy> {
        self.compiled
            .lock()
            .ok()
            .and_then(|compiled| compiled.get(key).cloned())
    }

    async fn report(&self, chain: &Chain, state: &str, reason: Option<String>) {
        if let Ok(mut last) = self.last.lock() {
            *last = Some((chain.version, state.to_string(), reason.clone()));
        }
        self.put_report(chain.version, state, reason).await;
    }

    /// Repeats the last report with fresh counts, every [`COUNTS_EVERY`] while they change.
    async fn report_counts(self, shutdown: CancellationToken) {
        let mut reported = Vec::new();
        loop {
            tokio::select! {
                () = tokio::time::sleep(COUNTS_EVERY) => {}
                () = shutdown.cancelled() => return,
            }
            let counts = self.active.load().counts();
            let last = self.last.lock().ok().and_then(|last| last.clone());
            if counts == reported {
                continue;
            }
            if let Some((version, state, reason)) = last {
                self.put_report(version, &state, reason).await;
                reported = counts;
            }
        }
    }

    async fn put_report(&self, chain_version: u64, state: &str, reason: Option<String>) {
        let active = self.active.load();
        let running = active
            .policies
            .iter()
            .map(|e| (e.policy.name().to_string(), e.policy.digest().to_string()))
            .collect();
        let status = GatewayStatus {
            gateway: self.gateway_id.clone(),
            updated_at: Utc::now(),
            chain_version,
            state: state.to_string(),
            reason,
            running,
            counts: active.counts(),
        };
        if let Err(error) = self.store.report(&status).await {
            tracing::warn!(%error, "could not report policy status");
        }
    }
}
