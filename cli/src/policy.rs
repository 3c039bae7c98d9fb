//! `hotpath policy …`: test, push, list, roll back and benchmark policies.
//!
//! `push` checks the module locally first (it compiles, has no imports, passes its vectors),
//! then uploads it by digest and makes it the named policy's module in the active chain. Every
//! gateway then compiles and self-tests it on its own and swaps it in; `list` shows what each
//! gateway runs, or why it refused.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context as _;
use async_nats::jetstream;
use clap::Subcommand;
use hdrhistogram::Histogram;
use hotpath_core::policy_store::PolicyStore;
use hotpath_core::streams;
use hotpath_policy_host::{
    ConversationInput, OnError, Policy, PolicyEngine, input_json, run_vectors,
};
use serde_json::json;

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Run a module's test vectors locally.
    Test { module: PathBuf, vectors: PathBuf },
    /// Upload a module and make it the module of policy NAME (added at the end of the chain if
    /// new). Checked locally first; every gateway checks it again before swapping it in.
    Push {
        module: PathBuf,
        #[arg(long)]
        name: String,
        /// Test vectors to ship with the module (every gateway runs them before activating).
        #[arg(long)]
        vectors: Option<PathBuf>,
        /// What a failure of this policy means: deny (fail-closed) or allow.
        #[arg(long, default_value = "deny", value_parser = ["deny", "allow"])]
        on_error: String,
        /// Skip the local check (the gateways still check; useful to see a refusal).
        #[arg(long)]
        no_local_check: bool,
    },
    /// Show the active chain and what each gateway runs.
    List,
    /// Put policy NAME back on the module it had before its last push (or take it out of the
    /// chain if it has only ever had one).
    Rollback { name: String },
    /// Time the evaluation of the chain in the given directory on a representative message.
    Bench {
        /// Directory with schema.wasm and authz.wasm (the shipped chain).
        #[arg(long, default_value = "policies/dist")]
        dir: PathBuf,
        #[arg(long, default_value_t = 20_000)]
        iterations: u64,
    },
}

/// Where NATS is: the flag or env, else `hotpath up`'s data directory, else the default.
pub fn nats_url(explicit: Option<String>, data_dir: &Path) -> String {
    explicit
        .or_else(|| {
            crate::up::read_ports(data_dir)
                .ok()
                .map(|p| format!("nats://127.0.0.1:{}", p.nats))
        })
        .unwrap_or_else(|| "nats://127.0.0.1:4222".to_string())
}

pub async fn run(command: PolicyCommand, nats_url: String) -> anyhow::Result<()> {
    match command {
        PolicyCommand::Test { module, vectors } => test(&module, &vectors),
        PolicyCommand::Bench { dir, iterations } => bench(&dir, iterations),
        PolicyCommand::Push {
            module,
            name,
            vectors,
            on_error,
            no_local_check,
        } => {
            let bytes = read(&module)?;
            let vectors = vectors.as_deref().map(read).transpose()?;
            if !no_local_check {
                check(&name, &bytes, vectors.as_deref(), &on_error)?;
            }
            let store = store(&nats_url).await?;
            let digest = store.put_module(&bytes, vectors.as_deref()).await?;
            let chain = store.activate(&name, &digest, &on_error).await?;
            println!(
                "pushed {name} = {} (chain version {})",
                short(&digest),
                chain.version
            );
            Ok(())
        }
        PolicyCommand::List => list(&store(&nats_url).await?).await,
        PolicyCommand::Rollback { name } => {
            let chain = store(&nats_url).await?.rollback(&name).await?;
            match chain.policies.iter().find(|p| p.name == name) {
                Some(entry) => println!(
                    "rolled {name} back to {} (chain version {})",
                    short(&entry.digest),
                    chain.version
                ),
                None => println!(
                    "removed {name} from the chain (chain version {})",
                    chain.version
                ),
            }
            Ok(())
        }
    }
}

async fn store(nats_url: &str) -> anyhow::Result<PolicyStore> {
    let nats = streams::connect(nats_url, "hotpath-policy").await?;
    PolicyStore::open(&jetstream::new(nats)).await
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

fn short(digest: &str) -> &str {
    &digest[..digest.len().min(12)]
}

/// Compiles the module under the gateway's rules and runs its vectors.
fn check(name: &str, bytes: &[u8], vectors: Option<&[u8]>, on_error: &str) -> anyhow::Result<()> {
    let on_error = if on_error == "allow" {
        OnError::Allow
    } else {
        OnError::Deny
    };
    let policy = PolicyEngine::new()?.load(name, bytes, on_error)?;
    if let Some(vectors) = vectors {
        report_vectors(&policy, vectors)?;
    }
    Ok(())
}

fn report_vectors(policy: &Policy, vectors: &[u8]) -> anyhow::Result<()> {
    let report = run_vectors(policy, vectors)?;
    for failure in &report.failed {
        println!("FAIL {failure}");
    }
    println!("{} passed, {} failed", report.passed, report.failed.len());
    anyhow::ensure!(report.ok(), "{} test vector(s) failed", report.failed.len());
    Ok(())
}

fn test(module: &Path, vectors: &Path) -> anyhow::Result<()> {
    let name = module
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("policy");
    let policy = PolicyEngine::new()?.load(name, &read(module)?, OnError::Deny)?;
    report_vectors(&policy, &read(vectors)?)
}

async fn list(store: &PolicyStore) -> anyhow::Result<()> {
    let (chain, _) = store.chain().await?;
    println!(
        "chain version {}{}",
        chain.version,
        if chain.policies.is_empty() {
            " (empty)"
        } else {
            ""
        }
    );
    for (position, entry) in chain.policies.iter().enumerate() {
        println!(
            "  {}. {:<16} {}  on_error={}  activated {}  earlier versions: {}",
            position + 1,
            entry.name,
            short(&entry.digest),
            entry.on_error,
            entry.activated_at.format("%Y-%m-%d %H:%M:%S"),
            entry.previous.len()
        );
    }
    for status in store.statuses().await? {
        let running: Vec<String> = status
            .running
            .iter()
            .map(|(n, d)| format!("{n}={}", short(d)))
            .collect();
        println!(
            "gateway {}: {} for version {} (reported {}); running {}{}",
            status.gateway,
            status.state,
            status.chain_version,
            status.updated_at.format("%H:%M:%S"),
            running.join(" "),
            status
                .reason
                .map(|r| format!("\n    reason: {r}"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// Evaluates the shipped chain on a representative valid message, per policy and whole.
fn bench(dir: &Path, iterations: u64) -> anyhow::Result<()> {
    let engine = PolicyEngine::new()?;
    let policies: Vec<Policy> = ["schema", "authz"]
        .iter()
        .map(|name| {
            let bytes = read(&dir.join(format!("{name}.wasm")))?;
            Ok(engine.load(name, &bytes, OnError::Deny)?)
        })
        .collect::<anyhow::Result<_>>()?;
    let request = json!({
        "conversationId": "6f9c1f2e-8d4b-4c1a-9a51-2f2d4c8e7b10",
        "content": "a".repeat(200),
        "contentType": "text",
        "clientMessageId": "bench-1",
        "metadata": {"replyTo": "x"}
    });
    let members: Vec<String> = (0..24).map(|i| format!("user-{i}")).collect();
    let conversation = || ConversationInput {
        id: "6f9c1f2e-8d4b-4c1a-9a51-2f2d4c8e7b10",
        kind: "group",
        is_active: true,
        members: members.iter().map(String::as_str).collect(),
    };
    let mut per_policy: Vec<Histogram<u64>> = policies
        .iter()
        .map(|_| new_histogram())
        .collect::<anyhow::Result<_>>()?;
    let mut whole = new_histogram()?;
    for _ in 0..iterations {
        let chain_started = Instant::now();
        for (policy, histogram) in policies.iter().zip(per_policy.iter_mut()) {
            let input = input_json("user-0", &request, Some(conversation()), std::iter::empty());
            let started = Instant::now();
            let _ = policy.evaluate(&input);
            histogram.record(started.elapsed().as_nanos() as u64)?;
        }
        whole.record(chain_started.elapsed().as_nanos() as u64)?;
    }
    let micros = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "policy chain evaluation, {iterations} iterations, fresh instance per evaluation (input building included in 'chain'):"
    );
    for (policy, histogram) in policies.iter().zip(&per_policy) {
        println!(
            "  {:<8} p50 {:>7.1} µs  p99 {:>7.1} µs",
            policy.name(),
            micros(histogram, 0.5),
            micros(histogram, 0.99)
        );
    }
    println!(
        "  {:<8} p50 {:>7.1} µs  p99 {:>7.1} µs",
        "chain",
        micros(&whole, 0.5),
        micros(&whole, 0.99)
    );
    Ok(())
}

fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).context("histogram bounds")
}
