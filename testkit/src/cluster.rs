//! A test system on the production NATS: `nats/cluster/` run by [`NatsCluster`] (one node or
//! three), with its accounts, and each role connected as its own least-privilege user.
//!
//! Set-up is what a deployment does: `hotpath migrate` as the operator (streams and buckets
//! at the cluster's replica count, the schema, the shipped policies), then the gateway, the
//! delivery consumers and the push workers, each started with its own seed file in
//! `HOTPATH_NATS_CREDS`, so each only checks that what it needs exists. The push workers send
//! through a [`RecordingSender`] for FCM.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hotpath_core::config::Config;
use hotpath_core::nats_auth::NatsUser;
use hotpath_localstack::{NatsCluster, NatsRole, Postgres, free_port};
use serde_json::{Value, json};
use sqlx::PgPool;
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::push::RecordingSender;
use crate::{FAST_POSTGRES, SECRET, test_config_at};

/// A running Hotpath (gateway, consumers, push workers) on a [`NatsCluster`] with accounts.
pub struct ClusterSystem {
    pub dir: TempDir,
    pub nats: NatsCluster,
    pub postgres: Postgres,
    /// What every role runs with, but its credentials: the operator's (what set-up ran with).
    pub config: Config,
    pub base: String,
    pub http: reqwest::Client,
    pub pool: PgPool,
    /// What the push workers were asked to send to FCM devices.
    pub recorder: Arc<RecordingSender>,
    shutdown: CancellationToken,
    roles: Vec<(&'static str, JoinHandle<anyhow::Result<()>>)>,
}

/// The client side of `role`: the inbox prefix its permissions allow.
pub fn nats_user(role: NatsRole) -> NatsUser {
    match role {
        NatsRole::Gateway => NatsUser::Gateway,
        NatsRole::Consumers => NatsUser::Consumers,
        NatsRole::Push => NatsUser::Push,
        NatsRole::Operator | NatsRole::System => NatsUser::Operator,
    }
}

impl ClusterSystem {
    /// Starts `nodes` NATS nodes and Postgres, sets up as the operator with replicas for the
    /// node count (at most three), and starts every role as its own user.
    pub async fn start(nodes: usize) -> ClusterSystem {
        hotpath_core::tls::install_crypto_provider();
        hotpath_core::telemetry::init_tracing();
        let dir = tempfile::Builder::new()
            .prefix("hotpath-cluster-")
            .tempdir()
            .expect("temp dir");
        let nats = start_cluster(&dir, nodes).await;
        let postgres = start_postgres(&dir).await;
        let mut config = test_config_at(&nats.urls(), &postgres.url());
        config.nats_replicas = nodes.min(3);
        config.nats_creds = Some(nats.creds(NatsRole::Operator));
        hotpath::roles::prepare(&config)
            .await
            .expect("hotpath migrate as the operator");
        let pool = hotpath_core::db::connect(&config.database_url, 5)
            .await
            .expect("test pool");
        let mut system = ClusterSystem {
            dir,
            nats,
            postgres,
            config,
            base: String::new(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("http client"),
            pool,
            recorder: Arc::new(RecordingSender::new()),
            shutdown: CancellationToken::new(),
            roles: Vec::new(),
        };
        system.start_roles().await;
        system
    }

    /// The configuration `role` runs with: the shared one with `role`'s seed file.
    pub fn config_as(&self, role: NatsRole) -> Config {
        let mut config = self.config.clone();
        config.nats_creds = Some(self.nats.creds(role));
        config
    }

    /// Each role started the way `hotpath gateway|consumers|push` starts it: the check, then
    /// the role, with its own user.
    async fn start_roles(&mut self) {
        let gateway = self.config_as(NatsRole::Gateway);
        let consumers = self.config_as(NatsRole::Consumers);
        let push = self.config_as(NatsRole::Push);
        for (config, user) in [
            (&gateway, NatsUser::Gateway),
            (&consumers, NatsUser::Consumers),
            (&push, NatsUser::Push),
        ] {
            hotpath::roles::prepare_role(config, user)
                .await
                .unwrap_or_else(|error| panic!("{user:?} finds what it needs: {error:#}"));
        }
        let (addr, task) = hotpath::roles::spawn_gateway(gateway, self.shutdown.clone())
            .await
            .expect("gateway starts");
        self.base = format!("http://{addr}");
        self.roles.push(("gateway", task));
        let task = hotpath::roles::spawn_consumers(consumers, self.shutdown.clone())
            .await
            .expect("consumers start");
        self.roles.push(("consumers", task));
        let recorder: Arc<dyn hotpath_consumers::push::PushSender> = self.recorder.clone();
        let senders = HashMap::from([(hotpath_consumers::push::Platform::Fcm, recorder)]);
        let task = hotpath::roles::spawn_push(push, Some(senders), self.shutdown.clone())
            .await
            .expect("push workers start");
        self.roles.push(("push workers", task));
    }

    /// Stops every role the way a deployment does and checks that each stopped cleanly; NATS
    /// and Postgres keep running until the system is dropped.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        for (name, task) in self.roles.drain(..) {
            task.await
                .unwrap_or_else(|error| panic!("the {name} task: {error}"))
                .unwrap_or_else(|error| panic!("the {name} stop cleanly: {error:#}"));
        }
    }

    /// A client connected as `role`'s user, as the roles connect.
    pub async fn connect_as(&self, role: NatsRole) -> anyhow::Result<async_nats::Client> {
        let creds = self.nats.creds(role);
        hotpath_core::streams::connect(
            &self.nats.urls(),
            &format!("test-{}", role.name()),
            nats_user(role),
            Some(&creds),
        )
        .await
    }

    pub fn token(&self, user: &str) -> String {
        hotpath_core::auth::mint_hs256_token(SECRET.as_bytes(), user, 3600).expect("token")
    }

    pub async fn post(&self, user: &str, path: &str, body: Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.base))
            .bearer_auth(self.token(user))
            .json(&body)
            .send()
            .await
            .expect("request completes")
    }

    /// Creates a conversation through the API and returns its id.
    pub async fn conversation(&self, creator: &str, members: &[&str]) -> Uuid {
        let response = self
            .post(
                creator,
                "/v1/conversations",
                json!({"type": "group", "members": members}),
            )
            .await;
        assert_eq!(response.status(), 201, "conversation created");
        let body: Value = response.json().await.expect("json");
        body["conversationId"]
            .as_str()
            .and_then(|s| Uuid::parse_str(s).ok())
            .expect("conversation id")
    }

    /// Waits until Postgres holds `expected` messages (or `within` passes) and returns the count.
    pub async fn wait_for_messages(&self, expected: i64, within: Duration) -> i64 {
        let deadline = Instant::now() + within;
        loop {
            let count = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM messages")
                .fetch_one(&self.pool)
                .await
                .unwrap_or(-1);
            if count >= expected || Instant::now() > deadline {
                return count;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The cluster, on other ports if the first ones were taken meanwhile (tests run in parallel).
async fn start_cluster(dir: &TempDir, nodes: usize) -> NatsCluster {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let path = dir.path().join(format!("nats-{attempt}"));
        match NatsCluster::start(&path, nodes).await {
            Ok(cluster) => return cluster,
            Err(error) if attempt < 3 => {
                eprintln!("the NATS cluster did not start, trying other ports: {error:#}")
            }
            Err(error) => panic!("the NATS cluster starts: {error:#}"),
        }
    }
}

async fn start_postgres(dir: &TempDir) -> Postgres {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let port = free_port().expect("port");
        let data = dir.path().join(format!("postgres-{attempt}"));
        match Postgres::start(&data, port, "hotpath", FAST_POSTGRES).await {
            Ok(postgres) => return postgres,
            Err(error) if attempt < 3 => {
                eprintln!("Postgres did not start on port {port}, trying another: {error:#}")
            }
            Err(error) => panic!("postgres starts: {error:#}"),
        }
    }
}
