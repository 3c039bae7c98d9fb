//! Keeping the gateway's chain equal to the one in NATS.
//!
//! On every change of the chain key: fetch each module by digest (compiled modules are kept, so
//! only new digests compile), compile it off the request path, run its test vectors, and only
//! when every policy of the new chain passes, swap the whole chain in at once. A chain that
//! fails anywhere is refused: the old chain keeps serving, and the refusal is logged, counted
//! and reported under this gateway's key in `POLICY_STATUS` (shown by `hotpath policy list`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use chrono::Utc;
use futures::StreamExt;
use hotpath_core::policy_store::{Chain, ChainEntry, GatewayStatus, PolicyStore};
use hotpath_policy_host::{OnError, Policy, PolicyEngine, run_vectors};
use tokio_util::sync::CancellationToken;

use super::chain::ActiveChain;
use super::metrics::PolicyMetrics;

/// A compiled module is reusable for the same (name, digest, on_error).
type CompiledKey = (String, String, String);

#[derive(Clone)]
pub struct PolicySync {
    engine: PolicyEngine,
    store: PolicyStore,
    active: Arc<ArcSwap<ActiveChain>>,
    metrics: PolicyMetrics,
    gateway_id: String,
    /// Compiled and self-tested modules by (name, digest, on_error).
    compiled: Arc<Mutex<HashMap<CompiledKey, Policy>>>,
}

impl PolicySync {
    pub fn new(
        engine: PolicyEngine,
        store: PolicyStore,
        active: Arc<ArcSwap<ActiveChain>>,
        metrics: PolicyMetrics,
        gateway_id: String,
    ) -> PolicySync {
        PolicySync {
            engine,
            store,
            active,
            metrics,
            gateway_id,
            compiled: Arc::default(),
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
            Ok(policies) => {
                let names: Vec<&str> = policies.iter().map(Policy::name).collect();
                tracing::info!(version = chain.version, policies = ?names, "policy chain swapped in");
                self.metrics.swapped(chain.version, &names);
                self.active.store(Arc::new(ActiveChain {
                    version: chain.version,
                    policies,
                }));
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

    /// Every policy of `chain`, compiled and self-tested.
    async fn prepare(&self, chain: &Chain) -> anyhow::Result<Vec<Policy>> {
        let mut policies = Vec::with_capacity(chain.policies.len());
        for entry in &chain.policies {
            policies.push(
                self.policy(entry)
                    .await
                    .with_context(|| format!("policy {}", entry.name))?,
            );
        }
        Ok(policies)
    }

    async fn policy(&self, entry: &ChainEntry) -> anyhow::Result<Policy> {
        let on_error = match entry.on_error.as_str() {
            "allow" => OnError::Allow,
            _ => OnError::Deny,
        };
        let key = (
            entry.name.clone(),
            entry.digest.clone(),
            entry.on_error.clone(),
        );
        if let Some(policy) = self.cached(&key) {
            return Ok(policy);
        }
        let bytes = self.store.module(&entry.digest).await?;
        let vectors = self.store.vectors(&entry.digest).await?;
        let engine = self.engine.clone();
        let name = entry.name.clone();
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
        let running = self
            .active
            .load()
            .policies
            .iter()
            .map(|p| (p.name().to_string(), p.digest().to_string()))
            .collect();
        let status = GatewayStatus {
            gateway: self.gateway_id.clone(),
            updated_at: Utc::now(),
            chain_version: chain.version,
            state: state.to_string(),
            reason,
            running,
        };
        if let Err(error) = self.store.report(&status).await {
            tracing::warn!(%error, "could not report policy status");
        }
    }
}
