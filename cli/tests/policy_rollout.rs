//! Trying a policy on live traffic before it decides, on a gateway pair (the test's in-process
//! gateway and a `hotpath gateway` process on the same NATS and Postgres), through the
//! commands operators use: a module that would reject every send runs in shadow and changes
//! no answer while both gateways count what it would have done; `policy diff` prints the
//! sampled differences without content unless the policy was pushed with `--sample-content`;
//! `promote` makes it enforce on both gateways with no failed request; a 20% canary rejects
//! for the same fifth of 200 senders on every gateway and every round, and for none of the
//! others; `rollback` drops it.

use hotpath_testkit as support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use hotpath::policy::{PolicyCommand, Push, PushMode, run as policy};
use hotpath_core::policy_store::{Mode, PolicyStore, canary_bucket};
use serde_json::Value;
use support::gateway::GatewayProcess;
use support::{System, text};
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_hotpath");
const REJECT_ALL: &str = "reject-all";
const VERDICT: &str =
    r#"{"verdict":"reject","code":"FORBIDDEN","message":"rejected by the policy on trial"}"#;

/// A module that rejects every send with `FORBIDDEN`.
fn reject_all_module(system: &System) -> PathBuf {
    let wat = format!(
        r#"(module
  (memory (export "memory") 1)
  (data (i32.const 0) "{data}")
  (func (export "hotpath_abi_version") (result i32) i32.const 1)
  (func (export "hotpath_alloc") (param i32) (result i32) i32.const 1024)
  (func (export "hotpath_validate") (param i32 i32) (result i64) i64.const {len}))"#,
        data = VERDICT.replace('"', "\\\""),
        len = VERDICT.len()
    );
    let path = system.servers.dir.path().join("reject-all.wasm");
    std::fs::write(&path, wat::parse_str(wat).expect("wat")).expect("write module");
    path
}

/// The system's gateway and a second one in its own process.
struct Pair {
    system: System,
    other: GatewayProcess,
    store: PolicyStore,
}

impl Pair {
    async fn start() -> Pair {
        let system = System::start().await;
        let other = GatewayProcess::start(&system, BIN, "gateway-b").await;
        let store = system.policy_store().await;
        Pair {
            system,
            other,
            store,
        }
    }

    /// The two gateways' base URLs.
    fn bases(&self) -> [String; 2] {
        [self.system.base.clone(), self.other.base.clone()]
    }

    async fn push(&self, name: &str, mode: PushMode, percent: Option<u8>, sample_content: bool) {
        let command = PolicyCommand::Push(Push {
            module: reject_all_module(&self.system),
            name: name.to_string(),
            vectors: None,
            on_error: "deny".into(),
            no_local_check: false,
            mode,
            percent,
            sample_content,
        });
        policy(command, &self.system.nats_target())
            .await
            .expect("push");
        self.both_run_the_chain().await;
    }

    async fn promote(&self, name: &str) {
        let command = PolicyCommand::Promote { name: name.into() };
        policy(command, &self.system.nats_target())
            .await
            .expect("promote");
    }

    async fn rollback(&self, name: &str) {
        let command = PolicyCommand::Rollback { name: name.into() };
        policy(command, &self.system.nats_target())
            .await
            .expect("rollback");
        self.both_run_the_chain().await;
    }

    /// Waits until both gateways report that they run the chain's current version.
    async fn both_run_the_chain(&self) -> Instant {
        let version = self.store.chain().await.expect("chain").0.version;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let statuses = self.store.statuses().await.expect("statuses");
            let running = statuses
                .iter()
                .filter(|s| s.chain_version == version && s.state == "active")
                .count();
            if running == 2 {
                return Instant::now();
            }
            assert!(
                Instant::now() < deadline,
                "both gateways should run chain version {version}: {statuses:?}\n{}",
                self.other.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `user`'s send of `content` to `conversation` through gateway `base`: status and code.
    async fn send(&self, base: &str, user: &str, conversation: Uuid, content: &str) -> Answer {
        send(
            &self.system.http,
            base,
            &self.system.token(user),
            conversation,
            content,
        )
        .await
    }

    /// The would-be rejections of `policy` each gateway counted, from its `/metrics`.
    async fn shadow_rejections(&self, policy: &str) -> [f64; 2] {
        let mut counted = [0.0; 2];
        for (i, base) in self.bases().iter().enumerate() {
            let metrics = self
                .system
                .http
                .get(format!("{base}/metrics"))
                .send()
                .await
                .expect("metrics")
                .text()
                .await
                .expect("metrics text");
            counted[i] = metrics
                .lines()
                .filter(|l| l.starts_with("policy_shadow_verdicts_total"))
                .filter(|l| l.contains(&format!("policy=\"{policy}\"")))
                .filter(|l| l.contains("code=\"FORBIDDEN\""))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
        }
        counted
    }

    /// `hotpath policy diff NAME --limit LIMIT`, as an operator runs it.
    fn diff(&self, name: &str, limit: usize) -> String {
        let output = Command::new(BIN)
            .args(["policy", "diff", name, "--limit", &limit.to_string()])
            .env("HOTPATH_NATS_URL", &self.system.config.nats_url)
            .output()
            .expect("hotpath policy diff runs");
        assert!(
            output.status.success(),
            "policy diff failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("utf-8")
    }

    /// Waits (bounded) until `policy diff NAME` prints at least `lines` samples.
    async fn diff_with(&self, name: &str, lines: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let printed = self.diff(name, 50);
            if printed.lines().filter(|l| l.contains("user=")).count() >= lines {
                return printed;
            }
            assert!(
                Instant::now() < deadline,
                "policy diff {name} printed no {lines} samples:\n{printed}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A send's outcome: the HTTP status and the error code (empty on success).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    status: u16,
    code: String,
}

impl Answer {
    fn accepted(&self) -> bool {
        self.status == 202
    }
    fn refused_by_the_candidate(&self) -> bool {
        self.status == 403 && self.code == "FORBIDDEN"
    }
}

async fn send(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    conversation: Uuid,
    content: &str,
) -> Answer {
    let response = http
        .post(format!("{base}/v1/messages"))
        .bearer_auth(token)
        .json(&text(conversation, content))
        .send()
        .await
        .expect("request completes");
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    Answer {
        status,
        code: body["error"]["code"].as_str().unwrap_or("").to_string(),
    }
}

/// `n` senders, each with a conversation of their own: (user, conversation).
async fn senders(system: &System, n: usize) -> Vec<(String, Uuid)> {
    futures::stream::iter(0..n)
        .map(|i| async move {
            let user = format!("sender-{i:03}");
            let conversation = system.conversation(&user, "group", &["reader"]).await;
            (user, conversation)
        })
        .buffered(16)
        .collect()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_policy_changes_no_answer_and_once_promoted_enforces_on_both_gateways() {
    const PER_GATEWAY: usize = 50;
    let pair = Pair::start().await;
    let senders = senders(&pair.system, 4).await;
    pair.push(REJECT_ALL, PushMode::Shadow, None, false).await;

    // In shadow, every send is still answered by the chain: all 202.
    for i in 0..PER_GATEWAY {
        for (g, base) in pair.bases().iter().enumerate() {
            let (user, conversation) = &senders[i % senders.len()];
            let content = format!("private words {g}-{i}");
            let answer = pair.send(base, user, *conversation, &content).await;
            assert!(answer.accepted(), "gateway {g}, send {i}: {answer:?}");
        }
    }
    // ... while both gateways counted every one as a rejection it would have made.
    let expected = PER_GATEWAY as f64;
    assert_eq!(
        pair.shadow_rejections(REJECT_ALL).await,
        [expected, expected]
    );
    // `policy list`'s counts (reported every 2 s) add up over the gateways to every send.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let statuses = pair.store.statuses().await.expect("statuses");
        let (evaluated, rejected, differed) = statuses
            .iter()
            .flat_map(|s| &s.counts)
            .filter(|c| c.name == REJECT_ALL && c.mode == Mode::Shadow)
            .fold((0, 0, 0), |(e, r, d), c| {
                (e + c.evaluated, r + c.rejected, d + c.differed)
            });
        if evaluated == 2 * PER_GATEWAY as u64 {
            assert_eq!((rejected, differed), (evaluated, evaluated));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the reported counts never reached every send: {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The sampled differences name the sends but carry no content by default.
    let printed = pair.diff_with(REJECT_ALL, 10).await;
    println!("policy diff {REJECT_ALL}:\n{printed}");
    assert!(printed.contains("user=sender-"), "{printed}");
    assert!(printed.contains("chain: allow"), "{printed}");
    assert!(printed.contains("reject FORBIDDEN"), "{printed}");
    assert!(!printed.contains("private words"), "{printed}");
    assert!(!printed.contains("content="), "{printed}");
    let limited = pair.diff(REJECT_ALL, 3);
    assert_eq!(
        limited.lines().filter(|l| l.contains("user=")).count(),
        3,
        "{limited}"
    );

    // Pushed with --sample-content, a candidate's samples carry the content.
    pair.push("reject-all-told", PushMode::Shadow, None, true)
        .await;
    let (user, conversation) = &senders[0];
    for base in pair.bases() {
        let answer = pair
            .send(&base, user, *conversation, "words the operator opted into")
            .await;
        assert!(answer.accepted(), "{answer:?}");
    }
    let printed = pair.diff_with("reject-all-told", 2).await;
    assert!(
        printed.contains(r#"content="words the operator opted into""#),
        "{printed}"
    );
    pair.rollback("reject-all-told").await;

    // Promote while four clients send through both gateways, alternately.
    let stop = Arc::new(AtomicBool::new(false));
    let answers: Arc<Mutex<Vec<(usize, Instant, Answer)>>> = Arc::default();
    let mut clients = Vec::new();
    for (user, conversation) in senders.clone() {
        let (http, token, bases) = (
            pair.system.http.clone(),
            pair.system.token(&user),
            pair.bases(),
        );
        let (stop, answers) = (stop.clone(), answers.clone());
        clients.push(tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let g = n % 2;
                let started = Instant::now();
                let answer = send(&http, &bases[g], &token, conversation, "during the swap").await;
                answers.lock().expect("answers").push((g, started, answer));
                n += 1;
            }
        }));
    }
    // Traffic first, through both gateways.
    while answers.lock().expect("answers").len() < 20 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let promoted = Instant::now();
    pair.promote(REJECT_ALL).await;
    let both_report = pair.both_run_the_chain().await;
    // Keep sending until each gateway answered some sends begun after both reported.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let after = answers
            .lock()
            .expect("answers")
            .iter()
            .filter(|(_, started, _)| *started > both_report)
            .fold([0usize; 2], |mut n, (g, _, _)| {
                n[*g] += 1;
                n
            });
        if after.iter().all(|&n| n >= 10) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "too few sends after the promotion"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.expect("client");
    }

    let answers = answers.lock().expect("answers").clone();
    for (g, _, answer) in &answers {
        assert!(
            answer.accepted() || answer.refused_by_the_candidate(),
            "gateway {g} failed a request during the promotion: {answer:?}"
        );
    }
    for (g, started, answer) in &answers {
        if *started > both_report {
            assert!(
                answer.refused_by_the_candidate(),
                "gateway {g} let a send through after it reported the promoted chain: {answer:?}"
            );
        }
    }
    for g in 0..2 {
        let first = answers
            .iter()
            .filter(|(at, _, answer)| *at == g && answer.refused_by_the_candidate())
            .map(|(_, started, _)| started.saturating_duration_since(promoted))
            .min();
        println!("gateway {g}: enforcing {first:?} after the promote command started");
    }
    println!(
        "both gateways reported the promoted chain {:?} after the promote command started; {} sends, none failed",
        both_report - promoted,
        answers.len()
    );

    // Rolled back, the policy leaves the chain and sends go out again.
    pair.rollback(REJECT_ALL).await;
    for base in pair.bases() {
        let answer = pair
            .send(&base, user, *conversation, "after the rollback")
            .await;
        assert!(answer.accepted(), "{answer:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_rejects_for_a_stable_fifth_of_senders_and_none_of_the_others() {
    // Its own name: the test process's gateways share one metrics registry.
    const CANARY: &str = "reject-some";
    const SENDERS: usize = 200;
    const PERCENT: u8 = 20;
    const ROUNDS: usize = 2;
    let pair = Pair::start().await;
    let senders = senders(&pair.system, SENDERS).await;
    pair.push(CANARY, PushMode::Canary, Some(PERCENT), false)
        .await;

    let mut rejected_sets = Vec::new();
    for round in 0..ROUNDS {
        for (g, base) in pair.bases().iter().enumerate() {
            let pair = &pair;
            let answers: Vec<(String, Answer)> = futures::stream::iter(senders.iter())
                .map(|(user, conversation)| async move {
                    let answer = pair.send(base, user, *conversation, "canary").await;
                    (user.clone(), answer)
                })
                .buffer_unordered(16)
                .collect()
                .await;
            let mut rejected = BTreeSet::new();
            for (user, answer) in answers {
                if answer.refused_by_the_candidate() {
                    rejected.insert(user);
                } else {
                    assert!(
                        answer.accepted(),
                        "round {round}, gateway {g}, {user}: {answer:?}"
                    );
                }
            }
            rejected_sets.push(rejected);
        }
    }
    let rejected = rejected_sets[0].clone();
    println!(
        "the {PERCENT}% canary rejected {} of {SENDERS} senders",
        rejected.len()
    );
    for (i, other) in rejected_sets.iter().enumerate() {
        assert_eq!(other, &rejected, "run {i} rejected other senders");
    }
    assert!(
        (SENDERS / 10..=SENDERS * 3 / 10).contains(&rejected.len()),
        "{} of {SENDERS} senders rejected by a {PERCENT}% canary",
        rejected.len()
    );
    // The share is the senders' stable hash, the same that any gateway computes.
    let hashed: BTreeSet<String> = senders
        .iter()
        .map(|(user, _)| user.clone())
        .filter(|user| canary_bucket(CANARY, user) < PERCENT)
        .collect();
    assert_eq!(rejected, hashed);
    // For the others it ran in shadow: counted as would-be rejections, never enforced.
    let shadowed = ((SENDERS - rejected.len()) * ROUNDS) as f64;
    assert_eq!(pair.shadow_rejections(CANARY).await, [shadowed, shadowed]);

    // Rolled back, the canary is gone and every sender's send goes out.
    pair.rollback(CANARY).await;
    for user in rejected.iter().take(10) {
        let conversation = senders
            .iter()
            .find(|(u, _)| u == user)
            .map(|(_, c)| *c)
            .expect("sender");
        for base in pair.bases() {
            let answer = pair
                .send(&base, user, conversation, "after the rollback")
                .await;
            assert!(answer.accepted(), "{user}: {answer:?}");
        }
    }
}
