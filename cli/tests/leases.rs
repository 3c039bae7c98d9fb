//! Consumer replicas as an operator runs them: real `hotpath consumers` processes of the built
//! binary against the test's NATS and Postgres, two of them configured for the same partitions,
//! one killed with SIGKILL, one configured to own nothing, and two replicas of two covering for
//! each other. What is asserted is what an operator can see: the rows in Postgres, the lease
//! values in the `PARTITION_LEASES` bucket, `/readyz`, and the log.

use hotpath_testkit as support;

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use futures::StreamExt;
use hotpath_consumers::lease::Timing;
use hotpath_core::names::{PARTITION_LEASES_BUCKET, partition_lease_key, partition_of};
use serde_json::{Value, json};
use support::{System, text};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_hotpath");

/// One `hotpath consumers` process, killed when dropped.
struct ConsumerProcess {
    child: Child,
    metrics: String,
    log: PathBuf,
}

impl ConsumerProcess {
    /// Starts replica `replica` of `replicas` with the test configuration.
    fn start(system: &System, name: &str, replica: u32, replicas: u32) -> ConsumerProcess {
        let config = &system.config;
        let port = hotpath_localstack::free_port().expect("free port");
        let log = system.servers.dir.path().join(format!("{name}.log"));
        let output = File::create(&log).expect("log file");
        let child = Command::new(BIN)
            .args([
                "consumers",
                "--metrics-listen",
                &format!("127.0.0.1:{port}"),
            ])
            .env("HOTPATH_NATS_URL", &config.nats_url)
            .env("HOTPATH_DATABASE_URL", &config.database_url)
            .env("HOTPATH_PARTITIONS", config.partitions.to_string())
            .env("HOTPATH_BATCH_SIZE", config.batch_size.to_string())
            .env("HOTPATH_ACK_WAIT_SECS", config.ack_wait_secs.to_string())
            .env("HOTPATH_LEASE_TTL_SECS", config.lease_ttl_secs.to_string())
            .env("HOTPATH_DB_MAX_CONNECTIONS", "5")
            .env("HOTPATH_POLICY_DIR", &config.policy_dir)
            .env("HOTPATH_CONSUMER_REPLICA", replica.to_string())
            .env("HOTPATH_CONSUMER_REPLICAS", replicas.to_string())
            .env("RUST_LOG", "info,sqlx=warn,async_nats=warn")
            .stdout(output.try_clone().expect("log file"))
            .stderr(output)
            .spawn()
            .expect("hotpath consumers starts");
        ConsumerProcess {
            child,
            metrics: format!("http://127.0.0.1:{port}"),
            log,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `/readyz`'s status and body, or `None` while the process does not answer yet.
    async fn readyz(&self, http: &reqwest::Client) -> Option<(u16, Value)> {
        let response = http
            .get(format!("{}/readyz", self.metrics))
            .send()
            .await
            .ok()?;
        let status = response.status().as_u16();
        Some((status, response.json().await.unwrap_or(Value::Null)))
    }

    /// Waits (bounded) until `/readyz` answers and satisfies `wanted`; returns the answer.
    async fn wait_for_readyz(
        &self,
        http: &reqwest::Client,
        what: &str,
        wanted: impl Fn(u16, &Value) -> bool,
    ) -> (u16, Value) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = None;
        while Instant::now() < deadline {
            if let Some((status, body)) = self.readyz(http).await {
                if wanted(status, &body) {
                    return (status, body);
                }
                last = Some((status, body));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "{what}: /readyz never did; last answer {last:?}; log:\n{}",
            self.log()
        );
    }

    /// SIGKILL: nothing is settled, nothing released.
    fn kill(&mut self) {
        self.child.kill().expect("SIGKILL delivered");
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for a clean exit.
    fn stop(mut self) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        assert_eq!(rc, 0, "SIGTERM delivered");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(
                    status.success(),
                    "exits cleanly on SIGTERM: {status}\n{}",
                    self.log()
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "did not stop within 30 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for ConsumerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The pid named by each partition's lease (`None`: nobody holds it).
async fn lease_holders(leases: &kv::Store, partitions: u32) -> BTreeMap<u32, Option<u32>> {
    let mut holders = BTreeMap::new();
    for partition in 0..partitions {
        let entry = leases
            .entry(partition_lease_key(partition))
            .await
            .expect("lease entry read");
        let pid = entry
            .filter(|entry| entry.operation == kv::Operation::Put)
            .and_then(|entry| serde_json::from_slice::<Value>(&entry.value).ok())
            .and_then(|value| value["pid"].as_u64())
            .map(|pid| pid as u32);
        holders.insert(partition, pid);
    }
    holders
}

/// Waits (at most `within`) until every partition's lease names one of `pids`; returns the
/// holders.
async fn wait_for_holders(
    leases: &kv::Store,
    partitions: u32,
    pids: &[u32],
    within: Duration,
) -> BTreeMap<u32, Option<u32>> {
    let deadline = Instant::now() + within;
    loop {
        let holders = lease_holders(leases, partitions).await;
        let all_held = holders
            .values()
            .all(|pid| pid.is_some_and(|pid| pids.contains(&pid)));
        if all_held || Instant::now() > deadline {
            return holders;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One change of a lease key, as the bucket recorded it.
struct LeaseChange {
    key: String,
    operation: kv::Operation,
    holder: Option<String>,
    /// The server's timestamp of the change, in nanoseconds since the epoch.
    created: i128,
}

/// Every change to the lease bucket from when it was started, as the bucket recorded it.
struct LeaseHistory {
    stop: CancellationToken,
    recording: tokio::task::JoinHandle<Vec<LeaseChange>>,
}

impl LeaseHistory {
    fn record(leases: &kv::Store) -> LeaseHistory {
        let (leases, stop) = (leases.clone(), CancellationToken::new());
        let until = stop.clone();
        let recording = tokio::spawn(async move {
            let mut watch = leases.watch_all().await.expect("watch the lease bucket");
            let mut changes = Vec::new();
            loop {
                let entry = tokio::select! {
                    entry = watch.next() => entry,
                    () = until.cancelled() => return changes,
                };
                let Some(Ok(entry)) = entry else {
                    return changes;
                };
                // The replicas' liveness keys share the bucket; only leases are recorded.
                if !entry.key.starts_with("partition-") {
                    continue;
                }
                let holder = serde_json::from_slice::<Value>(&entry.value)
                    .ok()
                    .and_then(|value| value["id"].as_str().map(str::to_string));
                changes.push(LeaseChange {
                    key: entry.key,
                    operation: entry.operation,
                    holder,
                    created: entry.created.unix_timestamp_nanos(),
                });
            }
        });
        LeaseHistory { stop, recording }
    }

    /// One holder at a time: a key passes from one holder to another only after the first
    /// released it (a delete) or stopped renewing it for a whole TTL (it expired).
    async fn assert_one_holder_at_a_time(self, ttl: Duration) {
        self.stop.cancel();
        let changes = self.recording.await.expect("recording");
        assert!(!changes.is_empty(), "the processes took leases");
        let mut current: BTreeMap<&str, (&str, i128)> = BTreeMap::new();
        for change in &changes {
            match (change.operation, &change.holder) {
                (kv::Operation::Put, Some(holder)) => {
                    if let Some(&(previous, renewed)) = current.get(change.key.as_str()) {
                        let quiet = Duration::from_nanos((change.created - renewed).max(0) as u64);
                        assert!(
                            previous == holder.as_str() || quiet >= ttl,
                            "{} passed from {previous} to {holder} {quiet:?} after the last \
                             renewal, without a release and before the lease ({ttl:?}) could expire",
                            change.key
                        );
                    }
                    current.insert(&change.key, (holder.as_str(), change.created));
                }
                (kv::Operation::Put, None) => {
                    panic!("{} holds a value that is no lease", change.key)
                }
                (kv::Operation::Delete | kv::Operation::Purge, _) => {
                    current.remove(change.key.as_str());
                }
            }
        }
    }
}

/// Sends `count` messages to `conversation` one after another (each waits for its 202), a
/// little apart, and returns their ids in sending order.
async fn send_sequentially(
    http: reqwest::Client,
    url: String,
    token: String,
    conversation: Uuid,
    count: usize,
) -> Vec<Uuid> {
    let mut ids = Vec::with_capacity(count);
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    for n in 0..count {
        tick.tick().await;
        ids.push(send_numbered(&http, &url, &token, conversation, n).await);
    }
    ids
}

/// Sends message `n` of `conversation` and returns its id once it is accepted.
async fn send_numbered(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    conversation: Uuid,
    n: usize,
) -> Uuid {
    let mut body = text(conversation, &format!("{n}"));
    body["clientMessageId"] = json!(format!("{conversation}-{n}"));
    let response = http
        .post(url)
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .expect("send completes");
    assert_eq!(response.status(), 202, "send {n} accepted");
    let ack: Value = response.json().await.expect("json");
    ack["messageId"]
        .as_str()
        .and_then(|id| Uuid::parse_str(id).ok())
        .expect("messageId")
}

/// Sends to `conversation` one message after another, one every 20 ms, until `stop` (or at
/// most `max`), and returns their ids in sending order.
async fn send_until_stopped(
    http: reqwest::Client,
    url: String,
    token: String,
    conversation: Uuid,
    stop: CancellationToken,
    max: usize,
) -> Vec<Uuid> {
    let mut ids = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    while ids.len() < max && !stop.is_cancelled() {
        tick.tick().await;
        ids.push(send_numbered(&http, &url, &token, conversation, ids.len()).await);
    }
    ids
}

/// A conversation per sender, each with one sequential sender running on its own task.
struct Load {
    conversations: Vec<Uuid>,
    senders: Vec<tokio::task::JoinHandle<Vec<Uuid>>>,
}

impl Load {
    async fn start(system: &System, conversations: usize, per_conversation: usize) -> Load {
        let mut load = Load {
            conversations: Vec::new(),
            senders: Vec::new(),
        };
        for i in 0..conversations {
            let sender = format!("sender-{i}");
            let conversation = system.conversation(&sender, "group", &["reader"]).await;
            load.conversations.push(conversation);
            load.senders.push(tokio::spawn(send_sequentially(
                system.http.clone(),
                system.url("/v1/messages"),
                system.token(&sender),
                conversation,
                per_conversation,
            )));
        }
        load
    }

    fn still_sending(&self) -> bool {
        self.senders.iter().any(|sender| !sender.is_finished())
    }

    /// Every sender's ids, in sending order, once all have finished.
    async fn finish(self) -> Vec<(Uuid, Vec<Uuid>)> {
        let mut sent = Vec::new();
        for (conversation, sender) in self.conversations.into_iter().zip(self.senders) {
            sent.push((conversation, sender.await.expect("sender")));
        }
        sent
    }
}

/// Every accepted message stored exactly once, and each conversation's seq order equal to the
/// order its sequential sender sent in.
async fn assert_stored_once_in_sending_order(system: &System, sent: &[(Uuid, Vec<Uuid>)]) {
    let total: usize = sent.iter().map(|(_, ids)| ids.len()).sum();
    let stored = system
        .wait_for_messages(total as i64, Duration::from_secs(90))
        .await;
    assert_eq!(stored, total as i64, "every accepted message stored, once");
    let rows = support::assert_gap_free_in_acceptance_order(&system.pool).await;
    assert_eq!(rows, total);
    let accepted: HashSet<Uuid> = sent
        .iter()
        .flat_map(|(_, ids)| ids.iter().copied())
        .collect();
    assert_eq!(accepted.len(), total, "every send got its own message id");
    for (conversation, ids) in sent {
        let by_seq = support::ids_in_seq_order(&system.pool, *conversation).await;
        assert!(
            by_seq == *ids,
            "conversation {conversation}: seq order differs from sending order"
        );
    }
}

/// A running gateway without consumers: the processes under test are the only ones.
async fn system_without_consumers() -> System {
    let mut system = System::start().await;
    system.stop_consumers().await;
    system
}

/// The test's view of the lease bucket (the in-process consumers started with the system
/// created it).
async fn lease_bucket(system: &System) -> kv::Store {
    system
        .jetstream()
        .await
        .get_key_value(PARTITION_LEASES_BUCKET)
        .await
        .expect("the PARTITION_LEASES bucket exists")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_for_the_same_partitions_persist_every_message_once_in_sending_order() {
    let system = system_without_consumers().await;
    let leases = lease_bucket(&system).await;
    let (partitions, ttl) = (system.config.partitions, system.config.lease_ttl());
    let history = LeaseHistory::record(&leases);

    // Both configured as replica 0 of 1: the same partitions, started together.
    let first = ConsumerProcess::start(&system, "first", 0, 1);
    let second = ConsumerProcess::start(&system, "second", 0, 1);
    let pids = [first.pid(), second.pid()];
    let holders = wait_for_holders(&leases, partitions, &pids, Duration::from_secs(60)).await;
    assert!(
        holders.values().all(|pid| pid.is_some()),
        "every partition has a holder: {holders:?}\nfirst:\n{}\nsecond:\n{}",
        first.log(),
        second.log()
    );

    let load = Load::start(&system, 6, 400).await;
    let sent = load.finish().await;
    assert_stored_once_in_sending_order(&system, &sent).await;

    // Each partition was processed by its lease holder; the other process stood by for it.
    let holders = lease_holders(&leases, partitions).await;
    let http = &system.http;
    let (_, first_ready) = first
        .wait_for_readyz(http, "first ready", |s, _| s == 200)
        .await;
    let (_, second_ready) = second
        .wait_for_readyz(http, "second ready", |s, _| s == 200)
        .await;
    for partition in 0..partitions {
        let holder = holders[&partition].expect("held");
        let (holding, standing_by) = if holder == first.pid() {
            (&first_ready, &second_ready)
        } else {
            (&second_ready, &first_ready)
        };
        assert!(
            holding["held"]
                .as_array()
                .unwrap()
                .contains(&json!(partition))
                && standing_by["standby"]
                    .as_array()
                    .unwrap()
                    .contains(&json!(partition)),
            "partition {partition}: held by {holder}, but /readyz says {first_ready} and {second_ready}"
        );
    }
    let standby_log = if holders.values().all(|&pid| pid == Some(first.pid())) {
        second.log()
    } else if holders.values().all(|&pid| pid == Some(second.pid())) {
        first.log()
    } else {
        format!("{}{}", first.log(), second.log())
    };
    assert!(
        standby_log.contains("standby for partitions"),
        "the process without leases says it stands by:\n{standby_log}"
    );

    first.stop();
    second.stop();
    history.assert_one_holder_at_a_time(ttl).await;
    // Stopping released every lease: nobody holds one now.
    let holders = lease_holders(&leases, partitions).await;
    assert!(
        holders.values().all(Option::is_none),
        "leases left after a clean stop: {holders:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_from_a_killed_holder_within_the_lease_ttl() {
    let system = system_without_consumers().await;
    let leases = lease_bucket(&system).await;
    let (partitions, ttl) = (system.config.partitions, system.config.lease_ttl());
    let history = LeaseHistory::record(&leases);

    let mut holder = ConsumerProcess::start(&system, "holder", 0, 1);
    let holders = wait_for_holders(
        &leases,
        partitions,
        &[holder.pid()],
        Duration::from_secs(60),
    )
    .await;
    assert!(
        holders.values().all(|&pid| pid == Some(holder.pid())),
        "the first process holds every partition: {holders:?}\n{}",
        holder.log()
    );
    let standby = ConsumerProcess::start(&system, "standby", 0, 1);
    let (_, ready) = standby
        .wait_for_readyz(&system.http, "the standby stands by", |status, body| {
            status == 200 && body["status"] == "standby"
        })
        .await;
    assert_eq!(
        ready["standby"].as_array().map(Vec::len),
        Some(partitions as usize)
    );
    assert!(
        standby.log().contains("standby for partitions"),
        "{}",
        standby.log()
    );

    // Under load, the holder dies without settling or releasing anything.
    let load = Load::start(&system, 4, 600).await;
    system.wait_for_messages(200, Duration::from_secs(30)).await;
    assert!(
        load.still_sending(),
        "the load ended before the holder could be killed"
    );
    holder.kill();
    let killed = Instant::now();

    let within = ttl + ttl / 3 + Duration::from_secs(5);
    let holders = wait_for_holders(&leases, partitions, &[standby.pid()], within).await;
    let took = killed.elapsed();
    assert!(
        holders.values().all(|&pid| pid == Some(standby.pid())),
        "the standby did not take every partition within {within:?} (TTL {ttl:?}): {holders:?}\n{}",
        standby.log()
    );
    eprintln!("the standby took over {took:?} after the kill (lease TTL {ttl:?})");

    let sent = load.finish().await;
    assert_stored_once_in_sending_order(&system, &sent).await;
    standby.stop();
    history.assert_one_holder_at_a_time(ttl).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_configured_to_own_no_partition_says_so_and_is_not_ready() {
    let system = system_without_consumers().await;
    // Replica indexes run from 0: replica 2 of 2 owns nothing.
    let misconfigured = ConsumerProcess::start(&system, "misconfigured", 2, 2);
    let (status, body) = misconfigured
        .wait_for_readyz(&system.http, "answers", |_, _| true)
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "owns_nothing", "{body}");
    assert!(
        body["reason"]
            .as_str()
            .is_some_and(|r| r.contains("HOTPATH_CONSUMER_REPLICA=2")),
        "{body}"
    );
    let says_so = |log: &str| {
        log.lines()
            .any(|line| line.contains("ERROR") && line.contains("owns no partitions"))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !says_so(&misconfigured.log()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = misconfigured.log();
    assert!(says_so(&log), "the start-up log says so loudly:\n{log}");
    misconfigured.stop();
}

/// Each partition's lease holder, as pids: `expected[p]` for every partition.
async fn wait_for_lease_map(
    leases: &kv::Store,
    expected: &BTreeMap<u32, u32>,
    within: Duration,
) -> BTreeMap<u32, Option<u32>> {
    let partitions = expected.len() as u32;
    let deadline = Instant::now() + within;
    loop {
        let holders = lease_holders(leases, partitions).await;
        let as_expected = expected
            .iter()
            .all(|(partition, pid)| holders[partition] == Some(*pid));
        if as_expected || Instant::now() > deadline {
            return holders;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (at most `within`) until a message of one of `partitions` accepted after `since` is
/// in Postgres; returns how long that took from `started`, `None` if it never came.
async fn wait_for_persisted_since(
    system: &System,
    partitions: &[u32],
    since: chrono::DateTime<chrono::Utc>,
    started: Instant,
    within: Duration,
) -> Option<Duration> {
    let partitions: Vec<i32> = partitions.iter().map(|&p| p as i32).collect();
    while started.elapsed() < within {
        let (count,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM messages WHERE stream_partition = ANY($1) AND accepted_at > $2",
        )
        .bind(&partitions)
        .bind(since)
        .fetch_one(&system.pool)
        .await
        .expect("count");
        if count > 0 {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// One conversation on every partition, each with a sender that sends one message every
/// 20 ms until the load is finished (and never more than `max`).
struct SteadyLoad {
    stop: CancellationToken,
    conversations: Vec<Uuid>,
    senders: Vec<tokio::task::JoinHandle<Vec<Uuid>>>,
}

impl SteadyLoad {
    async fn start_on_every_partition(system: &System, max: usize) -> SteadyLoad {
        let partitions = system.config.partitions;
        let mut on: BTreeMap<u32, (String, Uuid)> = BTreeMap::new();
        for attempt in 0..200 {
            if on.len() == partitions as usize {
                break;
            }
            let sender = format!("steady-{attempt}");
            let conversation = system.conversation(&sender, "group", &["reader"]).await;
            let partition = partition_of(&conversation.to_string(), partitions);
            on.entry(partition).or_insert((sender, conversation));
        }
        assert_eq!(
            on.len(),
            partitions as usize,
            "a conversation on every partition"
        );
        let stop = CancellationToken::new();
        let mut load = SteadyLoad {
            stop: stop.clone(),
            conversations: Vec::new(),
            senders: Vec::new(),
        };
        for (sender, conversation) in on.into_values() {
            load.conversations.push(conversation);
            load.senders.push(tokio::spawn(send_until_stopped(
                system.http.clone(),
                system.url("/v1/messages"),
                system.token(&sender),
                conversation,
                stop.clone(),
                max,
            )));
        }
        load
    }

    /// Stops the senders; every sender's ids, in sending order.
    async fn finish(self) -> Vec<(Uuid, Vec<Uuid>)> {
        self.stop.cancel();
        let mut sent = Vec::new();
        for (conversation, sender) in self.conversations.into_iter().zip(self.senders) {
            sent.push((conversation, sender.await.expect("sender")));
        }
        sent
    }
}

/// Room on top of a computed bound for a machine busy with other tests.
const SLACK: Duration = Duration::from_secs(2);

/// `/readyz`'s `covering` list is `partitions`.
fn covers(body: &Value, partitions: &[u32]) -> bool {
    body["covering"] == json!(partitions)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_covers_for_a_killed_replica_and_gives_its_share_back() {
    // The default lease TTL, so that what is measured is the bound as shipped.
    let mut system = System::start_with(|config| config.lease_ttl_secs = 10).await;
    system.stop_consumers().await;
    let leases = lease_bucket(&system).await;
    let partitions = system.config.partitions;
    let timing = Timing {
        ttl: system.config.lease_ttl(),
    };
    assert_eq!(partitions, 4, "replica 1 of 2 owns partitions 1 and 3");
    let history = LeaseHistory::record(&leases);

    let zero = ConsumerProcess::start(&system, "replica-0", 0, 2);
    let mut one = ConsumerProcess::start(&system, "replica-1", 1, 2);
    let shares = |zero: u32, one: u32| BTreeMap::from([(0, zero), (1, one), (2, zero), (3, one)]);
    let expected = shares(zero.pid(), one.pid());
    let holders = wait_for_lease_map(&leases, &expected, Duration::from_secs(60)).await;
    assert_eq!(
        holders,
        expected.iter().map(|(&p, &pid)| (p, Some(pid))).collect(),
        "each replica holds its own share\nreplica 0:\n{}\nreplica 1:\n{}",
        zero.log(),
        one.log()
    );

    let load = SteadyLoad::start_on_every_partition(&system, 3000).await;
    let (started, now) = (Instant::now(), chrono::Utc::now());
    let within = Duration::from_secs(30);
    let persisting = wait_for_persisted_since(&system, &[1, 3], now, started, within).await;
    assert!(
        persisting.is_some(),
        "replica 1 persists its share\n{}",
        one.log()
    );

    // Replica 1 dies without releasing anything; replica 0 takes its share over within the
    // bound (with room for a loaded machine), and persists from where replica 1 stopped: the
    // backlog that built up meanwhile, then what was accepted after the kill.
    one.kill();
    let (killed, killed_at) = (Instant::now(), chrono::Utc::now());
    let bound = timing.takeover_bound();
    let everything_zero = shares(zero.pid(), zero.pid());
    let holders = wait_for_lease_map(&leases, &everything_zero, bound + SLACK).await;
    let took_over = killed.elapsed();
    assert!(
        holders.values().all(|&pid| pid == Some(zero.pid())),
        "replica 0 did not take replica 1's share within {:?}: {holders:?}\n{}",
        bound + SLACK,
        zero.log()
    );
    let within = bound + SLACK + Duration::from_secs(10);
    let persisted = wait_for_persisted_since(&system, &[1, 3], killed_at, killed, within)
        .await
        .unwrap_or_else(|| panic!("nothing accepted after the kill persisted\n{}", zero.log()));
    eprintln!(
        "replica 0 took replica 1's share {took_over:?} after the kill and persisted what was \
         sent after it {persisted:?} after it (lease TTL {:?}, bound {bound:?})",
        timing.ttl
    );
    zero.wait_for_readyz(&system.http, "replica 0 covers 1 and 3", |status, body| {
        status == 200 && covers(body, &[1, 3])
    })
    .await;

    // Replica 1 comes back: its share is handed back to it, and it persists it again.
    let one = ConsumerProcess::start(&system, "replica-1-again", 1, 2);
    let restarted = Instant::now();
    let expected = shares(zero.pid(), one.pid());
    let holders = wait_for_lease_map(&leases, &expected, Duration::from_secs(60)).await;
    let handed_back = restarted.elapsed();
    assert_eq!(
        holders,
        expected.iter().map(|(&p, &pid)| (p, Some(pid))).collect(),
        "replica 1 has its share back\nreplica 0:\n{}\nreplica 1:\n{}",
        zero.log(),
        one.log()
    );
    eprintln!("replica 1 had its share back {handed_back:?} after it was started again");
    let (back, back_at) = (Instant::now(), chrono::Utc::now());
    let persisting = wait_for_persisted_since(&system, &[1, 3], back_at, back, within).await;
    assert!(
        persisting.is_some(),
        "replica 1 persists its share again\n{}",
        one.log()
    );
    zero.wait_for_readyz(&system.http, "replica 0 covers nothing", |status, body| {
        status == 200 && covers(body, &[])
    })
    .await;
    let log = zero.log();
    assert!(
        log.contains("covering for a replica that is gone")
            && log.contains("handing the partition back"),
        "replica 0 says what it took over and gave back:\n{log}"
    );

    let sent = load.finish().await;
    assert_stored_once_in_sending_order(&system, &sent).await;
    zero.stop();
    one.stop();
    history.assert_one_holder_at_a_time(timing.ttl).await;
}
