//! The test harness: a real nats-server and a real Postgres per test, on free loopback ports
//! in a temporary directory, and Hotpath's roles started in-process exactly as `hotpath up`
//! starts them. Nothing is mocked.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hotpath_core::auth;
use hotpath_core::config::Config;
use hotpath_localstack::{NatsServer, Postgres, free_port};
use serde_json::{Value, json};
use sqlx::PgPool;
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub mod cluster;
pub mod fcm;
pub mod gateway;
pub mod push;
pub mod receipts;
pub mod ws;

/// The HS256 secret the test systems verify with (at least 32 bytes, as the gateway requires).
pub const SECRET: &str = "hotpath-test-secret-32-bytes-or-more";

/// Postgres settings that trade durability for speed: tests kill servers on purpose, but never
/// the machine.
const FAST_POSTGRES: &[&str] = &[
    "-c",
    "fsync=off",
    "-c",
    "synchronous_commit=off",
    "-c",
    "full_page_writes=off",
];

pub struct Servers {
    pub dir: TempDir,
    pub nats: NatsServer,
    pub postgres: Postgres,
}

impl Servers {
    pub async fn start() -> Servers {
        let dir = tempfile::Builder::new()
            .prefix("hotpath-test-")
            .tempdir()
            .expect("temp dir");
        // A port found free may be taken by some other socket before the server binds it
        // (tests run in parallel and open connections all the time): try another one.
        let mut attempt = 0;
        let nats = loop {
            attempt += 1;
            let port = free_port().expect("port");
            match NatsServer::start(&dir.path().join(format!("nats-{attempt}")), port).await {
                Ok(nats) => break nats,
                Err(error) if attempt < 3 => {
                    eprintln!("nats-server did not start on port {port}, trying another: {error:#}")
                }
                Err(error) => panic!("nats-server starts: {error:#}"),
            }
        };
        let mut attempt = 0;
        let postgres = loop {
            attempt += 1;
            let port = free_port().expect("port");
            let data = dir.path().join(format!("postgres-{attempt}"));
            match Postgres::start(&data, port, "hotpath", FAST_POSTGRES).await {
                Ok(postgres) => break postgres,
                Err(error) if attempt < 3 => {
                    eprintln!("Postgres did not start on port {port}, trying another: {error:#}")
                }
                Err(error) => panic!("postgres starts: {error:#}"),
            }
        };
        Servers {
            dir,
            nats,
            postgres,
        }
    }
}

/// A running Hotpath (gateway + consumers) on its own servers.
pub struct System {
    pub servers: Servers,
    pub config: Config,
    pub base: String,
    pub http: reqwest::Client,
    pub pool: PgPool,
    gateway_shutdown: CancellationToken,
    gateway: Option<JoinHandle<anyhow::Result<()>>>,
    consumers_shutdown: CancellationToken,
    consumers: Option<JoinHandle<anyhow::Result<()>>>,
    push_shutdown: CancellationToken,
    push: Option<JoinHandle<anyhow::Result<()>>>,
}

/// The configuration tests run with: defaults, loopback, the test secret, no rate limits
/// (sends, acks, membership changes), a short ack wait so redeliveries after a killed
/// consumer happen within a test's patience, and a short partition lease TTL so consumers
/// started after killed ones take over quickly.
pub fn test_config(servers: &Servers) -> Config {
    test_config_at(&servers.nats.url(), &servers.postgres.url())
}

/// [`test_config`] for the NATS at `nats_url` (one URL or several, comma-separated) and the
/// Postgres at `database_url`.
pub fn test_config_at(nats_url: &str, database_url: &str) -> Config {
    let mut config = Config::from_env().expect("default config");
    config.nats_url = nats_url.to_string();
    config.database_url = database_url.to_string();
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config.jwt_secret = Some(SECRET.to_string());
    config.jwt_secret_file = None;
    config.jwt_public_key_file = None;
    config.rate_per_user = 0;
    config.ack_rate_per_user = 0;
    config.membership_rate_per_min = 0;
    config.ack_wait_secs = 3;
    config.lease_ttl_secs = 3;
    config.partitions = 4;
    config.batch_size = 64;
    config.db_max_connections = 10;
    config.policy_dir = policy_dir();
    config
}

/// The shipped policies, built by `policies/build.sh` (README command 2 runs it first).
pub fn policy_dir() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/dist");
    assert!(
        dir.join("schema.wasm").exists() && dir.join("authz.wasm").exists(),
        "the shipped policies are not built: run policies/build.sh (scripts/test.sh does)"
    );
    dir
}

impl System {
    pub async fn start() -> System {
        System::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> System {
        hotpath_core::tls::install_crypto_provider();
        hotpath_core::telemetry::init_tracing();
        let servers = Servers::start().await;
        let mut config = test_config(&servers);
        tweak(&mut config);
        hotpath::roles::prepare(&config)
            .await
            .expect("streams and schema");
        let pool = hotpath_core::db::connect(&config.database_url, 5)
            .await
            .expect("test pool");
        let mut system = System {
            servers,
            base: String::new(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("http client"),
            pool,
            gateway_shutdown: CancellationToken::new(),
            gateway: None,
            consumers_shutdown: CancellationToken::new(),
            consumers: None,
            push_shutdown: CancellationToken::new(),
            push: None,
            config,
        };
        system.start_gateway().await;
        system.start_consumers().await;
        system
    }

    pub async fn start_gateway(&mut self) {
        self.gateway_shutdown = CancellationToken::new();
        let (addr, task): (SocketAddr, _) =
            hotpath::roles::spawn_gateway(self.config.clone(), self.gateway_shutdown.clone())
                .await
                .expect("gateway starts");
        self.base = format!("http://{addr}");
        self.gateway = Some(task);
    }

    pub async fn start_consumers(&mut self) {
        self.consumers_shutdown = CancellationToken::new();
        let task =
            hotpath::roles::spawn_consumers(self.config.clone(), self.consumers_shutdown.clone())
                .await
                .expect("consumers start");
        self.consumers = Some(task);
    }

    /// Starts the push workers with `senders` (a recording sender, or real ones built from the
    /// configuration: `None`).
    pub async fn start_push(&mut self, senders: Option<hotpath_consumers::push::Senders>) {
        self.push_shutdown = CancellationToken::new();
        let task =
            hotpath::roles::spawn_push(self.config.clone(), senders, self.push_shutdown.clone())
                .await
                .expect("push workers start");
        self.push = Some(task);
    }

    /// Stops the push workers; tasks in hand are finished first.
    pub async fn stop_push(&mut self) {
        self.push_shutdown.cancel();
        if let Some(task) = self.push.take() {
            task.await
                .expect("push task")
                .expect("push workers stop cleanly");
        }
    }

    /// Stops the consumers the way a deployment does: they settle or hand back their batch.
    pub async fn stop_consumers(&mut self) {
        self.consumers_shutdown.cancel();
        if let Some(task) = self.consumers.take() {
            task.await
                .expect("consumers task")
                .expect("consumers stop cleanly");
        }
    }

    /// Kills the consumers' task on the spot, mid-batch or wherever it is: nothing is settled.
    pub async fn kill_consumers(&mut self) {
        if let Some(task) = self.consumers.take() {
            task.abort();
            let _ = task.await;
        }
        self.consumers_shutdown.cancel();
    }

    /// A JetStream context of the test's own on this system's NATS, to publish or inspect
    /// streams as a broken producer or an operator would.
    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        let client = async_nats::connect(self.servers.nats.url())
            .await
            .expect("test connects to NATS");
        async_nats::jetstream::new(client)
    }

    /// The policy store (chain, modules, gateways' reports), as `hotpath policy` sees it.
    pub async fn policy_store(&self) -> hotpath_core::policy_store::PolicyStore {
        hotpath_core::policy_store::PolicyStore::open(&self.jetstream().await)
            .await
            .expect("the policy store opens")
    }

    /// Where the operator commands (`hotpath policy`, `dlq`, `replay`) find this system's NATS.
    pub fn nats_target(&self) -> hotpath::nats_target::NatsTarget {
        hotpath::nats_target::NatsTarget::new(self.config.nats_url.clone(), None)
    }

    pub fn token(&self, user: &str) -> String {
        auth::mint_hs256_token(SECRET.as_bytes(), user, 3600).expect("token")
    }

    /// The process's metrics, from the gateway's `/metrics` (every role started in this test
    /// process shares one registry).
    pub async fn metrics(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("metrics answer")
            .text()
            .await
            .expect("metrics text")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn post(&self, user: &str, path: &str, body: Value) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .bearer_auth(self.token(user))
            .json(&body)
            .send()
            .await
            .expect("request completes")
    }

    pub async fn get(&self, user: &str, path: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .bearer_auth(self.token(user))
            .send()
            .await
            .expect("request completes")
    }

    pub async fn delete(&self, user: &str, path: &str) -> reqwest::Response {
        self.http
            .delete(self.url(path))
            .bearer_auth(self.token(user))
            .send()
            .await
            .expect("request completes")
    }

    /// Creates a conversation through the API and returns its id.
    pub async fn conversation(&self, creator: &str, kind: &str, members: &[&str]) -> Uuid {
        let response = self
            .post(
                creator,
                "/v1/conversations",
                json!({"type": kind, "members": members}),
            )
            .await;
        assert_eq!(response.status(), 201, "conversation created");
        let body: Value = response.json().await.expect("json");
        body["conversationId"]
            .as_str()
            .and_then(|s| Uuid::parse_str(s).ok())
            .expect("conversation id")
    }

    /// Sends a text message and returns (status, body).
    pub async fn send(&self, user: &str, body: Value) -> (u16, Value) {
        let response = self.post(user, "/v1/messages", body).await;
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn message_count(&self) -> i64 {
        let (count,): (i64,) = sqlx::query_as("SELECT count(*) FROM messages")
            .fetch_one(&self.pool)
            .await
            .expect("count");
        count
    }

    /// Waits until Postgres holds `expected` messages (or `within` passes) and returns the count.
    pub async fn wait_for_messages(&self, expected: i64, within: Duration) -> i64 {
        let deadline = Instant::now() + within;
        loop {
            let count = sqlx::query_as::<_, (i64,)>("SELECT count(*) FROM messages")
                .fetch_one(&self.pool)
                .await
                .map(|(c,)| c)
                .unwrap_or(-1);
            if count >= expected || Instant::now() > deadline {
                return count;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The `messageId` of a 202 answer.
pub fn message_id_of(ack: &Value) -> Uuid {
    ack["messageId"]
        .as_str()
        .and_then(|s| Uuid::parse_str(s).ok())
        .unwrap_or_else(|| panic!("no messageId in {ack}"))
}

/// The stored messages of `conversation`, by seq.
pub async fn ids_in_seq_order(pool: &PgPool, conversation: Uuid) -> Vec<Uuid> {
    let rows: Vec<(Uuid,)> =
        sqlx::query_as("SELECT id FROM messages WHERE conversation_id = $1 ORDER BY seq")
            .bind(conversation)
            .fetch_all(pool)
            .await
            .expect("rows");
    rows.into_iter().map(|(id,)| id).collect()
}

/// The sum of the samples of metric `name` whose line contains `label`, in `/metrics` text.
pub fn metric_sum(metrics: &str, name: &str, label: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A minimal valid message body for `conversation`.
pub fn text(conversation: Uuid, content: &str) -> Value {
    json!({"conversationId": conversation.to_string(), "content": content, "contentType": "text"})
}

/// Asserts that, per conversation, seq runs 1..=n without gaps and follows stream order
/// (acceptance order), and that no idempotency key appears twice. Returns the row count.
pub async fn assert_gap_free_in_acceptance_order(pool: &PgPool) -> usize {
    let rows: Vec<(Uuid, i64, i32, i64)> = sqlx::query_as(
        "SELECT conversation_id, seq, stream_partition, stream_seq FROM messages ORDER BY conversation_id, seq",
    )
    .fetch_all(pool)
    .await
    .expect("rows");
    let mut previous: Option<(Uuid, i64, i64)> = None;
    for &(conversation, seq, _partition, stream_seq) in &rows {
        match previous {
            Some((prev_conv, prev_seq, prev_stream)) if prev_conv == conversation => {
                assert_eq!(seq, prev_seq + 1, "seq gap in conversation {conversation}");
                assert!(
                    stream_seq > prev_stream,
                    "seq order differs from acceptance order in {conversation}"
                );
            }
            _ => assert_eq!(seq, 1, "conversation {conversation} starts at seq 1"),
        }
        previous = Some((conversation, seq, stream_seq));
    }
    let (distinct,): (i64,) =
        sqlx::query_as("SELECT count(DISTINCT idempotency_key) FROM messages")
            .fetch_one(pool)
            .await
            .expect("distinct");
    assert_eq!(
        distinct as usize,
        rows.len(),
        "an idempotency key was stored twice"
    );
    let (last_seq_ok,): (bool,) = sqlx::query_as(
        "SELECT coalesce(bool_and(c.last_seq = m.max_seq), true)
           FROM conversations c JOIN (SELECT conversation_id, max(seq) AS max_seq FROM messages GROUP BY conversation_id) m
             ON m.conversation_id = c.id",
    )
    .fetch_one(pool)
    .await
    .expect("last_seq");
    assert!(
        last_seq_ok,
        "conversations.last_seq disagrees with the stored messages"
    );
    rows.len()
}

/// Waits until a `hotpath up` started with a piped stdout prints its banner ("Hotpath is up"),
/// reading its stdout on a thread of its own; panics if it has not within `within`.
pub fn await_up_banner(child: &mut std::process::Child, within: Duration) {
    use std::io::{BufRead as _, BufReader};
    let stdout = child.stdout.take().expect("hotpath up's stdout is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("Hotpath is up") {
                let _ = tx.send(());
            }
        }
    });
    if rx.recv_timeout(within).is_err() {
        panic!("hotpath up printed no banner within {within:?}");
    }
}

/// A development token for `user` from `hotpath token` (the binary at `bin`), signed with the
/// secret `hotpath up` keeps in `data_dir`.
pub fn hotpath_token(bin: &str, data_dir: &std::path::Path, user: &str) -> String {
    let output = std::process::Command::new(bin)
        .args(["token", user, "--data-dir"])
        .arg(data_dir)
        .output()
        .expect("hotpath token runs");
    assert!(
        output.status.success(),
        "hotpath token: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .expect("the token is UTF-8")
        .trim()
        .to_string()
}
