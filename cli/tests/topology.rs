//! `hotpath up` running the production topology: three clustered NATS nodes with accounts,
//! two gateways and two consumer replicas, each its own process, found through `ports.json`; a gateway and a consumer killed with SIGKILL
//! come back under new pids and the sends keep reaching Postgres; a `kill -9` of `hotpath up`
//! takes every process with it and the next `hotpath up` carries on with the same URLs and
//! data; Ctrl-C leaves no process behind. Then a chaos drill (`hotpath-bench chaos`, run
//! in-process) against the same topology: a NATS node, a consumer replica and a gateway killed
//! with SIGKILL and Postgres stopped for 20 s under load, and every accepted message is in
//! Postgres once, with gap-free seq.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hotpath_localstack::{Member, Mode, Ports};
use serde_json::{Value, json};
use uuid::Uuid;

/// Three clustered NATS nodes with accounts, two gateways, two consumer replicas.
const TOPOLOGY: &[&str] = &[
    "--nats-nodes",
    "3",
    "--gateways",
    "2",
    "--consumer-replicas",
    "2",
];

const BIN: &str = env!("CARGO_BIN_EXE_hotpath");
/// Short leases, so that a restarted consumer takes its partitions back within seconds.
const LEASE_TTL_SECS: &str = "3";

/// A running `hotpath up` in process mode.
struct Up {
    child: Child,
    data_dir: PathBuf,
}

impl Up {
    /// Starts `hotpath up` with `topology` flags, its first gateway on a free port, and waits
    /// for its banner.
    fn start(data_dir: &Path, topology: &[&str]) -> Up {
        Up::start_on(
            data_dir,
            hotpath_localstack::free_port().expect("free port"),
            topology,
        )
    }

    /// [`Up::start`] with the first gateway on `port`.
    fn start_on(data_dir: &Path, port: u16, topology: &[&str]) -> Up {
        let mut child = Command::new(BIN)
            .args(["up", "--data-dir"])
            .arg(data_dir)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(topology)
            .env(
                "HOTPATH_POLICY_DIR",
                concat!(env!("CARGO_MANIFEST_DIR"), "/../policies/dist"),
            )
            .env("HOTPATH_LEASE_TTL_SECS", LEASE_TTL_SECS)
            .stdout(Stdio::piped())
            .stderr(log_file(data_dir))
            .spawn()
            .expect("hotpath up starts");
        hotpath_testkit::await_up_banner(&mut child, Duration::from_secs(180));
        Up {
            child,
            data_dir: data_dir.to_path_buf(),
        }
    }

    fn ports(&self) -> Ports {
        Ports::read(&self.data_dir).expect("ports.json")
    }

    /// `kill -9` of `hotpath up` itself, reaped.
    fn kill9(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
    }

    /// Ctrl-C, then waits for a clean exit.
    fn interrupt(mut self) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        assert_eq!(rc, 0, "signal delivered");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(
                    status.success(),
                    "hotpath up exits cleanly on Ctrl-C: {status}"
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "hotpath up did not stop within 120 s of Ctrl-C"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        // A failed test must not leave the topology running: kill -9 takes it all down.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn log_file(data_dir: &Path) -> std::fs::File {
    std::fs::create_dir_all(data_dir.parent().expect("parent")).expect("dir");
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(data_dir.with_extension("log"))
        .expect("log file")
}

/// The nice value of `pid`'s main thread (field 19 of `/proc/<pid>/stat`).
fn nice(pid: u32) -> i64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after_name = &stat[stat.rfind(')').expect("comm") + 2..];
    after_name
        .split(' ')
        .nth(16)
        .and_then(|n| n.parse().ok())
        .expect("nice")
}

/// Whether `pid` is a live process (not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
    })
}

/// Waits (bounded) until none of `pids` is alive, failing with the ones that are.
fn wait_until_gone(pids: &[u32], after: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left: Vec<u32> = pids.iter().copied().filter(|pid| alive(*pid)).collect();
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "processes left 20 s after {after}: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn temp_data_dir(prefix: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("temp dir");
    let data_dir = dir.path().join("data");
    (dir, data_dir)
}

/// Two topologies at once would crowd two cores: the tests take turns.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

fn kill9(pid: u32) {
    // SAFETY: kill(2) on a pid ports.json records for a process of our topology.
    let rc = unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    assert_eq!(rc, 0, "SIGKILL delivered to {pid}");
}

fn token(data_dir: &Path, user: &str) -> String {
    hotpath_testkit::hotpath_token(BIN, data_dir, user)
}

fn pid_of(ports: &Ports, name: &str) -> Option<u32> {
    ports.members().find(|m| m.name == name).and_then(|m| m.pid)
}

/// Waits until `name` runs under a pid other than `old` and answers `/healthz`.
async fn wait_for_restart(http: &reqwest::Client, up: &Up, name: &str, old: u32) -> Member {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ports = up.ports();
        let member = ports
            .members()
            .find(|m| m.name == name)
            .expect("member")
            .clone();
        if member.pid.is_some_and(|pid| pid != old && alive(pid)) {
            let health = http.get(format!("{}/healthz", member.url)).send().await;
            if health.is_ok_and(|r| r.status().is_success()) {
                return member;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{name} (pid {old}, killed) was not restarted within 60 s: {member:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn send(http: &reqwest::Client, gateway: &str, token: &str, conversation: &str, text: &str) {
    let response = http
        .post(format!("{gateway}/v1/messages"))
        .bearer_auth(token)
        .json(&json!({"conversationId": conversation, "content": text, "contentType": "text", "clientMessageId": text}))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 202, "send {text:?} through {gateway}");
}

/// Waits until Postgres holds exactly `texts` for `conversation`.
async fn wait_for_rows(pool: &sqlx::PgPool, conversation: Uuid, texts: &[&str]) {
    let expected: BTreeSet<String> = texts.iter().map(|t| t.to_string()).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rows: Vec<(String,)> =
            sqlx::query_as("SELECT content FROM messages WHERE conversation_id = $1")
                .bind(conversation)
                .fetch_all(pool)
                .await
                .expect("query");
        let found: BTreeSet<String> = rows.into_iter().map(|(t,)| t).collect();
        if found == expected {
            assert_eq!(found.len(), texts.len(), "each message stored once");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "rows {found:?} are not {expected:?} within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A conversation created through `gateway`, with the replica that owns its partition.
async fn conversation(http: &reqwest::Client, gateway: &str, token: &str) -> (String, u32) {
    let created: Value = http
        .post(format!("{gateway}/v1/conversations"))
        .bearer_auth(token)
        .json(&json!({"type": "group", "members": ["bob"]}))
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("json");
    let id = created["conversationId"].as_str().expect("id").to_string();
    let replica = hotpath_core::names::partition_of(&id, 16) % 2;
    (id, replica)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_members_are_restarted_kill_9_of_up_takes_all_and_ctrl_c_leaves_none() {
    let _one_topology_at_a_time = serial().await;
    hotpath_core::tls::install_crypto_provider();
    let (_dir, data_dir) = temp_data_dir("hotpath-topology-");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let up = Up::start(&data_dir, TOPOLOGY);

    let ports = up.ports();
    assert_eq!(ports.mode, Mode::Processes);
    let names: Vec<&str> = ports.members().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "nats-0",
            "nats-1",
            "nats-2",
            "postgres",
            "gateway-0",
            "gateway-1",
            "consumers-0",
            "consumers-1",
            "push"
        ]
    );
    let creds = ports.nats_creds_dir.clone().expect("a NATS with accounts");
    assert!(creds.join("gateway.nk").exists() && creds.join("operator.nk").exists());
    assert!(
        ports.members().all(|m| m.pid.is_some_and(alive)),
        "{ports:?}"
    );
    // The delivery side yields to the gateways (ADR 0013), as in one process.
    let nice_of = |name: &str| nice(pid_of(&ports, name).expect("pid"));
    assert_eq!(
        (
            nice_of("consumers-0") - nice_of("gateway-0"),
            nice_of("push") - nice_of("gateway-1")
        ),
        (10, 10)
    );
    let gateways = ports.gateway_urls();
    assert_ne!(gateways[0], gateways[1]);
    let pool = hotpath_core::db::connect(&ports.postgres_server.as_ref().expect("pg").url, 2)
        .await
        .expect("postgres");

    let alice = token(&data_dir, "alice");
    let (conv, replica) = conversation(&http, &gateways[0], &alice).await;
    let conv_id = Uuid::parse_str(&conv).expect("uuid");
    send(&http, &gateways[0], &alice, &conv, "one").await;
    send(&http, &gateways[1], &alice, &conv, "two").await;
    wait_for_rows(&pool, conv_id, &["one", "two"]).await;

    // The second gateway and the replica that persists this conversation, killed outright.
    let consumer = format!("consumers-{replica}");
    let mut seen: Vec<u32> = ports.members().filter_map(|m| m.pid).collect();
    let old_gateway = pid_of(&ports, "gateway-1").expect("gateway pid");
    let old_consumer = pid_of(&ports, &consumer).expect("consumer pid");
    kill9(old_gateway);
    kill9(old_consumer);
    let gateway = wait_for_restart(&http, &up, "gateway-1", old_gateway).await;
    let restarted = wait_for_restart(&http, &up, &consumer, old_consumer).await;
    assert_eq!(gateway.restarts, 1);
    assert_eq!(restarted.restarts, 1);

    send(&http, &gateways[1], &alice, &conv, "three").await;
    send(&http, &gateways[0], &alice, &conv, "four").await;
    wait_for_rows(&pool, conv_id, &["one", "two", "three", "four"]).await;
    pool.close().await;

    // kill -9 of hotpath up takes the whole topology with it; a new one carries on, on the
    // same URLs and data.
    seen.extend(up.ports().members().filter_map(|m| m.pid));
    let port = ports.gateways[0].listen.port();
    up.kill9();
    wait_until_gone(&seen, "kill -9 of hotpath up");
    let up = Up::start_on(&data_dir, port, TOPOLOGY);
    let ports = up.ports();
    assert_eq!(ports.gateway_urls(), gateways, "the same gateway URLs");
    let pool = hotpath_core::db::connect(&ports.postgres_server.as_ref().expect("pg").url, 2)
        .await
        .expect("postgres");
    send(&http, &gateways[1], &alice, &conv, "five").await;
    wait_for_rows(&pool, conv_id, &["one", "two", "three", "four", "five"]).await;
    pool.close().await;

    seen.extend(ports.members().filter_map(|m| m.pid));
    up.interrupt();
    wait_until_gone(&seen, "Ctrl-C");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chaos_drill_against_the_topology_loses_and_duplicates_nothing() {
    let _one_topology_at_a_time = serial().await;
    hotpath_core::tls::install_crypto_provider();
    let (dir, data_dir) = temp_data_dir("hotpath-chaos-");
    let up = Up::start(
        &data_dir,
        &[
            "--nats-nodes",
            "3",
            "--gateways",
            "2",
            "--consumer-replicas",
            "2",
        ],
    );
    let out = dir.path().join("chaos.json");
    let args = hotpath_bench::chaos::ChaosArgs {
        data_dir: data_dir.clone(),
        duration_secs: 60,
        rate: 40,
        conversations: 8,
        postgres_down_secs: 20,
        give_up_secs: 60,
        catch_up_secs: 120,
        heal_limit_secs: 60,
        jwt_secret: None,
        out: out.clone(),
    };
    let outcome = hotpath_bench::chaos::main_with(args).await;
    let report: Value =
        serde_json::from_slice(&std::fs::read(&out).expect("chaos.json")).expect("json");
    let reconciled = &report["reconciled"];
    assert!(
        reconciled["accepted"].as_u64().expect("accepted") > 1000,
        "{report:#}"
    );
    assert_eq!(reconciled["lost"], 0, "{report:#}");
    assert_eq!(reconciled["duplicated"], 0, "{report:#}");
    assert_eq!(reconciled["seq_gaps"], 0, "{report:#}");
    let faults = report["faults"].as_array().expect("faults");
    assert_eq!(faults.len(), 4, "{report:#}");
    assert!(
        faults.iter().all(|f| f["heal_secs"].is_number()),
        "every fault healed: {report:#}"
    );
    outcome.expect("the drill passes");
    let pids: Vec<u32> = up.ports().members().filter_map(|m| m.pid).collect();
    up.interrupt();
    wait_until_gone(&pids, "Ctrl-C");
}
