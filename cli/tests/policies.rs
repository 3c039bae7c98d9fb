//! The policy chain on a running gateway: hot swap under load, rollback, refusals, and a
//! hostile policy contained, all through NATS as operators do it.

use hotpath_testkit as support;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hotpath::policy::{PolicyCommand, Push, PushMode, run as policy};
use serde_json::{Value, json};
use support::{System, metric_sum, text};
use uuid::Uuid;

fn dist(file: &str) -> PathBuf {
    support::policy_dir().join(file)
}

/// Writes `bytes` to a file in the test's temp dir and returns its path.
fn file(system: &System, name: &str, bytes: &[u8]) -> PathBuf {
    let path = system.servers.dir.path().join(name);
    std::fs::write(&path, bytes).expect("write module");
    path
}

async fn push(
    system: &System,
    name: &str,
    module: PathBuf,
    vectors: Option<PathBuf>,
    local_check: bool,
) {
    let command = PolicyCommand::Push(Push {
        module,
        name: name.to_string(),
        vectors,
        on_error: "deny".into(),
        no_local_check: !local_check,
        mode: PushMode::Enforce,
        percent: None,
        sample_content: false,
    });
    policy(command, &system.nats_target()).await.expect("push");
}

async fn rollback(system: &System, name: &str) {
    policy(
        PolicyCommand::Rollback { name: name.into() },
        &system.nats_target(),
    )
    .await
    .expect("rollback");
}

/// Waits until the gateway reports `state` for chain `version`; returns the reason if any.
async fn gateway_reports(system: &System, version: u64, state: &str) -> Option<String> {
    let store = system.policy_store().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let statuses = store.statuses().await.expect("statuses");
        if let Some(status) = statuses
            .iter()
            .find(|s| s.chain_version == version && s.state == state)
        {
            return status.reason.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no gateway reported {state} for version {version}: {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn chain_version(system: &System) -> u64 {
    system
        .policy_store()
        .await
        .chain()
        .await
        .expect("chain")
        .0
        .version
}

/// `content` sent by alice to `conversation`: the status and error code.
async fn outcome(system: &System, conversation: Uuid, content: &str) -> (u16, String) {
    let (status, body) = system.send("alice", text(conversation, content)).await;
    (
        status,
        body["error"]["code"].as_str().unwrap_or("").to_string(),
    )
}

const ALLOW_ALL: &str = r#"(module
  (memory (export "memory") 1)
  (data (i32.const 0) "{\"verdict\":\"allow\"}")
  (func (export "hotpath_abi_version") (result i32) i32.const 1)
  (func (export "hotpath_alloc") (param i32) (result i32) i32.const 1024)
  (func (export "hotpath_validate") (param i32 i32) (result i64) i64.const 19))"#;

const INFINITE_LOOP: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "hotpath_abi_version") (result i32) i32.const 1)
  (func (export "hotpath_alloc") (param i32) (result i32) i32.const 1024)
  (func (export "hotpath_validate") (param i32 i32) (result i64) (loop (br 0)) i64.const 0))"#;

const IMPORTS_SOMETHING: &str = r#"(module
  (import "env" "now" (func $now (result i64)))
  (memory (export "memory") 1)
  (func (export "hotpath_abi_version") (result i32) i32.const 1)
  (func (export "hotpath_alloc") (param i32) (result i32) i32.const 1024)
  (func (export "hotpath_validate") (param i32 i32) (result i64) call $now))"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_pushed_under_load_is_active_within_a_second_and_no_request_fails() {
    let system = System::start().await;
    let conversation = system.conversation("alice", "group", &["bob"]).await;
    assert_eq!(
        outcome(&system, conversation, "forbidden-word before")
            .await
            .0,
        202
    );

    // Four clients send continuously through the swap; every send must be answered 202.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for client in 0..4 {
        let (http, url, token) = (
            system.http.clone(),
            system.url("/v1/messages"),
            system.token("bob"),
        );
        let (stop, sent) = (stop.clone(), sent.clone());
        clients.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let body = json!({"conversationId": conversation.to_string(), "content": format!("client {client} #{n}"),
                                  "contentType": "text", "clientMessageId": format!("c{client}-{n}")});
                match http.post(&url).bearer_auth(&token).json(&body).timeout(Duration::from_secs(5)).send().await {
                    Ok(response) if response.status() == 202 => {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(response) => failures.push(format!("status {}", response.status())),
                    Err(error) => failures.push(format!("error {error}")),
                }
            }
            failures
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    push(
        &system,
        "banned-word",
        dist("banned-word-c.wasm"),
        Some(dist("banned-word-c.vectors.json")),
        true,
    )
    .await;
    let pushed = Instant::now();
    let active_after = loop {
        if outcome(&system, conversation, "this has forbidden-word in it").await
            == (403, "FORBIDDEN".into())
        {
            break pushed.elapsed();
        }
        assert!(
            pushed.elapsed() < Duration::from_secs(10),
            "the pushed policy never took effect"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        let failures = client.await.expect("client");
        assert!(
            failures.is_empty(),
            "requests failed during the swap: {failures:?}"
        );
    }
    assert!(sent.load(Ordering::Relaxed) > 0);
    println!("policy active {active_after:?} after the push");
    assert!(
        active_after <= Duration::from_secs(1),
        "took {active_after:?}"
    );
    // Only that word in a group is refused; the rest of the chain still runs.
    assert_eq!(outcome(&system, conversation, "clean words").await.0, 202);
    assert_eq!(
        outcome(&system, Uuid::new_v4(), "x").await,
        (404, "CONVERSATION_NOT_FOUND".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_restores_the_previous_module() {
    let system = System::start().await;
    let conversation = system.conversation("alice", "group", &["bob"]).await;
    push(
        &system,
        "banned-word",
        dist("banned-word-c.wasm"),
        None,
        true,
    )
    .await;
    let banning = chain_version(&system).await;
    gateway_reports(&system, banning, "active").await;
    assert_eq!(
        outcome(&system, conversation, "forbidden-word").await.0,
        403
    );

    let allow_all = file(
        &system,
        "allow.wasm",
        &wat::parse_str(ALLOW_ALL).expect("wat"),
    );
    push(&system, "banned-word", allow_all, None, true).await;
    gateway_reports(&system, chain_version(&system).await, "active").await;
    assert_eq!(
        outcome(&system, conversation, "forbidden-word").await.0,
        202
    );

    rollback(&system, "banned-word").await;
    gateway_reports(&system, chain_version(&system).await, "active").await;
    assert_eq!(
        outcome(&system, conversation, "forbidden-word").await,
        (403, "FORBIDDEN".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_modules_are_refused_and_the_old_chain_keeps_serving() {
    let system = System::start().await;
    let conversation = system.conversation("alice", "group", &["bob"]).await;
    let broken: Vec<(&str, Vec<u8>, Option<PathBuf>, &str)> = vec![
        (
            "does not compile",
            b"\0asm this is not wasm".to_vec(),
            None,
            "compile",
        ),
        (
            "imports a function",
            wat::parse_str(IMPORTS_SOMETHING).expect("wat"),
            None,
            "env.now",
        ),
        (
            "fails its vectors",
            std::fs::read(dist("banned-word-c.wasm")).expect("module"),
            // The C policy's vectors do not describe the schema policy's behaviour.
            Some(dist("schema.vectors.json")),
            "vector",
        ),
    ];
    for (case, bytes, vectors, reason_mentions) in broken {
        // Pushed as a new version of `schema`, bypassing the local check: the gateway decides.
        let module = file(&system, "broken.wasm", &bytes);
        push(&system, "schema", module, vectors, false).await;
        let version = chain_version(&system).await;
        let reason = gateway_reports(&system, version, "refused")
            .await
            .unwrap_or_default();
        assert!(
            reason.contains(reason_mentions),
            "{case}: reason {reason:?}"
        );
        // Still the shipped schema: its rules apply and good messages pass.
        let mut too_long = text(conversation, "x");
        too_long["content"] = json!("x".repeat(10_001));
        let (status, body) = system.send("alice", too_long).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("FIELD_TOO_LONG")),
            "{case}"
        );
        assert_eq!(
            outcome(&system, conversation, "still fine").await.0,
            202,
            "{case}"
        );
        rollback(&system, "schema").await;
        gateway_reports(&system, chain_version(&system).await, "active").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_stuck_in_a_loop_is_stopped_and_the_gateway_keeps_answering() {
    let system = System::start().await;
    let conversation = system.conversation("alice", "group", &["bob"]).await;
    let looping = file(
        &system,
        "loop.wasm",
        &wat::parse_str(INFINITE_LOOP).expect("wat"),
    );
    push(&system, "stuck", looping, None, true).await;
    gateway_reports(&system, chain_version(&system).await, "active").await;

    let started = Instant::now();
    let (status, body): (u16, Value) = system.send("alice", text(conversation, "hello")).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "FORBIDDEN");
    assert_eq!(
        body["error"]["details"],
        json!({"policy": "stuck", "failure": "deadline"})
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the request hung"
    );

    // Other routes answer, and removing the policy restores sending.
    assert_eq!(
        system
            .http
            .get(system.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let metrics = system.metrics().await;
    // Counted, not only present: each policy's failure kinds are exported at 0 from the swap.
    assert!(
        metric_sum(
            &metrics,
            "policy_failures_total",
            "kind=\"deadline\",policy=\"stuck\""
        ) >= 1.0,
        "{metrics}"
    );
    let allow_all = file(
        &system,
        "allow.wasm",
        &wat::parse_str(ALLOW_ALL).expect("wat"),
    );
    push(&system, "stuck", allow_all, None, true).await;
    gateway_reports(&system, chain_version(&system).await, "active").await;
    assert_eq!(outcome(&system, conversation, "hello again").await.0, 202);
}

/// `hotpath policy bench --preemption` runs the shipped chain from several threads and tells
/// the chains no other thread preempted apart, as a share of all of them.
#[test]
fn the_policy_bench_reports_the_chains_not_preempted() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_hotpath"))
        .args(["policy", "bench", "--iterations", "50", "--threads", "3"])
        .arg("--preemption")
        .arg("--dir")
        .arg(support::policy_dir())
        .output()
        .expect("hotpath policy bench runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("CPU"), "{stdout}");
    let share: f64 = stdout
        .lines()
        .find(|line| line.trim_start().starts_with("unpreempted"))
        .and_then(|line| line.split("of the ").nth(1))
        .and_then(|rest| rest.split('%').next())
        .and_then(|share| share.parse().ok())
        .unwrap_or_else(|| panic!("no share of chains not preempted in {stdout}"));
    assert!((0.0..=100.0).contains(&share), "{stdout}");
}
