//! A policy written with the C SDK (policies/sdk-c), end to end: `link-limit-c` passes its
//! test vectors through `hotpath policy test`, is pushed with them, and once the gateway runs
//! it, a send with more than three links is refused with the policy's code and details while
//! one with three goes out.

use hotpath_testkit as support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hotpath::nats_target::NatsTarget;
use hotpath::policy::{PolicyCommand, Push, PushMode, run as policy};
use hotpath_core::policy_store::PolicyStore;
use serde_json::json;
use support::{System, text};

fn dist(file: &str) -> PathBuf {
    support::policy_dir().join(file)
}

/// Waits until a gateway reports that it runs chain `version`.
async fn gateway_runs(store: &PolicyStore, version: u64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let statuses = store.statuses().await.expect("statuses");
        if statuses
            .iter()
            .any(|s| s.chain_version == version && s.state == "active")
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no gateway runs chain version {version}: {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn links(n: usize) -> String {
    (0..n)
        .map(|i| format!("see HTTPS://example.com/{i} é"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_link_limit_written_in_c_passes_its_vectors() {
    let command = PolicyCommand::Test {
        module: dist("link-limit-c.wasm"),
        vectors: dist("link-limit-c.vectors.json"),
    };
    // `policy test` reads the two files only; it never connects to NATS.
    let nowhere = NatsTarget::new("nats://127.0.0.1:1".into(), None);
    policy(command, &nowhere)
        .await
        .expect("every vector passes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_link_limit_written_in_c_refuses_a_fourth_link_once_pushed() {
    let system = System::start().await;
    let conversation = system.conversation("alice", "group", &["bob"]).await;
    let store = system.policy_store().await;
    let before = store.chain().await.expect("chain").0.version;

    let command = PolicyCommand::Push(Push {
        module: dist("link-limit-c.wasm"),
        name: "link-limit".into(),
        vectors: Some(dist("link-limit-c.vectors.json")),
        on_error: "deny".into(),
        no_local_check: false,
        mode: PushMode::Enforce,
        percent: None,
        sample_content: false,
    });
    policy(command, &system.nats_target()).await.expect("push");
    let (chain, _) = store.chain().await.expect("chain");
    assert!(chain.version > before, "the push made no new chain");
    assert!(
        chain.policies.iter().any(|p| p.name == "link-limit"),
        "link-limit is not in the chain: {chain:?}"
    );
    gateway_runs(&store, chain.version).await;

    let (status, body) = system.send("alice", text(conversation, &links(4))).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "INVALID_SCHEMA", "{body}");
    assert_eq!(
        body["error"]["details"],
        json!({"maxLinks": 3, "links": 4}),
        "{body}"
    );
    assert_eq!(
        body["error"]["message"], "content has more than 3 links",
        "{body}"
    );

    let (status, body) = system.send("alice", text(conversation, &links(3))).await;
    assert_eq!(status, 202, "{body}");
}
