//! `hotpath policy …`: test, push, list, roll back and benchmark policies.
//!
//! `push` checks the module locally first (it compiles, has no imports, passes its vectors),
//! then uploads it by digest and makes it the named policy's module in the active chain. Every
//! gateway then compiles and self-tests it on its own and swaps it in; `list` shows what each
//! gateway runs, or why it refused.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use async_nats::jetstream;
use clap::Subcommand;
use hotpath_core::policy_store::PolicyStore;

use hotpath_policy_host::{OnError, Policy, PolicyEngine, run_vectors};

use crate::nats_target::NatsTarget;

mod bench;

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
        /// Chain evaluations per thread.
        #[arg(long, default_value_t = 20_000)]
        iterations: u64,
        /// Threads evaluating at once, as a busy gateway's do.
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
}

pub async fn run(command: PolicyCommand, nats: &NatsTarget) -> anyhow::Result<()> {
    match command {
        PolicyCommand::Test { module, vectors } => test(&module, &vectors),
        PolicyCommand::Bench {
            dir,
            iterations,
            threads,
        } => bench::run(&dir, iterations, threads),
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
            let store = store(nats).await?;
            let digest = store.put_module(&bytes, vectors.as_deref()).await?;
            let chain = store.activate(&name, &digest, &on_error).await?;
            println!(
                "pushed {name} = {} (chain version {})",
                short(&digest),
                chain.version
            );
            Ok(())
        }
        PolicyCommand::List => list(&store(nats).await?).await,
        PolicyCommand::Rollback { name } => {
            let chain = store(nats).await?.rollback(&name).await?;
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

async fn store(nats: &NatsTarget) -> anyhow::Result<PolicyStore> {
    let client = nats.connect("hotpath-policy").await?;
    PolicyStore::open(&jetstream::new(client)).await
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
