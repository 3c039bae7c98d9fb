//! `hotpath policy …`: test, push, list, roll back and benchmark policies.
//!
//! `push` checks the module locally first (it compiles, has no imports, passes its vectors),
//! then uploads it by digest and makes it the named policy's module in the active chain. Every
//! gateway then compiles and self-tests it on its own and swaps it in; `list` shows what each
//! gateway runs, or why it refused, and what each policy decided since its activation.
//!
//! A module can be tried first: `push --mode shadow` evaluates it on live sends after the
//! chain without letting it decide, `push --mode canary --percent P` lets it decide for a
//! stable P% of senders; `diff` prints sampled sends on which it disagreed with the chain,
//! `promote` makes it enforcing, `rollback` drops it.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use async_nats::jetstream;
use chrono::Utc;
use clap::Subcommand;
use hotpath_core::policy_store::{
    Candidate, Chain, GatewayStatus, Mode, PolicyCounts, PolicyStore,
};

use hotpath_policy_host::{OnError, Policy, PolicyEngine, run_vectors};

use crate::nats_target::NatsTarget;

mod bench;

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Run a module's test vectors locally.
    Test { module: PathBuf, vectors: PathBuf },
    /// Upload a module and make it the module of policy NAME (added at the end of the chain if
    /// new). Checked locally first; every gateway checks it again before swapping it in.
    Push(Push),
    /// Show the active chain, the policies on trial, what each gateway runs, and the counts
    /// of every policy since its activation.
    List,
    /// Make the shadow or canary module of policy NAME enforcing, in one swap.
    Promote { name: String },
    /// Drop the shadow or canary module of policy NAME; without one, put policy NAME back on
    /// the module it had before its last push (or take it out of the chain if it has only
    /// ever had one).
    Rollback { name: String },
    /// Print sampled sends on which policy NAME on trial disagreed with the chain, oldest
    /// first (ids, lengths and content type; content only if pushed with --sample-content).
    Diff {
        name: String,
        /// The most samples to print (the latest ones).
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
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
        /// Write /tmp/perf-<pid>.map, so `perf report` names the modules' compiled functions
        /// (build them unstripped to get their names; docs/performance.md).
        #[arg(long)]
        perf_map: bool,
        /// Also report the chains no other thread preempted: with more threads than cores the
        /// wall-clock p99 is mostly the wait for a core. Costs two getrusage calls per chain,
        /// which the CPU figure then includes.
        #[arg(long)]
        preemption: bool,
    },
}

/// How a pushed module takes part in the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PushMode {
    Enforce,
    Shadow,
    Canary,
}

pub async fn run(command: PolicyCommand, nats: &NatsTarget) -> anyhow::Result<()> {
    match command {
        PolicyCommand::Test { module, vectors } => test(&module, &vectors),
        PolicyCommand::Bench {
            dir,
            iterations,
            threads,
            perf_map,
            preemption,
        } => bench::run(
            &dir,
            iterations,
            threads,
            bench::Options {
                perf_map,
                preemption,
            },
        ),
        PolicyCommand::Push(push) => push.run(nats).await,
        PolicyCommand::List => list(&store(nats).await?).await,
        PolicyCommand::Promote { name } => {
            let store = store(nats).await?;
            let chain = store.promote(&name).await?;
            let digest = chain
                .policies
                .iter()
                .find(|p| p.name == name)
                .map_or("", |p| short(&p.digest));
            println!(
                "promoted {name} = {digest}: enforcing (chain version {})",
                chain.version
            );
            rolled_out(&store, chain.version).await
        }
        PolicyCommand::Diff { name, limit } => {
            let client = nats.connect("hotpath-policy").await?;
            let samples = PolicyStore::decisions(&jetstream::new(client), &name, limit).await?;
            if samples.is_empty() {
                println!("no sampled differences for {name}");
            }
            for sample in samples {
                println!("{}", diff_line(&sample));
            }
            Ok(())
        }
        PolicyCommand::Rollback { name } => rollback(&store(nats).await?, &name).await,
    }
}

/// `policy push`'s arguments.
#[derive(Debug, clap::Args)]
pub struct Push {
    pub module: PathBuf,
    #[arg(long)]
    pub name: String,
    /// Test vectors to ship with the module (every gateway runs them before activating).
    #[arg(long)]
    pub vectors: Option<PathBuf>,
    /// What a failure of this policy means: deny (fail-closed) or allow.
    #[arg(long, default_value = "deny", value_parser = ["deny", "allow"])]
    pub on_error: String,
    /// Skip the local check (the gateways still check; useful to see a refusal).
    #[arg(long)]
    pub no_local_check: bool,
    /// enforce: the module decides (replacing the policy of that name, or appended);
    /// shadow: evaluated after the chain on every send, decides nothing; canary: decides
    /// for PERCENT% of senders (a stable hash of the user id), shadow for the rest.
    #[arg(long, value_enum, default_value_t = PushMode::Enforce)]
    pub mode: PushMode,
    /// The canary's share of senders, 0 to 100 (only with --mode canary).
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub percent: Option<u8>,
    /// Let decision samples of this candidate carry the message's content (off: ids,
    /// lengths and content type only). See the README on what this means for privacy.
    #[arg(long)]
    pub sample_content: bool,
}

impl Push {
    async fn run(self, nats: &NatsTarget) -> anyhow::Result<()> {
        let Push {
            module,
            name,
            vectors,
            on_error,
            no_local_check,
            mode,
            percent,
            sample_content,
        } = self;
        hotpath_core::policy_store::check_name(&name)?;
        let mode = match (mode, percent) {
            (PushMode::Canary, Some(percent)) => (Mode::Canary, percent),
            (PushMode::Canary, None) => anyhow::bail!("--mode canary needs --percent"),
            (_, Some(_)) => anyhow::bail!("--percent is for --mode canary only"),
            (PushMode::Shadow, None) => (Mode::Shadow, 0),
            (PushMode::Enforce, None) => (Mode::Enforce, 0),
        };
        anyhow::ensure!(
            !sample_content || mode.0 != Mode::Enforce,
            "--sample-content is for --mode shadow or canary"
        );
        let bytes = read(&module)?;
        let vectors = vectors.as_deref().map(read).transpose()?;
        if !no_local_check {
            check(&name, &bytes, vectors.as_deref(), &on_error)?;
        }
        let store = store(nats).await?;
        let digest = store.put_module(&bytes, vectors.as_deref()).await?;
        let chain = match mode {
            (Mode::Enforce, _) => store.activate(&name, &digest, &on_error).await?,
            (mode, percent) => {
                store
                    .try_out(Candidate {
                        name: name.clone(),
                        digest: digest.clone(),
                        on_error: on_error.clone(),
                        mode,
                        percent,
                        sample_content,
                        activated_at: Utc::now(),
                    })
                    .await?
            }
        };
        let how = match mode {
            (Mode::Enforce, _) => String::new(),
            (Mode::Canary, percent) => format!(" as a canary for {percent}% of senders"),
            (mode, _) => format!(" in {} mode", mode.as_str()),
        };
        println!(
            "pushed {name} = {}{how} (chain version {})",
            short(&digest),
            chain.version
        );
        rolled_out(&store, chain.version).await
    }
}

async fn rollback(store: &PolicyStore, name: &str) -> anyhow::Result<()> {
    let on_trial = store
        .chain()
        .await?
        .0
        .candidates
        .iter()
        .any(|c| c.name == name);
    let chain = store.rollback(name).await?;
    match chain.policies.iter().find(|p| p.name == name) {
        _ if on_trial => println!(
            "dropped the {name} on trial; the chain is unchanged (chain version {})",
            chain.version
        ),
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
    rolled_out(store, chain.version).await
}

/// The longest a push, promotion or rollback waits for the gateways to take its chain.
const ROLLOUT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Waits (at most [`ROLLOUT_WAIT`]) until every gateway that reported within the status
/// bucket's hour runs chain `version` (or a later one) or refused it, then says where each
/// stands, so that what follows the command meets the new chain. A gateway that no longer
/// runs keeps its last report until it ages out: it shows as not yet there.
async fn rolled_out(store: &PolicyStore, version: u64) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + ROLLOUT_WAIT;
    let statuses = loop {
        let statuses = store.statuses().await?;
        if statuses.iter().all(|s| s.chain_version >= version)
            || tokio::time::Instant::now() >= deadline
        {
            break statuses;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    if statuses.is_empty() {
        println!("no gateway has reported yet; `hotpath policy list` shows them as they do");
    }
    for status in &statuses {
        let gateway = &status.gateway;
        match status.state.as_str() {
            _ if status.chain_version < version => println!(
                "  gateway {gateway}: not yet (still on version {}, reported {})",
                status.chain_version,
                status.updated_at.format("%H:%M:%S")
            ),
            "active" => println!(
                "  gateway {gateway}: running version {}",
                status.chain_version
            ),
            state => println!(
                "  gateway {gateway}: {state} version {}{}",
                status.chain_version,
                status
                    .reason
                    .as_ref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            ),
        }
    }
    Ok(())
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
    let statuses = store.statuses().await?;
    print!("{}", listing(&chain, &statuses));
    Ok(())
}

/// `policy list`'s text: the chain, the candidates, the counts summed over the gateways that
/// run each activation, then each gateway.
fn listing(chain: &Chain, statuses: &[GatewayStatus]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "chain version {}{}",
        chain.version,
        if chain.policies.is_empty() {
            " (empty)"
        } else {
            ""
        }
    );
    for (position, entry) in chain.policies.iter().enumerate() {
        let c = summed(
            statuses,
            &entry.name,
            &entry.digest,
            Mode::Enforce,
            entry.activated_at,
        );
        let _ = writeln!(
            out,
            "  {}. {:<16} {}  mode=enforce  on_error={}  activated {}  earlier versions: {}\n     \
             since activation: evaluated {}, rejected {}, failed {}",
            position + 1,
            entry.name,
            short(&entry.digest),
            entry.on_error,
            entry.activated_at.format("%Y-%m-%d %H:%M:%S"),
            entry.previous.len(),
            c.evaluated,
            c.rejected,
            c.failed
        );
    }
    for candidate in &chain.candidates {
        candidate_line(&mut out, chain, statuses, candidate);
    }
    for status in statuses {
        let mut running: Vec<String> = status
            .running
            .iter()
            .map(|(n, d)| format!("{n}={}", short(d)))
            .collect();
        running.extend(
            status
                .counts
                .iter()
                .filter(|c| c.mode != Mode::Enforce)
                .map(|c| format!("{}={} ({})", c.name, short(&c.digest), c.mode.as_str())),
        );
        let _ = writeln!(
            out,
            "gateway {}: {} for version {} (reported {}); running {}{}",
            status.gateway,
            status.state,
            status.chain_version,
            status.updated_at.format("%H:%M:%S"),
            running.join(" "),
            status
                .reason
                .as_ref()
                .map(|r| format!("\n    reason: {r}"))
                .unwrap_or_default()
        );
    }
    out
}

/// The counts of one activation summed over the gateways that report it.
fn summed(
    statuses: &[GatewayStatus],
    name: &str,
    digest: &str,
    mode: Mode,
    since: chrono::DateTime<Utc>,
) -> PolicyCounts {
    let mut sum = PolicyCounts::default();
    for c in statuses.iter().flat_map(|s| &s.counts).filter(|c| {
        c.name == name && c.digest == digest && c.mode == mode && c.activated_at == Some(since)
    }) {
        sum.evaluated += c.evaluated;
        sum.rejected += c.rejected;
        sum.failed += c.failed;
        sum.enforced += c.enforced;
        sum.differed += c.differed;
    }
    sum
}

/// `policy list`'s two lines for a policy on trial.
fn candidate_line(
    out: &mut String,
    chain: &Chain,
    statuses: &[GatewayStatus],
    candidate: &Candidate,
) {
    use std::fmt::Write as _;
    let c = summed(
        statuses,
        &candidate.name,
        &candidate.digest,
        candidate.mode,
        candidate.activated_at,
    );
    let mode = match candidate.mode {
        Mode::Canary => format!("canary {}%", candidate.percent),
        mode => mode.as_str().to_string(),
    };
    let replaces = if chain.policies.iter().any(|p| p.name == candidate.name) {
        "next version of the enforcing policy"
    } else {
        "new policy"
    };
    let _ = writeln!(
        out,
        "  on trial: {:<16} {}  mode={mode}  on_error={}  activated {}  ({replaces}{})\n     \
         since activation: evaluated {}, rejected {} (enforced {}), failed {}, differed from the chain {}",
        candidate.name,
        short(&candidate.digest),
        candidate.on_error,
        candidate.activated_at.format("%Y-%m-%d %H:%M:%S"),
        if candidate.sample_content {
            ", samples carry content"
        } else {
            ""
        },
        c.evaluated,
        c.rejected,
        c.enforced,
        c.failed,
        c.differed
    );
}

/// One decision sample as `policy diff` prints it.
fn diff_line(sample: &hotpath_core::policy_store::DecisionSample) -> String {
    let verdict = |v: &hotpath_core::policy_store::SampledVerdict| match &v.code {
        Some(code) => format!("{} {code}", v.verdict),
        None => v.verdict.clone(),
    };
    let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let mut line = format!(
        "{}  {} {}  user={} conversation={} clientMessageId={} contentType={} chars={}  chain: {}  {}: {}",
        sample.at.format("%Y-%m-%dT%H:%M:%S%.3fZ"),
        sample.mode.as_str(),
        short(&sample.digest),
        sample.user_id,
        or_dash(&sample.conversation_id),
        or_dash(&sample.client_message_id),
        or_dash(&sample.content_type),
        sample
            .content_chars
            .map_or_else(|| "-".to_string(), |n| n.to_string()),
        verdict(&sample.enforced),
        sample.policy,
        verdict(&sample.candidate),
    );
    if let Some(content) = &sample.content {
        line.push_str(&format!(
            "  content={}",
            serde_json::Value::String(content.clone())
        ));
    }
    line.push_str(&format!("  (gateway {})", sample.gateway));
    line
}
