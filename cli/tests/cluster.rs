//! Hotpath on the production NATS: a three-node JetStream cluster run from `nats/cluster/`,
//! with the accounts, every role connected as its own least-privilege user.
//!
//! * A message goes all the way (persisted, fanned out to a socket on one gateway, pushed to
//!   an offline device, its receipt recorded) with every role on its own user, and none of
//!   them is refused anything on the way: the permission lists are complete.
//! * Each list is tested by what it forbids: every attempt below is refused by the server with
//!   a permissions violation (the server's own word, not a timeout that could mean anything),
//!   and nothing anonymous gets in.
//!
//! * The node leading `MESSAGES` killed with SIGKILL under a bounded load of careful clients:
//!   every message accepted is stored once, each conversation gap-free in sending order, every
//!   503 says when to retry, and the node, restarted, rejoins and catches up.
//!
//! A cluster takes a few seconds to start and three nats-servers' worth of the two CI cores,
//! so this file starts one per test and as few tests as it can.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use futures::{FutureExt as _, StreamExt as _};
use hotpath::dlq::{self, DlqCommand};
use hotpath::nats_target::NatsTarget;
use hotpath::policy::{self, PolicyCommand, Push, PushMode};
use hotpath_core::names::MESSAGES_STREAM;
use hotpath_core::nats_auth::NatsUser;
use hotpath_core::policy_store::PolicyStore;
use hotpath_localstack::{Health, NatsRole};
use hotpath_testkit as support;
use serde_json::{Value, json};
use support::cluster::{ClusterSystem, nats_user};
use support::ws;
use tokio::sync::mpsc;
use uuid::Uuid;

/// How long a refused request may take to be reported.
const PATIENCE: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_three_node_cluster_each_role_does_its_job_as_its_own_user_and_nothing_else() {
    let mut system = ClusterSystem::start(3).await;
    assert_replicas(&system, 3).await;
    a_message_goes_all_the_way(&system).await;
    the_gateway_may_not(&system).await;
    the_consumers_may_not(&system).await;
    the_push_workers_may_not(&system).await;
    nobody_gets_in_without_a_known_key(&system).await;
    the_operator_commands_run_with_the_operator_key(&system).await;
    a_policy_on_trial_leaves_decision_samples(&system).await;
    system.stop().await;
    // Set-up applies the replica count to what exists too.
    let mut fewer = system.config.clone();
    fewer.nats_replicas = 1;
    hotpath::roles::prepare(&fewer).await.expect("set-up again");
    assert_replicas(&system, 1).await;
    // The servers log every refusal with the client's name: the probes' above, and none of
    // the roles' (named hotpath-<role>) from start to stop.
    let logs: Vec<String> = system
        .nats
        .nodes()
        .iter()
        .map(|node| std::fs::read_to_string(node.log_path()).expect("node log"))
        .collect();
    let violations: Vec<&str> = logs
        .iter()
        .flat_map(|log| log.lines())
        .filter(|line| line.contains("Violation"))
        .collect();
    assert!(
        violations.iter().any(|line| line.contains("probe-gateway")),
        "the servers log refusals with the client's name: {violations:#?}"
    );
    let refused: Vec<&&str> = violations
        .iter()
        .filter(|line| line.contains("hotpath-"))
        .collect();
    assert!(
        refused.is_empty(),
        "a role was refused something it needs: {refused:#?}"
    );
}

/// Conversations sending at once, and messages each sends, one after the other.
const SENDERS: usize = 4;
const MESSAGES_EACH: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_messages_leader_loses_no_accepted_message_and_the_node_catches_up() {
    let mut system = ClusterSystem::start(3).await;
    let operator = jetstream::new(
        system
            .connect_as(NatsRole::Operator)
            .await
            .expect("operator"),
    );
    let leader = stream_leader(&operator).await;
    let victim = system
        .nats
        .node_named(&leader)
        .expect("the leader is a node");

    // Careful clients send while the leader dies: each 202 counts towards the kill.
    let accepted = Arc::new(AtomicUsize::new(0));
    let mut senders = Vec::new();
    for _ in 0..SENDERS {
        let conversation = system.conversation("alice", &["bob"]).await;
        let client = CarefulClient::new(&system, accepted.clone());
        senders.push(tokio::spawn(client.send_all(conversation)));
    }
    wait_until(|| accepted.load(Ordering::SeqCst) >= SENDERS * 5).await;
    system.nats.node_mut(victim).kill().await.expect("kill -9");
    eprintln!(
        "killed {leader}, the MESSAGES leader, after {} accepted sends",
        accepted.load(Ordering::SeqCst)
    );

    let mut unavailable = 0;
    for sender in senders {
        unavailable += sender.await.expect("the sender finishes");
    }
    eprintln!("{unavailable} sends answered 503 (each with Retry-After) and retried");
    let total = (SENDERS * MESSAGES_EACH) as i64;
    assert_eq!(system.wait_for_messages(total, PATIENCE * 6).await, total);
    let rows = support::assert_gap_free_in_acceptance_order(&system.pool).await;
    assert_eq!(
        rows,
        SENDERS * MESSAGES_EACH,
        "every accepted message stored once"
    );

    // Back on its ports and store, the node rejoins and catches up with every stream.
    let node = system.nats.node_mut(victim);
    node.restart().await.expect("the node starts again");
    node.wait_healthy(Health::Current, PATIENCE * 6)
        .await
        .expect("the node is current again");
    assert_replicas_current(&operator, &leader).await;
    system.stop().await;
}

/// The server that leads `MESSAGES` now.
async fn stream_leader(js: &jetstream::Context) -> String {
    let mut stream = js.get_stream(MESSAGES_STREAM).await.expect("MESSAGES");
    let info = stream.info().await.expect("info");
    info.cluster
        .as_ref()
        .and_then(|cluster| cluster.leader.clone())
        .expect("MESSAGES has a leader")
}

/// Every replica of `MESSAGES`, `rejoined`'s included, is current.
async fn assert_replicas_current(js: &jetstream::Context, rejoined: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE * 3;
    loop {
        let mut stream = js.get_stream(MESSAGES_STREAM).await.expect("MESSAGES");
        let cluster = stream.info().await.expect("info").cluster.clone();
        let peers = cluster.map(|c| {
            let leader = c.leader.unwrap_or_default();
            let mut peers: Vec<(String, bool)> = c
                .replicas
                .into_iter()
                .map(|p| (p.name, p.current))
                .collect();
            peers.push((leader, true));
            peers
        });
        let peers = peers.unwrap_or_default();
        let all_current = peers.len() == 3 && peers.iter().all(|(_, current)| *current);
        if all_current && peers.iter().any(|(name, _)| name == rejoined) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "MESSAGES's replicas are not all current: {peers:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_until(done: impl Fn() -> bool) {
    tokio::time::timeout(PATIENCE * 3, async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("in time");
}

/// A client as a careful application writes it: one message at a time per conversation, each
/// with its own `clientMessageId`; on 503 it waits what Retry-After says and sends the same
/// request again (the same id, so a retry of a send that did get through is recognised).
struct CarefulClient {
    http: reqwest::Client,
    url: String,
    token: String,
    accepted: Arc<AtomicUsize>,
}

impl CarefulClient {
    fn new(system: &ClusterSystem, accepted: Arc<AtomicUsize>) -> CarefulClient {
        CarefulClient {
            http: system.http.clone(),
            url: format!("{}/v1/messages", system.base),
            token: system.token("alice"),
            accepted,
        }
    }

    /// Sends every message of `conversation`; returns how many 503s it was answered.
    async fn send_all(self, conversation: Uuid) -> usize {
        let mut unavailable = 0;
        for n in 0..MESSAGES_EACH {
            let body = json!({"conversationId": conversation, "content": format!("m{n}"),
                              "contentType": "text", "clientMessageId": format!("m{n}")});
            unavailable += self.send(&body).await;
            self.accepted.fetch_add(1, Ordering::SeqCst);
        }
        unavailable
    }

    /// Sends `body` until it is accepted; returns how many 503s it took.
    async fn send(&self, body: &Value) -> usize {
        for unavailable in 0..60 {
            let response = self
                .http
                .post(&self.url)
                .bearer_auth(&self.token)
                .json(body)
                .send()
                .await
                .expect("the gateway answers");
            match response.status().as_u16() {
                202 => return unavailable,
                503 => {
                    let retry_after = response
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                        .expect("a 503 says when to come back (Retry-After)");
                    tokio::time::sleep(Duration::from_secs(retry_after)).await;
                }
                status => panic!("{status}: {}", response.text().await.unwrap_or_default()),
            }
        }
        panic!("{body} was never accepted")
    }
}

/// Persisted, on bob's socket, pushed to carol's phone, and bob's receipt back to alice.
async fn a_message_goes_all_the_way(system: &ClusterSystem) {
    let registered = system
        .post(
            "carol",
            "/v1/devices",
            json!({"platform": "fcm", "token": "fcm-carol", "appId": "com.example.chat"}),
        )
        .await;
    assert!(registered.status().is_success(), "{}", registered.status());
    let conversation = system.conversation("alice", &["bob", "carol"]).await;
    let mut alice = socket(system, "alice").await;
    let mut bob = socket(system, "bob").await;

    let response = system
        .post(
            "alice",
            "/v1/messages",
            json!({"conversationId": conversation, "content": "hello, cluster",
                   "contentType": "text", "clientMessageId": "c-1"}),
        )
        .await;
    assert_eq!(response.status(), 202);
    let ack: Value = response.json().await.expect("json");
    let message = support::message_id_of(&ack);

    assert_eq!(system.wait_for_messages(1, PATIENCE).await, 1, "persisted");
    let new = ws::next_of(&mut bob, "message.new").await;
    assert_eq!(new["message"]["messageId"], message.to_string(), "{new}");
    let pushed = system.recorder.wait_for(1, PATIENCE).await;
    assert_eq!(pushed.len(), 1, "carol's phone is pushed");
    assert_eq!(pushed[0].0.token, "fcm-carol");

    ws::acknowledge(&mut bob, message, "delivered").await;
    let changes = ws::state_changes(&mut alice, 2, Duration::ZERO).await;
    assert!(
        changes.contains(&ws::state_change(message, "delivered")),
        "{changes:?}"
    );
}

async fn socket(system: &ClusterSystem, user: &str) -> ws::Socket {
    let mut socket = ws::open(&system.base, &system.token(user)).await;
    ws::ping(&mut socket).await;
    socket
}

async fn the_gateway_may_not(system: &ClusterSystem) {
    let mut gateway = Probe::connect(system, NatsRole::Gateway).await;
    // Delete a stream.
    gateway
        .refused_request("$JS.API.STREAM.DELETE.MESSAGES", "")
        .await;
    // Read MESSAGES as a consumer would: make one, or fetch from a delivery consumer's.
    let snoop = json!({"stream_name": MESSAGES_STREAM,
                       "config": {"durable_name": "snoop", "filter_subject": "msgs.in.0"}});
    gateway
        .refused_request(
            "$JS.API.CONSUMER.CREATE.MESSAGES.snoop.msgs.in.0",
            &snoop.to_string(),
        )
        .await;
    gateway
        .refused_request(
            "$JS.API.CONSUMER.MSG.NEXT.MESSAGES.delivery-0",
            "{\"batch\":1}",
        )
        .await;
    // Pose as the consumers to a user's sockets.
    gateway.refused_publish("deliver.user.bob").await;
    // Read another role's replies.
    gateway.refused_subscribe("_INBOX_consumers.>").await;
    assert_messages_stream_intact(system).await;
}

async fn the_consumers_may_not(system: &ClusterSystem) {
    let mut consumers = Probe::connect(system, NatsRole::Consumers).await;
    // What it may: dead-letter a message it could not store (no poison message came by).
    consumers.dead_letter("dlq.messages").await;
    // Inject messages as if a gateway had accepted them.
    consumers.refused_publish("msgs.in.0").await;
    // Touch the push workers' durables: delete one, or make one of its own on PUSH.
    consumers
        .refused_request("$JS.API.CONSUMER.DELETE.PUSH.push-fcm", "")
        .await;
    consumers
        .refused_request("$JS.API.CONSUMER.MSG.NEXT.PUSH.push-fcm", "{\"batch\":1}")
        .await;
    // Change a stream.
    consumers
        .refused_request("$JS.API.STREAM.PURGE.MESSAGES", "")
        .await;
}

async fn the_push_workers_may_not(system: &ClusterSystem) {
    let mut push = Probe::connect(system, NatsRole::Push).await;
    push.dead_letter("dlq.push").await;
    // Read MESSAGES in any way.
    push.refused_request("$JS.API.STREAM.INFO.MESSAGES", "")
        .await;
    push.refused_request("$JS.API.DIRECT.GET.MESSAGES", "{\"seq\":1}")
        .await;
    push.refused_subscribe("msgs.in.>").await;
    // Publish anywhere but its own dead letters.
    push.refused_publish("dlq.messages").await;
    push.refused_publish("push.fcm").await;
}

async fn nobody_gets_in_without_a_known_key(system: &ClusterSystem) {
    for node in system.nats.nodes() {
        let anonymous = async_nats::ConnectOptions::new().connect(node.url()).await;
        assert!(
            anonymous.is_err(),
            "{} let an anonymous client in",
            node.name()
        );
    }
    let stranger = nkeys::KeyPair::new_user().seed().expect("seed");
    let dir = tempfile::tempdir().expect("dir");
    let creds = dir.path().join("stranger.nk");
    std::fs::write(&creds, stranger).expect("write");
    let refused = hotpath_core::streams::connect(
        &system.nats.urls(),
        "stranger",
        NatsUser::Gateway,
        Some(&creds),
    )
    .await
    .expect_err("an unknown key is refused");
    assert!(
        format!("{refused:#}").contains("authorization violation"),
        "{refused:#}"
    );
}

async fn the_operator_commands_run_with_the_operator_key(system: &ClusterSystem) {
    let operator = system.nats.creds(NatsRole::Operator);
    let target = NatsTarget::new(system.nats.urls(), Some(operator));
    policy::run(PolicyCommand::List, &target)
        .await
        .expect("hotpath policy list as the operator");
    let list = DlqCommand::List {
        source: None,
        limit: 10,
        json: false,
    };
    dlq::run(list, &target)
        .await
        .expect("hotpath dlq list as the operator");
    let anonymous = NatsTarget::new(system.nats.urls(), None);
    let refused = policy::run(PolicyCommand::List, &anonymous)
        .await
        .expect_err("no credentials, no entry");
    assert!(
        format!("{refused:#}").contains("authorization violation"),
        "{refused:#}"
    );
}

/// A module that would reject every send.
const REJECT_ALL: &str = r#"(module
  (memory (export "memory") 1)
  (data (i32.const 0) "{\"verdict\":\"reject\",\"code\":\"FORBIDDEN\",\"message\":\"no\"}")
  (func (export "hotpath_abi_version") (result i32) i32.const 1)
  (func (export "hotpath_alloc") (param i32) (result i32) i32.const 1024)
  (func (export "hotpath_validate") (param i32 i32) (result i64) i64.const 54))"#;

/// The operator puts a module on trial in shadow; the gateway, as its own user, evaluates it
/// and publishes where it would have answered otherwise, and the operator reads the sample.
async fn a_policy_on_trial_leaves_decision_samples(system: &ClusterSystem) {
    let operator = system.nats.creds(NatsRole::Operator);
    let target = NatsTarget::new(system.nats.urls(), Some(operator));
    let module = system.nats.dir().join("reject-all.wasm");
    std::fs::write(&module, wat::parse_str(REJECT_ALL).expect("wat")).expect("module");
    let push = PolicyCommand::Push(Push {
        module,
        name: "reject-all".into(),
        vectors: None,
        on_error: "deny".into(),
        no_local_check: false,
        mode: PushMode::Shadow,
        percent: None,
        sample_content: false,
    });
    policy::run(push, &target).await.expect("push in shadow");
    let js = jetstream::new(
        system
            .connect_as(NatsRole::Operator)
            .await
            .expect("operator"),
    );
    let store = PolicyStore::open(&js).await.expect("policy store");
    let version = store.chain().await.expect("chain").0.version;
    wait_until_async("the gateway runs the chain with the candidate", || async {
        let statuses = store.statuses().await.expect("statuses");
        statuses
            .iter()
            .any(|s| s.chain_version == version && s.state == "active")
    })
    .await;
    let conversation = system.conversation("alice", &["bob"]).await;
    let response = system
        .post(
            "alice",
            "/v1/messages",
            json!({"conversationId": conversation, "content": "tried", "contentType": "text"}),
        )
        .await;
    assert_eq!(response.status(), 202, "a shadow policy decides nothing");
    wait_until_async("the operator reads the gateway's sample", || async {
        let samples = PolicyStore::decisions(&js, "reject-all", 10)
            .await
            .expect("decisions");
        samples.iter().any(|s| s.user_id == "alice")
    })
    .await;
    policy::run(
        PolicyCommand::Rollback {
            name: "reject-all".into(),
        },
        &target,
    )
    .await
    .expect("rollback");
}

/// Waits (bounded by [`PATIENCE`]) until `condition` holds.
async fn wait_until_async<F, Fut>(what: &str, condition: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + PATIENCE;
    while !condition().await {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every stream Hotpath keeps, KV buckets and the object store included.
const ALL_STREAMS: [&str; 11] = [
    "MESSAGES",
    "REPLAY",
    "RECEIPTS",
    "PUSH",
    "DLQ",
    "KV_PRESENCE",
    "KV_PARTITION_LEASES",
    "KV_POLICY_CHAIN",
    "KV_POLICY_STATUS",
    "OBJ_POLICY_MODULES",
    "POLICY_DECISIONS",
];

async fn assert_replicas(system: &ClusterSystem, replicas: usize) {
    let operator = system
        .connect_as(NatsRole::Operator)
        .await
        .expect("operator");
    let js = jetstream::new(operator);
    for name in ALL_STREAMS {
        let mut stream = js.get_stream(name).await.expect("the stream exists");
        let info = stream.info().await.expect("info");
        assert_eq!(info.config.num_replicas, replicas, "{name}");
    }
}

/// The operator still sees MESSAGES as set-up made it.
async fn assert_messages_stream_intact(system: &ClusterSystem) {
    let operator = system
        .connect_as(NatsRole::Operator)
        .await
        .expect("operator");
    let mut stream = jetstream::new(operator)
        .get_stream(MESSAGES_STREAM)
        .await
        .expect("MESSAGES is still there");
    let info = stream.info().await.expect("info");
    let consumers = info.state.consumer_count;
    assert_eq!(consumers, system.config.partitions as usize, "no snoop");
}

/// A client of one role's user that sees what the server refuses it.
struct Probe {
    role: NatsRole,
    client: async_nats::Client,
    refusals: mpsc::UnboundedReceiver<String>,
}

impl Probe {
    async fn connect(system: &ClusterSystem, role: NatsRole) -> Probe {
        let (tx, refusals) = mpsc::unbounded_channel();
        let seed = read_seed(&system.nats.creds(role));
        let client = async_nats::ConnectOptions::with_nkey(seed)
            .name(format!("probe-{}", role.name()))
            .custom_inbox_prefix(nats_user(role).inbox_prefix())
            .event_callback(move |event| {
                let tx = tx.clone();
                async move {
                    if let async_nats::Event::ServerError(error) = event {
                        let _ = tx.send(error.to_string());
                    }
                }
            })
            .connect(urls(system))
            .await
            .expect("the role's user connects");
        Probe {
            role,
            client,
            refusals,
        }
    }

    /// Waits for the server to report a permissions violation for `what` to `subject`.
    async fn refused(&mut self, what: &str, subject: &str) {
        let expected = format!("Permissions Violation for {what} to \"{subject}\"");
        let role = self.role;
        tokio::time::timeout(PATIENCE, async {
            loop {
                let error = self.refusals.recv().await.expect("the client lives");
                if error.contains(&expected) {
                    return;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{role:?} was not refused: {expected}"));
    }

    /// Publishes to the DLQ through JetStream, which acknowledges it.
    async fn dead_letter(&mut self, subject: &str) {
        let js = jetstream::new(self.client.clone());
        js.publish(subject.to_string(), "probe".into())
            .await
            .expect("published")
            .await
            .unwrap_or_else(|error| panic!("{:?} may dead-letter: {error}", self.role));
    }

    async fn refused_publish(&mut self, subject: &str) {
        self.client
            .publish(subject.to_string(), "x".into())
            .await
            .expect("sent");
        self.client.flush().await.expect("flushed");
        self.refused("Publish", subject).await;
    }

    /// A request whose publish is refused: the server says why, and nothing answers it (a
    /// refused publish never reaches JetStream).
    async fn refused_request(&mut self, subject: &str, body: &str) {
        let inbox = self.client.new_inbox();
        let mut replies = self.client.subscribe(inbox.clone()).await.expect("inbox");
        self.client
            .publish_with_reply(subject.to_string(), inbox, body.to_string().into())
            .await
            .expect("sent");
        self.client.flush().await.expect("flushed");
        self.refused("Publish", subject).await;
        assert!(
            replies.next().now_or_never().is_none(),
            "{:?} got an answer from {subject}",
            self.role
        );
    }

    async fn refused_subscribe(&mut self, subject: &str) {
        let _subscription = self
            .client
            .subscribe(subject.to_string())
            .await
            .expect("sent");
        self.client.flush().await.expect("flushed");
        self.refused("Subscription", subject).await;
    }
}

fn urls(system: &ClusterSystem) -> Vec<String> {
    system.nats.nodes().iter().map(|node| node.url()).collect()
}

fn read_seed(path: &Path) -> String {
    std::fs::read_to_string(path)
        .expect("seed file")
        .trim()
        .to_string()
}
