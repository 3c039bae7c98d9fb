//! Where policies live in NATS, shared by every gateway and the `hotpath policy` command.
//!
//! * Module bytes (and their test vectors) sit in the object store `POLICY_MODULES`, named by
//!   the SHA-256 digest of the module, so a digest always means the same code.
//! * The active chain is one key, `active`, in the KV bucket `POLICY_CHAIN`: the ordered list of
//!   policies (name → digest, on-error behaviour, when activated, the digests it replaced).
//!   Every gateway watches it; a change is a swap. Updates use compare-and-set on the key's
//!   revision, so two concurrent pushes cannot lose one another.
//! * Each gateway reports what it actually runs (or refused, and why) under its own key in the
//!   KV bucket `POLICY_STATUS`, which expires keys of gateways that stopped reporting.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, kv, object_store};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

pub const MODULES_BUCKET: &str = "POLICY_MODULES";
pub const CHAIN_BUCKET: &str = "POLICY_CHAIN";
pub const STATUS_BUCKET: &str = "POLICY_STATUS";
pub const CHAIN_KEY: &str = "active";

/// The active chain, in evaluation order.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Chain {
    /// Bumped on every change.
    pub version: u64,
    pub updated_at: Option<DateTime<Utc>>,
    pub policies: Vec<ChainEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChainEntry {
    pub name: String,
    pub digest: String,
    /// `deny` (fail-closed, the default) or `allow`: what a policy failure means.
    pub on_error: String,
    pub activated_at: DateTime<Utc>,
    /// Digests this entry replaced, oldest first; `rollback` goes back to the last one.
    #[serde(default)]
    pub previous: Vec<String>,
}

/// What one gateway runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayStatus {
    pub gateway: String,
    pub updated_at: DateTime<Utc>,
    /// The chain version this report is about.
    pub chain_version: u64,
    /// `active` when the gateway runs exactly that chain, `refused` when it kept its old one.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// name → digest of what the gateway runs now.
    pub running: Vec<(String, String)>,
}

/// SHA-256 hex of a module's bytes: its name in the store.
pub fn digest(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[derive(Clone)]
pub struct PolicyStore {
    modules: object_store::ObjectStore,
    chain: kv::Store,
    status: kv::Store,
}

fn modules_config(replicas: usize) -> object_store::Config {
    object_store::Config {
        bucket: MODULES_BUCKET.to_string(),
        description: Some("Policy modules and their test vectors, by digest".into()),
        num_replicas: replicas,
        ..Default::default()
    }
}

/// The chain: one key, with history for `policy list` and rollbacks.
fn chain_config(replicas: usize) -> kv::Config {
    kv_config(
        CHAIN_BUCKET,
        "The active policy chain",
        64,
        Duration::ZERO,
        replicas,
    )
}

/// The gateways' reports: a gateway that stopped reporting drops out after an hour.
fn status_config(replicas: usize) -> kv::Config {
    kv_config(
        STATUS_BUCKET,
        "What each gateway runs",
        1,
        Duration::from_secs(3600),
        replicas,
    )
}

impl PolicyStore {
    /// Set-up: creates the object store and both buckets with `replicas`, or brings existing
    /// ones to `replicas`.
    pub async fn ensure_buckets(js: &jetstream::Context, replicas: usize) -> anyhow::Result<()> {
        if js.get_object_store(MODULES_BUCKET).await.is_err() {
            let created = js.create_object_store(modules_config(replicas)).await;
            if let Err(error) = created
                && js.get_object_store(MODULES_BUCKET).await.is_err()
            {
                return Err(error).context("creating the POLICY_MODULES object store");
            }
        }
        crate::streams::ensure_replicas(js, &format!("OBJ_{MODULES_BUCKET}"), replicas).await?;
        crate::streams::ensure_key_value(js, chain_config(replicas)).await?;
        crate::streams::ensure_key_value(js, status_config(replicas)).await
    }

    /// Opens the buckets, creating them (one replica) if set-up has not
    /// ([`PolicyStore::ensure_buckets`]).
    pub async fn open(js: &jetstream::Context) -> anyhow::Result<PolicyStore> {
        let modules = match js.get_object_store(MODULES_BUCKET).await {
            Ok(store) => store,
            Err(_) => js
                .create_object_store(modules_config(1))
                .await
                .context("creating the POLICY_MODULES object store")?,
        };
        let chain = open_kv(js, chain_config(1)).await?;
        let status = open_kv(js, status_config(1)).await?;
        Ok(PolicyStore {
            modules,
            chain,
            status,
        })
    }

    /// Stores a module (and its vectors) and returns its digest. Storing the same bytes again
    /// is harmless.
    pub async fn put_module(&self, bytes: &[u8], vectors: Option<&[u8]>) -> anyhow::Result<String> {
        let digest = digest(bytes);
        self.modules
            .put(format!("{digest}.wasm").as_str(), &mut &bytes[..])
            .await
            .context("uploading the module")?;
        if let Some(vectors) = vectors {
            self.modules
                .put(format!("{digest}.vectors.json").as_str(), &mut &vectors[..])
                .await
                .context("uploading the test vectors")?;
        }
        Ok(digest)
    }

    pub async fn module(&self, digest: &str) -> anyhow::Result<Vec<u8>> {
        self.read_object(&format!("{digest}.wasm"))
            .await?
            .with_context(|| format!("module {digest} is not in the store"))
    }

    pub async fn vectors(&self, digest: &str) -> anyhow::Result<Option<Vec<u8>>> {
        self.read_object(&format!("{digest}.vectors.json")).await
    }

    async fn read_object(&self, name: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let mut object = match self.modules.get(name).await {
            Ok(object) => object,
            Err(error) if error.kind() == object_store::GetErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(error).with_context(|| format!("reading {name}")),
        };
        let mut bytes = Vec::new();
        object
            .read_to_end(&mut bytes)
            .await
            .with_context(|| format!("reading {name}"))?;
        Ok(Some(bytes))
    }

    /// The active chain and the key's revision (0 when no chain was ever set).
    pub async fn chain(&self) -> anyhow::Result<(Chain, u64)> {
        match self
            .chain
            .entry(CHAIN_KEY)
            .await
            .context("reading the policy chain")?
        {
            Some(entry) if entry.operation == kv::Operation::Put => {
                let chain =
                    serde_json::from_slice(&entry.value).context("parsing the policy chain")?;
                Ok((chain, entry.revision))
            }
            Some(entry) => Ok((Chain::default(), entry.revision)),
            None => Ok((Chain::default(), 0)),
        }
    }

    /// Makes `digest` the module of policy `name`: replaces it in place (remembering the old
    /// digest for rollback) or appends it to the end of the chain.
    pub async fn activate(
        &self,
        name: &str,
        digest: &str,
        on_error: &str,
    ) -> anyhow::Result<Chain> {
        self.change(|chain| {
            let now = Utc::now();
            match chain.policies.iter_mut().find(|p| p.name == name) {
                Some(entry) => {
                    if entry.digest != digest {
                        entry
                            .previous
                            .push(std::mem::replace(&mut entry.digest, digest.to_string()));
                    }
                    entry.on_error = on_error.to_string();
                    entry.activated_at = now;
                }
                None => chain.policies.push(ChainEntry {
                    name: name.to_string(),
                    digest: digest.to_string(),
                    on_error: on_error.to_string(),
                    activated_at: now,
                    previous: Vec::new(),
                }),
            }
            Ok(())
        })
        .await
    }

    /// Puts policy `name` back on the digest it had before its last change; a policy that was
    /// never changed since it was added is taken out of the chain (the chain before it).
    pub async fn rollback(&self, name: &str) -> anyhow::Result<Chain> {
        self.change(|chain| {
            let position = chain
                .policies
                .iter()
                .position(|p| p.name == name)
                .with_context(|| format!("no policy named {name} in the chain"))?;
            let entry = &mut chain.policies[position];
            match entry.previous.pop() {
                Some(previous) => {
                    entry.digest = previous;
                    entry.activated_at = Utc::now();
                }
                None => {
                    chain.policies.remove(position);
                }
            }
            Ok(())
        })
        .await
    }

    /// Applies `edit` with compare-and-set, retrying when another writer got there first.
    async fn change(
        &self,
        edit: impl Fn(&mut Chain) -> anyhow::Result<()>,
    ) -> anyhow::Result<Chain> {
        for _ in 0..20 {
            let (mut chain, revision) = self.chain().await?;
            edit(&mut chain)?;
            chain.version += 1;
            chain.updated_at = Some(Utc::now());
            let bytes = serde_json::to_vec(&chain)?;
            let written = if revision == 0 {
                self.chain
                    .create(CHAIN_KEY, bytes.into())
                    .await
                    .map(|_| ())
                    .map_err(anyhow::Error::from)
            } else {
                self.chain
                    .update(CHAIN_KEY, bytes.into(), revision)
                    .await
                    .map(|_| ())
                    .map_err(anyhow::Error::from)
            };
            if written.is_ok() {
                return Ok(chain);
            }
        }
        anyhow::bail!("the policy chain kept changing under us; try again")
    }

    /// Every change of the chain from now on (the current value first).
    pub async fn watch_chain(&self) -> anyhow::Result<impl futures::Stream<Item = Chain> + use<>> {
        let watch = self
            .chain
            .watch_with_history(CHAIN_KEY)
            .await
            .context("watching the policy chain")?;
        Ok(watch.filter_map(|entry| async move {
            let entry = entry.ok()?;
            if entry.operation != kv::Operation::Put {
                return Some(Chain::default());
            }
            serde_json::from_slice(&entry.value).ok()
        }))
    }

    pub async fn report(&self, status: &GatewayStatus) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec(status)?;
        self.status
            .put(&status.gateway, bytes.into())
            .await
            .context("reporting policy status")?;
        Ok(())
    }

    /// The latest report of every gateway seen within the bucket's expiry.
    pub async fn statuses(&self) -> anyhow::Result<Vec<GatewayStatus>> {
        let mut keys = self.status.keys().await.context("listing gateways")?;
        let mut statuses = Vec::new();
        while let Some(key) = keys.next().await {
            let Ok(key) = key else { continue };
            if let Ok(Some(bytes)) = self.status.get(&key).await
                && let Ok(status) = serde_json::from_slice(&bytes)
            {
                statuses.push(status);
            }
        }
        Ok(statuses)
    }
}

async fn open_kv(js: &jetstream::Context, config: kv::Config) -> anyhow::Result<kv::Store> {
    if let Ok(store) = js.get_key_value(&config.bucket).await {
        return Ok(store);
    }
    let bucket = config.bucket.clone();
    js.create_key_value(config)
        .await
        .with_context(|| format!("creating the {bucket} bucket"))
}

fn kv_config(
    bucket: &str,
    description: &str,
    history: i64,
    max_age: Duration,
    replicas: usize,
) -> kv::Config {
    kv::Config {
        bucket: bucket.to_string(),
        description: description.to_string(),
        history,
        max_age,
        num_replicas: replicas,
        ..Default::default()
    }
}
