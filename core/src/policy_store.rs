//! Where policies live in NATS, shared by every gateway and the `hotpath policy` command.
//!
//! * Module bytes (and their test vectors) sit in the object store `POLICY_MODULES`, named by
//!   the SHA-256 digest of the module, so a digest always means the same code.
//! * The active chain is one key, `active`, in the KV bucket `POLICY_CHAIN`: the ordered list of
//!   policies (name → digest, on-error behaviour, when activated, the digests it replaced).
//!   Every gateway watches it; a change is a swap. Updates use compare-and-set on the key's
//!   revision, so two concurrent pushes cannot lose one another.
//! * Each gateway reports what it actually runs (or refused, and why) under its own key in the
//!   KV bucket `POLICY_STATUS`, which expires keys of gateways that stopped reporting, with
//!   what each policy decided since it was activated.
//! * A policy can be tried before it decides anything: a **candidate** of the chain
//!   ([`Candidate`]) runs in `shadow` mode (evaluated after the enforcing chain, its verdict
//!   only counted) or as a `canary` (enforcing for a stable share of senders, shadow for the
//!   rest), until `promote` makes it enforcing or `rollback` drops it. Where a candidate's
//!   verdict differs from the enforcing chain's, gateways publish a sampled, redacted
//!   [`DecisionSample`] into the stream `POLICY_DECISIONS` (`hotpath policy diff`).

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
pub const DECISIONS_STREAM: &str = "POLICY_DECISIONS";
/// `hotpath.policy.decisions.<policy>`: one subject per policy, so `diff` reads only its own.
pub const DECISIONS_SUBJECT_PREFIX: &str = "hotpath.policy.decisions";
/// How long decision samples are kept, and the most bytes they may take.
pub const DECISIONS_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
pub const DECISIONS_MAX_BYTES: i64 = 64 * 1024 * 1024;
/// The longest policy name; names are letters, digits, `-` and `_` (they are subject tokens).
pub const MAX_NAME_LEN: usize = 64;

/// The active chain, in evaluation order.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Chain {
    /// Bumped on every change.
    pub version: u64,
    pub updated_at: Option<DateTime<Utc>>,
    pub policies: Vec<ChainEntry>,
    /// Policies on trial (shadow or canary), at most one per name. A candidate named like an
    /// enforcing policy is that policy's next version; otherwise it is a new policy that
    /// `promote` appends to the chain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub candidates: Vec<Candidate>,
}

/// How a policy takes part in the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Its verdict is the answer (the chain's policies).
    #[default]
    Enforce,
    /// Evaluated after the enforcing chain on every send; its verdict is only counted.
    Shadow,
    /// Enforcing for `percent`% of senders (a stable hash of the user id), shadow for the rest.
    Canary,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Shadow => "shadow",
            Mode::Canary => "canary",
        }
    }
}

/// A policy on trial.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Candidate {
    pub name: String,
    pub digest: String,
    pub on_error: String,
    /// `shadow` or `canary`.
    pub mode: Mode,
    /// The canary's share of senders, 0–100 (0 for a shadow).
    #[serde(default)]
    pub percent: u8,
    /// Whether decision samples may carry the message's content (off unless the operator
    /// opted in for this policy).
    #[serde(default)]
    pub sample_content: bool,
    pub activated_at: DateTime<Utc>,
}

impl Candidate {
    /// Whether this candidate decides for `user_id`: never for a shadow; for a canary, when the
    /// user's stable bucket ([`canary_bucket`]) is below its percent.
    pub fn enforces_for(&self, user_id: &str) -> bool {
        self.mode == Mode::Canary && canary_bucket(&self.name, user_id) < self.percent
    }
}

/// The user's bucket (0–99) for policy `policy`'s canary: the same on every gateway and every
/// run, so a sender's experience is consistent, and independent between policies, so one
/// set of users does not carry every canary.
pub fn canary_bucket(policy: &str, user_id: &str) -> u8 {
    let mut hasher = Sha256::new();
    hasher.update(policy.as_bytes());
    hasher.update([0]);
    hasher.update(user_id.as_bytes());
    let hash = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash[..8]);
    (u64::from_be_bytes(first) % 100) as u8
}

/// Checks a policy name: 1–64 letters, digits, `-` or `_`.
pub fn check_name(name: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !name.is_empty()
            && name.len() <= MAX_NAME_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "a policy name is 1 to {MAX_NAME_LEN} letters, digits, '-' or '_' (got {name:?})"
    );
    Ok(())
}

/// The subject decision samples of `policy` go to.
pub fn decisions_subject(policy: &str) -> String {
    format!("{DECISIONS_SUBJECT_PREFIX}.{policy}")
}

/// One verdict, as a sample records it: `allow`, or `reject` with the code, or `failed` with
/// the failure's kind (what the policy's `on_error` then made of it is the enforced verdict).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SampledVerdict {
    pub verdict: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

/// A send on which a candidate's verdict differed from the enforcing chain's. Redacted: ids,
/// lengths and the content type; the content only when the candidate has `sample_content`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DecisionSample {
    pub policy: String,
    pub digest: String,
    pub mode: Mode,
    pub gateway: String,
    pub at: DateTime<Utc>,
    pub user_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_message_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// Characters of `content` when it is a string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_chars: Option<usize>,
    /// What the enforcing chain answered.
    pub enforced: SampledVerdict,
    /// What the candidate would have answered.
    pub candidate: SampledVerdict,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
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
    /// What each enforcing policy and candidate decided on this gateway since it was
    /// activated.
    #[serde(default)]
    pub counts: Vec<PolicyCounts>,
}

/// One policy's decisions on one gateway since its activation (`activated_at`): counted
/// separately for each (name, digest, mode, activation), summed over gateways by `policy list`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyCounts {
    pub name: String,
    pub digest: String,
    pub mode: Mode,
    pub activated_at: Option<DateTime<Utc>>,
    pub evaluated: u64,
    /// Rejections (for a candidate evaluated in shadow: would-be rejections).
    pub rejected: u64,
    pub failed: u64,
    /// Candidates only: sends on which it enforced (a canary's share).
    #[serde(default)]
    pub enforced: u64,
    /// Candidates only: shadow evaluations whose verdict differed from the enforcing chain's.
    #[serde(default)]
    pub differed: u64,
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
        crate::streams::ensure_key_value(js, status_config(replicas)).await?;
        js.create_or_update_stream(decisions_config(replicas))
            .await
            .context("creating or updating the POLICY_DECISIONS stream")?;
        Ok(())
    }

    /// The last `limit` decision samples of `policy`, oldest first.
    pub async fn decisions(
        js: &jetstream::Context,
        policy: &str,
        limit: usize,
    ) -> anyhow::Result<Vec<DecisionSample>> {
        let mut stream = js
            .get_stream(DECISIONS_STREAM)
            .await
            .context("opening the POLICY_DECISIONS stream")?;
        let subject = decisions_subject(policy);
        let stored = stream
            .info()
            .await
            .context("reading POLICY_DECISIONS")?
            .state
            .messages;
        let mut samples = std::collections::VecDeque::with_capacity(limit.min(1024));
        if stored == 0 || limit == 0 {
            return Ok(Vec::new());
        }
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: subject,
                deliver_policy: jetstream::consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .context("reading POLICY_DECISIONS")?;
        let mut messages = consumer
            .messages()
            .await
            .context("reading POLICY_DECISIONS")?;
        loop {
            // An empty subject delivers nothing: the wait ends the read.
            let next = tokio::time::timeout(Duration::from_secs(1), messages.next()).await;
            let Ok(Some(message)) = next else { break };
            let message = message.context("reading POLICY_DECISIONS")?;
            let pending = message.info().map(|info| info.pending).unwrap_or(0);
            if let Ok(sample) = serde_json::from_slice::<DecisionSample>(&message.payload) {
                if samples.len() == limit {
                    samples.pop_front();
                }
                samples.push_back(sample);
            }
            if pending == 0 {
                break;
            }
        }
        Ok(samples.into())
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
    /// digest for rollback) or appends it to the end of the chain. A candidate of the same
    /// name is dropped: pushing an enforcing version is the operator's decision.
    pub async fn activate(
        &self,
        name: &str,
        digest: &str,
        on_error: &str,
    ) -> anyhow::Result<Chain> {
        check_name(name)?;
        self.change(|chain| {
            chain.candidates.retain(|c| c.name != name);
            enforce(chain, name, digest, on_error);
            Ok(())
        })
        .await
    }

    /// Puts `candidate` on trial (`shadow` or `canary`), replacing a candidate of the same
    /// name; the enforcing chain is unchanged.
    pub async fn try_out(&self, candidate: Candidate) -> anyhow::Result<Chain> {
        check_name(&candidate.name)?;
        anyhow::ensure!(
            candidate.mode != Mode::Enforce,
            "a candidate runs in shadow or canary mode"
        );
        anyhow::ensure!(candidate.percent <= 100, "a canary's percent is 0 to 100");
        self.change(|chain| {
            let mut candidate = candidate.clone();
            candidate.activated_at = Utc::now();
            match chain
                .candidates
                .iter_mut()
                .find(|c| c.name == candidate.name)
            {
                Some(existing) => *existing = candidate,
                None => chain.candidates.push(candidate),
            }
            Ok(())
        })
        .await
    }

    /// Makes candidate `name` enforcing, in one change of the chain: it replaces the policy of
    /// that name in place (remembering the old digest for rollback) or is appended.
    pub async fn promote(&self, name: &str) -> anyhow::Result<Chain> {
        self.change(|chain| {
            let position = chain
                .candidates
                .iter()
                .position(|c| c.name == name)
                .with_context(|| {
                    format!("no policy named {name} is on trial (shadow or canary)")
                })?;
            let candidate = chain.candidates.remove(position);
            enforce(chain, name, &candidate.digest, &candidate.on_error);
            Ok(())
        })
        .await
    }

    /// Drops candidate `name` if there is one (the enforcing chain is untouched). Otherwise
    /// puts policy `name` back on the digest it had before its last change; a policy that was
    /// never changed since it was added is taken out of the chain (the chain before it).
    pub async fn rollback(&self, name: &str) -> anyhow::Result<Chain> {
        self.change(|chain| {
            if let Some(position) = chain.candidates.iter().position(|c| c.name == name) {
                chain.candidates.remove(position);
                return Ok(());
            }
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

/// Makes `digest` the enforcing module of `name` (see [`PolicyStore::activate`]).
fn enforce(chain: &mut Chain, name: &str, digest: &str, on_error: &str) {
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

/// Decision samples: a bounded log, by age and by bytes, oldest dropped first.
fn decisions_config(replicas: usize) -> jetstream::stream::Config {
    jetstream::stream::Config {
        name: DECISIONS_STREAM.to_string(),
        description: Some(
            "Sampled decisions of policies on trial that differed from the chain".into(),
        ),
        subjects: vec![format!("{DECISIONS_SUBJECT_PREFIX}.>")],
        max_age: DECISIONS_MAX_AGE,
        max_bytes: DECISIONS_MAX_BYTES,
        discard: jetstream::stream::DiscardPolicy::Old,
        num_replicas: replicas,
        ..Default::default()
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_users_canary_bucket_is_stable_and_differs_between_policies() {
        assert_eq!(
            canary_bucket("links", "alice"),
            canary_bucket("links", "alice")
        );
        let users: Vec<String> = (0..1000).map(|i| format!("user-{i}")).collect();
        let same = users
            .iter()
            .filter(|u| canary_bucket("links", u) == canary_bucket("spam", u))
            .count();
        assert!(same < 50, "{same} of 1000 users share both buckets");
    }

    #[test]
    fn a_canary_of_p_percent_takes_about_p_percent_of_users() {
        let users: Vec<String> = (0..10_000).map(|i| format!("user-{i}")).collect();
        for percent in [0u8, 1, 20, 50, 100] {
            let candidate = Candidate {
                name: "links".into(),
                digest: "d".into(),
                on_error: "deny".into(),
                mode: Mode::Canary,
                percent,
                sample_content: false,
                activated_at: Utc::now(),
            };
            let taken = users.iter().filter(|u| candidate.enforces_for(u)).count();
            let expected = usize::from(percent) * 100;
            assert!(
                taken.abs_diff(expected) <= 200,
                "{percent}%: {taken} of 10000"
            );
            if percent == 0 || percent == 100 {
                assert_eq!(taken, expected);
            }
        }
    }

    #[test]
    fn a_shadow_candidate_enforces_for_nobody() {
        let candidate = Candidate {
            name: "links".into(),
            digest: "d".into(),
            on_error: "deny".into(),
            mode: Mode::Shadow,
            percent: 100,
            sample_content: false,
            activated_at: Utc::now(),
        };
        assert!(!candidate.enforces_for("alice"));
    }

    #[test]
    fn policy_names_are_short_and_subject_safe() {
        for good in ["schema", "link-limit", "rule_2"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        let long = "x".repeat(MAX_NAME_LEN + 1);
        for bad in ["", "a.b", "a b", "a>", "*", long.as_str()] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
