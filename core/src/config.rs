//! Configuration: one struct, read from flags or `HOTPATH_*` environment variables, with
//! defaults that suit a laptop. Printed at start-up with secrets redacted.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser};

/// The default member cap: the recipient limit of the shipped `schema` policy, so a
/// conversation never has more recipients than a message may name.
pub const DEFAULT_MAX_MEMBERS: usize = 1000;

/// The most replicas JetStream keeps of a stream.
pub const MAX_NATS_REPLICAS: usize = 5;

/// Where every role and operator command looks for NATS when nothing else is configured: the
/// nats-server a developer runs on this machine.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

/// Where the roles find Postgres when nothing says otherwise.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/hotpath";

#[derive(Debug, Clone, Args)]
pub struct Config {
    /// NATS server URL.
    #[arg(
        long,
        env = "HOTPATH_NATS_URL",
        default_value = DEFAULT_NATS_URL
    )]
    pub nats_url: String,

    /// File with this process's NATS credentials: an nkey user seed (`SU…`, as
    /// `nats/cluster/accounts.conf` authenticates the roles) or a NATS `.creds` file. Unset:
    /// no authentication (a development nats-server). Set, a role only checks that its
    /// streams, buckets and schema exist: `hotpath migrate`, run with the operator's
    /// credentials, makes them (docs/adr/0009-nats-accounts.md). Only the path is printed.
    #[arg(long, env = "HOTPATH_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,

    /// JetStream replicas of every stream, KV bucket and the object store: 1 on one
    /// nats-server, 3 on a three-node cluster. Applied wherever set-up creates or updates
    /// them (`hotpath migrate`, and every role when no credentials are set).
    #[arg(long, env = "HOTPATH_NATS_REPLICAS", default_value_t = 1)]
    pub nats_replicas: usize,

    /// `hotpath up` only: how often its nats-server forces JetStream's files to disk, `always`
    /// (every write: an acknowledged message survives an OS crash, at a cost in throughput) or
    /// an interval such as `1s`; default: nats-server's own, two minutes.
    #[arg(long, env = "HOTPATH_NATS_SYNC", value_parser = parse_nats_sync)]
    pub nats_sync: Option<NatsSync>,

    /// Postgres URL.
    #[arg(
        long,
        env = "HOTPATH_DATABASE_URL",
        default_value = DEFAULT_DATABASE_URL
    )]
    pub database_url: String,

    /// Address the gateway listens on.
    #[arg(long, env = "HOTPATH_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Number of partitions of the MESSAGES stream. Fixed when the stream is created.
    #[arg(long, env = "HOTPATH_PARTITIONS", default_value_t = 16)]
    pub partitions: u32,

    /// HS256 secret for bearer tokens (development).
    #[arg(long, env = "HOTPATH_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// File holding the HS256 secret (used when `--jwt-secret` is not given).
    #[arg(long, env = "HOTPATH_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,

    /// PEM public key for RS256/ES256 tokens (production). Takes precedence over the secret.
    #[arg(long, env = "HOTPATH_JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,

    /// The identity provider's JWKS URL: tokens are verified against the keys it serves
    /// (fetched at start, every 5 minutes, and when a token names an unknown `kid`). Takes
    /// precedence over the public key file and the secret.
    #[arg(long, env = "HOTPATH_JWT_JWKS_URL")]
    pub jwt_jwks_url: Option<String>,

    /// The `iss` every token must carry (the identity provider's issuer URL); unset: not checked.
    #[arg(long, env = "HOTPATH_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// An `aud` every token must name (this API's audience at the identity provider); unset:
    /// not checked.
    #[arg(long, env = "HOTPATH_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    #[arg(long, env = "HOTPATH_JWT_LEEWAY_SECS", default_value_t = 30)]
    pub jwt_leeway_secs: u64,

    /// Sustained messages per second per user; 0 turns rate limiting off.
    #[arg(long, env = "HOTPATH_RATE_PER_USER", default_value_t = 50)]
    pub rate_per_user: u32,

    /// Burst of messages a user may send at once.
    #[arg(long, env = "HOTPATH_RATE_BURST", default_value_t = 100)]
    pub rate_burst: u32,

    /// Sustained `ack` frames (receipts) per second per user; 0 turns their limit off.
    #[arg(long, env = "HOTPATH_ACK_RATE_PER_USER", default_value_t = 100)]
    pub ack_rate_per_user: u32,

    /// Burst of `ack` frames a user may send at once (a device catching up acks a page).
    #[arg(long, env = "HOTPATH_ACK_RATE_BURST", default_value_t = 1000)]
    pub ack_rate_burst: u32,

    /// Most active members a conversation may have, the creator included (409
    /// `CONVERSATION_FULL` beyond it, at creation and when adding).
    #[arg(long, env = "HOTPATH_MAX_MEMBERS", default_value_t = DEFAULT_MAX_MEMBERS)]
    pub max_members: usize,

    /// Membership changes (creating a conversation, adding or removing a member) per minute
    /// per user; 0 turns their limit off.
    #[arg(long, env = "HOTPATH_MEMBERSHIP_RATE_PER_MIN", default_value_t = 60)]
    pub membership_rate_per_min: u32,

    /// Largest request body accepted, in bytes (413 above it).
    #[arg(long, env = "HOTPATH_MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,

    /// Sends handled at once per gateway; above it a send is answered 503 at once (load
    /// shedding) instead of queueing until every client times out.
    #[arg(long, env = "HOTPATH_MAX_IN_FLIGHT_SENDS", default_value_t = 8192)]
    pub max_in_flight_sends: usize,

    /// How long a client has to send a request's headers: from connecting, or from the first
    /// byte of a later request on the connection. A connection that is late is closed.
    #[arg(long, env = "HOTPATH_HTTP_HEADER_TIMEOUT_SECS", default_value_t = 10)]
    pub http_header_timeout_secs: u64,

    /// How long a client has to send a request's whole body once its headers arrived; a late
    /// body is answered 408 `REQUEST_TIMEOUT` and the connection closed.
    #[arg(long, env = "HOTPATH_HTTP_BODY_TIMEOUT_SECS", default_value_t = 10)]
    pub http_body_timeout_secs: u64,

    /// How long a keep-alive connection may sit between requests before it is closed.
    #[arg(long, env = "HOTPATH_HTTP_IDLE_TIMEOUT_SECS", default_value_t = 60)]
    pub http_idle_timeout_secs: u64,

    /// Open connections per gateway, WebSockets included; a connection beyond it is closed as
    /// soon as it is accepted.
    #[arg(long, env = "HOTPATH_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,

    /// How long a publish may wait for JetStream's acknowledgement before answering 503.
    #[arg(long, env = "HOTPATH_PUBLISH_TIMEOUT_MS", default_value_t = 1000)]
    pub publish_timeout_ms: u64,

    /// The backlog bound, in bytes: accepted messages not yet persisted (what the `MESSAGES`
    /// work queue holds). When a gateway's estimate of it reaches this, sends are answered 503
    /// `BACKLOG_FULL` with Retry-After before anything is published. The stream's own
    /// `max_bytes` is twice this, so the gateways always refuse first.
    #[arg(long, env = "HOTPATH_BACKLOG_MAX_BYTES", default_value_t = 1 << 30)]
    pub backlog_max_bytes: u64,

    /// The backlog bound, in messages (see `backlog_max_bytes`; the stream's `max_msgs` is
    /// twice this).
    #[arg(long, env = "HOTPATH_BACKLOG_MAX_MSGS", default_value_t = 1_000_000)]
    pub backlog_max_msgs: u64,

    /// How long the replay window (`REPLAY`) keeps a persisted message.
    #[arg(long, env = "HOTPATH_REPLAY_MAX_AGE_SECS", default_value_t = 7 * 86_400)]
    pub replay_max_age_secs: u64,

    /// Bytes the replay window (`REPLAY`) keeps; past them the oldest messages are dropped.
    #[arg(long, env = "HOTPATH_REPLAY_MAX_BYTES", default_value_t = 2 << 30)]
    pub replay_max_bytes: u64,

    /// Bytes of receipts waiting to be recorded (`RECEIPTS`, a work queue); past them a
    /// receipt is answered with an error and the client sends it again later.
    #[arg(long, env = "HOTPATH_RECEIPTS_MAX_BYTES", default_value_t = 512 << 20)]
    pub receipts_max_bytes: u64,

    /// Messages fetched and persisted per batch.
    #[arg(long, env = "HOTPATH_BATCH_SIZE", default_value_t = 256)]
    pub batch_size: usize,

    /// JetStream ack wait of the delivery consumers: how long an unacknowledged batch waits
    /// before it is redelivered after a consumer died.
    #[arg(long, env = "HOTPATH_ACK_WAIT_SECS", default_value_t = 30)]
    pub ack_wait_secs: u64,

    /// Deliveries after which a message that can never be stored goes to the DLQ.
    #[arg(long, env = "HOTPATH_POISON_MAX_DELIVER", default_value_t = 5)]
    pub poison_max_deliver: u64,

    /// Upper bound on how long a cached fact lives, behind explicit invalidation.
    #[arg(long, env = "HOTPATH_FACTS_TTL_SECS", default_value_t = 300)]
    pub facts_ttl_secs: u64,

    /// Where the shipped policies are (built by `policies/build.sh`); they are installed as the
    /// chain when NATS has none yet.
    #[arg(long, env = "HOTPATH_POLICY_DIR", default_value = "policies/dist")]
    pub policy_dir: std::path::PathBuf,

    /// Postgres pool size per process (in a gateway: the pool of the writes, such as creating
    /// conversations and registering devices).
    #[arg(long, env = "HOTPATH_DB_MAX_CONNECTIONS", default_value_t = 20)]
    pub db_max_connections: u32,

    /// A gateway's pool for the reads of its request paths (status, history, sync, receipt
    /// checks): apart from the others, so slow reads cannot starve sends.
    #[arg(long, env = "HOTPATH_DB_QUERY_CONNECTIONS", default_value_t = 8)]
    pub db_query_connections: u32,

    /// A gateway's pool for loading facts (conversations, blocks) on a cache miss: the only
    /// Postgres the send path ever waits for.
    #[arg(long, env = "HOTPATH_DB_FACTS_CONNECTIONS", default_value_t = 8)]
    pub db_facts_connections: u32,

    /// Longest a gateway's statement may run in Postgres (waiting for locks included) before
    /// Postgres cancels it and the client gets 503.
    #[arg(long, env = "HOTPATH_DB_STATEMENT_TIMEOUT_MS", default_value_t = 2000)]
    pub db_statement_timeout_ms: u64,

    /// Longest a request waits for a free connection of a pool before it gets 503.
    #[arg(long, env = "HOTPATH_DB_ACQUIRE_TIMEOUT_MS", default_value_t = 2000)]
    pub db_acquire_timeout_ms: u64,

    /// How long a gateway remembers that Postgres has no message with some id, so repeated
    /// status requests for an unknown id cost one query.
    #[arg(long, env = "HOTPATH_NEGATIVE_CACHE_SECS", default_value_t = 5)]
    pub negative_cache_secs: u64,

    /// Bytes of history pages a gateway keeps (the pages as served, for reconnect storms).
    #[arg(long, env = "HOTPATH_HISTORY_CACHE_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub history_cache_bytes: u64,

    /// `hotpath up` only, where the gateway and the delivery side share one process: how much
    /// lower (a nice value, 0–19) the delivery side's threads run, so under a spike the gateway
    /// keeps answering while persisting and fanout fall behind; 0 runs both alike.
    #[arg(long, env = "HOTPATH_DELIVERY_NICENESS", default_value_t = 10,
          value_parser = clap::value_parser!(i32).range(0..=19))]
    pub delivery_niceness: i32,

    /// This consumer replica's index k: it owns the partitions p with p mod n == k.
    #[arg(long, env = "HOTPATH_CONSUMER_REPLICA", default_value_t = 0)]
    pub consumer_replica: u32,

    /// Number n of consumer replicas.
    #[arg(long, env = "HOTPATH_CONSUMER_REPLICAS", default_value_t = 1)]
    pub consumer_replicas: u32,

    /// How long a partition lease outlives its holder's last renewal (the `PARTITION_LEASES`
    /// bucket's max age). Holders renew every third of it; a standby takes over a dead
    /// holder's partitions within about this time.
    #[arg(long, env = "HOTPATH_LEASE_TTL_SECS", default_value_t = 10)]
    pub lease_ttl_secs: u64,

    /// Frames waiting to be written to one WebSocket. A client that falls this far behind is
    /// disconnected (close code 1008) rather than allowed to grow the gateway's memory.
    #[arg(long, env = "HOTPATH_WS_OUTBOUND_QUEUE", default_value_t = 1024)]
    pub ws_outbound_queue: usize,

    /// Seconds between the pings a gateway sends on each WebSocket.
    #[arg(long, env = "HOTPATH_WS_PING_INTERVAL_SECS", default_value_t = 20)]
    pub ws_ping_interval_secs: u64,

    /// A WebSocket from which nothing (not even a pong) arrived for this many seconds is
    /// closed as dead.
    #[arg(long, env = "HOTPATH_WS_HEARTBEAT_TIMEOUT_SECS", default_value_t = 60)]
    pub ws_heartbeat_timeout_secs: u64,

    /// Seconds before a WebSocket's token expires at which the gateway sends `token.expiring`,
    /// the client's cue to send a `refresh` frame; at the expiry the socket is closed (4001).
    #[arg(long, env = "HOTPATH_WS_EXPIRY_NOTICE_SECS", default_value_t = 30)]
    pub ws_expiry_notice_secs: u64,

    /// How long a socket node's presence entry outlives its last refresh (the `PRESENCE`
    /// bucket's max age); nodes refresh every third of it, so a dead node's entries vanish
    /// within this time.
    #[arg(long, env = "HOTPATH_PRESENCE_TTL_SECS", default_value_t = 30)]
    pub presence_ttl_secs: u64,

    /// Delays before the retries of a failed push, comma-separated milliseconds; after the
    /// last one fails the task goes to the DLQ.
    #[arg(long, env = "HOTPATH_PUSH_BACKOFF_MS", default_value = "1000,5000,30000", value_parser = parse_backoff)]
    pub push_backoff_ms: Backoff,

    /// Push tasks a push worker handles at once (per platform).
    #[arg(long, env = "HOTPATH_PUSH_CONCURRENCY", default_value_t = 32)]
    pub push_concurrency: usize,

    /// How long one request to APNS or FCM may take before it counts as failed (and is retried).
    #[arg(long, env = "HOTPATH_PUSH_REQUEST_TIMEOUT_SECS", default_value_t = 10)]
    pub push_request_timeout_secs: u64,

    /// Consecutive provider failures (unavailable, rate limited, timeouts, auth) after which a
    /// platform's circuit breaker opens: its tasks then wait in the stream.
    #[arg(long, env = "HOTPATH_PUSH_BREAKER_FAILURES", default_value_t = 5)]
    pub push_breaker_failures: u32,

    /// How long an open breaker waits before trying the provider again (doubling, up to ten
    /// times this, while the trials keep failing).
    #[arg(long, env = "HOTPATH_PUSH_BREAKER_OPEN_SECS", default_value_t = 30)]
    pub push_breaker_open_secs: u64,

    /// How long a push stays worth delivering: APNS expiration and FCM TTL.
    #[arg(long, env = "HOTPATH_PUSH_TTL_SECS", default_value_t = 86_400)]
    pub push_ttl_secs: u64,

    /// APNS token auth: the `.p8` signing key file from Apple.
    #[arg(long, env = "HOTPATH_APNS_KEY_FILE")]
    pub apns_key_file: Option<PathBuf>,

    /// APNS token auth: the `.p8` key's contents, for when it comes as a secret in the
    /// environment rather than a file.
    #[arg(long, env = "HOTPATH_APNS_KEY", hide_env_values = true)]
    pub apns_key: Option<String>,

    /// APNS token auth: the key's id.
    #[arg(long, env = "HOTPATH_APNS_KEY_ID")]
    pub apns_key_id: Option<String>,

    /// APNS token auth: the developer team id.
    #[arg(long, env = "HOTPATH_APNS_TEAM_ID")]
    pub apns_team_id: Option<String>,

    /// APNS certificate auth: the client certificate, PEM (convert a `.p12` with `openssl
    /// pkcs12 -in cert.p12 -clcerts -nokeys -out cert.pem`).
    #[arg(long, env = "HOTPATH_APNS_CERT_FILE")]
    pub apns_cert_file: Option<PathBuf>,

    /// APNS certificate auth: the certificate's private key, PEM.
    #[arg(long, env = "HOTPATH_APNS_CERT_KEY_FILE")]
    pub apns_cert_key_file: Option<PathBuf>,

    /// FCM: the Firebase service-account JSON file.
    #[arg(long, env = "HOTPATH_FCM_CREDENTIALS_FILE")]
    pub fcm_credentials_file: Option<PathBuf>,

    /// FCM: the service-account JSON itself, for when it comes as a secret in the environment.
    #[arg(long, env = "HOTPATH_FCM_CREDENTIALS", hide_env_values = true)]
    pub fcm_credentials: Option<String>,

    /// FCM: the HTTP v1 API's base URL.
    #[arg(
        long,
        env = "HOTPATH_FCM_BASE_URL",
        default_value = "https://fcm.googleapis.com"
    )]
    pub fcm_base_url: String,

    /// FCM: OAuth token endpoint; default: the service account's `token_uri`.
    #[arg(long, env = "HOTPATH_FCM_TOKEN_URI")]
    pub fcm_token_uri: Option<String>,

    /// FCM: the Firebase project; default: the service account's `project_id`.
    #[arg(long, env = "HOTPATH_FCM_PROJECT_ID")]
    pub fcm_project_id: Option<String>,
}

/// The settings [`Config::validate`] refused, each with the variable to fix.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the configuration cannot work:")?;
        for problem in &self.problems {
            write!(f, "\n  - {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Retry delays, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Backoff(pub Vec<Duration>);

fn parse_backoff(text: &str) -> Result<Backoff, String> {
    let delays = text
        .split(',')
        .map(|part| part.trim())
        .filter(|part| !part.is_empty())
        .map(|part| {
            part.parse::<u64>()
                .map(Duration::from_millis)
                .map_err(|_| format!("{part:?} is not a number of milliseconds"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Backoff(delays))
}

/// When JetStream forces its files to disk (nats-server's `sync_interval`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NatsSync {
    /// After every write.
    Always,
    /// At least this often.
    Every(Duration),
}

/// Written the way nats-server's configuration takes it: `always`, or milliseconds.
impl fmt::Display for NatsSync {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NatsSync::Always => f.write_str("always"),
            NatsSync::Every(interval) => write!(f, "{}ms", interval.as_millis()),
        }
    }
}

/// `always`, or a whole number of `ms`, `s`, `m` or `h` (more than zero).
fn parse_nats_sync(text: &str) -> Result<NatsSync, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("always") {
        return Ok(NatsSync::Always);
    }
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let millis_per_unit = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => 0,
    };
    match number.parse::<u64>() {
        Ok(number) if number > 0 && millis_per_unit > 0 => Ok(NatsSync::Every(
            Duration::from_millis(number.saturating_mul(millis_per_unit)),
        )),
        _ => Err(format!(
            "{text:?} is neither `always` nor an interval such as 100ms, 1s, 5m or 2h"
        )),
    }
}

#[derive(Parser)]
struct DefaultsOnly {
    #[command(flatten)]
    config: Config,
}

impl Config {
    /// The configuration from the environment and defaults alone.
    pub fn from_env() -> Result<Config, clap::Error> {
        DefaultsOnly::try_parse_from(["hotpath"]).map(|d| d.config)
    }

    /// Every setting that cannot work, each named by its `HOTPATH_…` variable with what to
    /// do about it; `Ok` when there is none. Every role checks this before it starts, so a
    /// mistake is one clear message at start-up, not a failure at the first request.
    ///
    /// What is only unusual is not refused: values below a sensible floor are raised to it by
    /// the accessors below (`ack_wait() / 3` for retries, at least one message per batch, …),
    /// and a consumer replica left without partitions runs, reports not ready and says why
    /// ([`Config::owns_nothing_because`]).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if self.partitions == 0 {
            problems.push(
                "HOTPATH_PARTITIONS is 0: it must be at least 1 (conversations are spread over \
                 the partitions)"
                    .to_string(),
            );
        }
        if let Some(secret) = &self.jwt_secret {
            let min = crate::auth::MIN_HS256_SECRET_BYTES;
            if secret.len() < min {
                problems.push(format!(
                    "HOTPATH_JWT_SECRET is {} bytes: it must be at least {min} (make one with \
                     `openssl rand -hex 32`)",
                    secret.len()
                ));
            }
        }
        if self.ack_wait_secs == 0 {
            problems.push(
                "HOTPATH_ACK_WAIT_SECS is 0: it must be at least 1 (how long a delivery may \
                 take before JetStream redelivers it)"
                    .to_string(),
            );
        }
        if !(1..=MAX_NATS_REPLICAS).contains(&self.nats_replicas) {
            problems.push(format!(
                "HOTPATH_NATS_REPLICAS is {}: JetStream keeps 1 to {MAX_NATS_REPLICAS} replicas \
                 (1 on one nats-server, 3 on a three-node cluster)",
                self.nats_replicas
            ));
        }
        problems.extend(self.push_credential_problems());
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems })
        }
    }

    /// Push credentials given twice, or two ways at once.
    fn push_credential_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let apns_token = self.apns_key_file.is_some()
            || self.apns_key.is_some()
            || self.apns_key_id.is_some()
            || self.apns_team_id.is_some();
        let apns_certificate = self.apns_cert_file.is_some() || self.apns_cert_key_file.is_some();
        if apns_token && apns_certificate {
            problems.push(
                "APNS: set token auth (HOTPATH_APNS_KEY_FILE or HOTPATH_APNS_KEY, \
                 HOTPATH_APNS_KEY_ID, HOTPATH_APNS_TEAM_ID) or certificate auth \
                 (HOTPATH_APNS_CERT_FILE, HOTPATH_APNS_CERT_KEY_FILE), not both"
                    .to_string(),
            );
        }
        if self.apns_key_file.is_some() && self.apns_key.is_some() {
            problems.push("set HOTPATH_APNS_KEY_FILE or HOTPATH_APNS_KEY, not both".to_string());
        }
        if self.fcm_credentials_file.is_some() && self.fcm_credentials.is_some() {
            problems.push(
                "set HOTPATH_FCM_CREDENTIALS_FILE or HOTPATH_FCM_CREDENTIALS, not both".to_string(),
            );
        }
        problems
    }

    pub fn publish_timeout(&self) -> Duration {
        Duration::from_millis(self.publish_timeout_ms)
    }

    pub fn http_header_timeout(&self) -> Duration {
        Duration::from_secs(self.http_header_timeout_secs.max(1))
    }

    pub fn http_body_timeout(&self) -> Duration {
        Duration::from_secs(self.http_body_timeout_secs.max(1))
    }

    pub fn http_idle_timeout(&self) -> Duration {
        Duration::from_secs(self.http_idle_timeout_secs.max(1))
    }

    pub fn db_statement_timeout(&self) -> Duration {
        Duration::from_millis(self.db_statement_timeout_ms.max(1))
    }

    pub fn db_acquire_timeout(&self) -> Duration {
        Duration::from_millis(self.db_acquire_timeout_ms.max(1))
    }

    pub fn negative_cache_ttl(&self) -> Duration {
        Duration::from_secs(self.negative_cache_secs.max(1))
    }

    pub fn ack_wait(&self) -> Duration {
        Duration::from_secs(self.ack_wait_secs)
    }

    /// Longest pause between a consumer's retries while Postgres is away: a third of the ack
    /// wait, so the in-progress signal always arrives in time, within 100 ms and 5 s.
    pub fn max_retry_delay(&self) -> Duration {
        (self.ack_wait() / 3).clamp(Duration::from_millis(100), Duration::from_secs(5))
    }

    /// Messages a delivery worker takes at once: `HOTPATH_BATCH_SIZE`, at least one.
    pub fn batch_limit(&self) -> usize {
        self.batch_size.max(1)
    }

    /// Deliveries before an unstorable message or receipt is dead-lettered:
    /// `HOTPATH_POISON_MAX_DELIVER`, at least one.
    pub fn poison_deliveries(&self) -> u64 {
        self.poison_max_deliver.max(1)
    }

    pub fn facts_ttl(&self) -> Duration {
        Duration::from_secs(self.facts_ttl_secs)
    }

    pub fn ws_ping_interval(&self) -> Duration {
        Duration::from_secs(self.ws_ping_interval_secs.max(1))
    }

    pub fn ws_heartbeat_timeout(&self) -> Duration {
        Duration::from_secs(self.ws_heartbeat_timeout_secs.max(1))
    }

    pub fn ws_expiry_notice(&self) -> Duration {
        Duration::from_secs(self.ws_expiry_notice_secs)
    }

    pub fn presence_ttl(&self) -> Duration {
        // Below 3 s the refresh (every third) would be sub-second: not worth the traffic.
        Duration::from_secs(self.presence_ttl_secs.max(3))
    }

    pub fn push_request_timeout(&self) -> Duration {
        Duration::from_secs(self.push_request_timeout_secs.max(1))
    }

    pub fn push_breaker_open(&self) -> Duration {
        Duration::from_secs(self.push_breaker_open_secs.max(1))
    }

    pub fn push_ttl(&self) -> Duration {
        Duration::from_secs(self.push_ttl_secs)
    }

    pub fn lease_ttl(&self) -> Duration {
        // Below 1 s the renewals (every third) would come faster than NATS answers under load.
        Duration::from_secs(self.lease_ttl_secs.max(1))
    }

    /// The partitions this consumer replica owns.
    pub fn owned_partitions(&self) -> Vec<u32> {
        let replicas = self.consumer_replicas.max(1);
        (0..self.partitions)
            .filter(|p| p % replicas == self.consumer_replica)
            .collect()
    }

    /// Why this consumer replica owns no partition, if it owns none: always a configuration
    /// mistake (its share of the stream would have no consumer).
    pub fn owns_nothing_because(&self) -> Option<String> {
        let replicas = self.consumer_replicas.max(1);
        if self.partitions == 0 {
            Some("HOTPATH_PARTITIONS is 0".to_string())
        } else if self.consumer_replica >= replicas {
            Some(format!(
                "HOTPATH_CONSUMER_REPLICA={} is not below HOTPATH_CONSUMER_REPLICAS={}: replica \
                 indexes run from 0 to {}",
                self.consumer_replica,
                self.consumer_replicas,
                replicas - 1
            ))
        } else if self.owned_partitions().is_empty() {
            Some(format!(
                "replica {} of {} is left no partition of {}",
                self.consumer_replica, replicas, self.partitions
            ))
        } else {
            None
        }
    }
}

impl Config {
    /// Where it connects and how callers are authenticated.
    fn fmt_connections(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "nats_url={}", redact_nats_url(&self.nats_url))?;
        writeln!(
            f,
            "nats_creds={:?} nats_replicas={}",
            self.nats_creds, self.nats_replicas
        )?;
        match self.nats_sync {
            Some(sync) => writeln!(f, "nats_sync={sync}")?,
            None => writeln!(f, "nats_sync=<nats-server default>")?,
        }
        writeln!(
            f,
            "database_url={}",
            redact_url_password(&self.database_url)
        )?;
        writeln!(f, "listen={}", self.listen)?;
        writeln!(f, "partitions={}", self.partitions)?;
        let secret = if self.jwt_secret.is_some() {
            "<redacted>"
        } else {
            "<unset>"
        };
        writeln!(f, "jwt_secret={secret}")?;
        writeln!(f, "jwt_secret_file={:?}", self.jwt_secret_file)?;
        writeln!(f, "jwt_public_key_file={:?}", self.jwt_public_key_file)?;
        writeln!(f, "jwt_jwks_url={:?}", self.jwt_jwks_url)?;
        writeln!(
            f,
            "jwt_issuer={:?} jwt_audience={:?} jwt_leeway_secs={}",
            self.jwt_issuer, self.jwt_audience, self.jwt_leeway_secs
        )?;
        Ok(())
    }

    /// The gateway's limits on what clients may send and how long they may take.
    fn fmt_ingress(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "rate_per_user={} rate_burst={}",
            self.rate_per_user, self.rate_burst
        )?;
        writeln!(
            f,
            "ack_rate_per_user={} ack_rate_burst={}",
            self.ack_rate_per_user, self.ack_rate_burst
        )?;
        writeln!(
            f,
            "max_members={} membership_rate_per_min={}",
            self.max_members, self.membership_rate_per_min
        )?;
        writeln!(f, "max_body_bytes={}", self.max_body_bytes)?;
        writeln!(f, "max_in_flight_sends={}", self.max_in_flight_sends)?;
        writeln!(f, "publish_timeout_ms={}", self.publish_timeout_ms)?;
        writeln!(
            f,
            "http_header_timeout_secs={} http_body_timeout_secs={} http_idle_timeout_secs={} \
             max_connections={}",
            self.http_header_timeout_secs,
            self.http_body_timeout_secs,
            self.http_idle_timeout_secs,
            self.max_connections
        )?;
        Ok(())
    }

    /// Streams, batches, pools, caches, policies and sockets.
    fn fmt_delivery(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "batch_size={} ack_wait_secs={} poison_max_deliver={}",
            self.batch_size, self.ack_wait_secs, self.poison_max_deliver
        )?;
        writeln!(
            f,
            "backlog_max_bytes={} backlog_max_msgs={} replay_max_age_secs={} \
             replay_max_bytes={} receipts_max_bytes={}",
            self.backlog_max_bytes,
            self.backlog_max_msgs,
            self.replay_max_age_secs,
            self.replay_max_bytes,
            self.receipts_max_bytes
        )?;
        writeln!(f, "facts_ttl_secs={}", self.facts_ttl_secs)?;
        writeln!(
            f,
            "db_max_connections={} db_query_connections={} db_facts_connections={} \
             db_statement_timeout_ms={} db_acquire_timeout_ms={}",
            self.db_max_connections,
            self.db_query_connections,
            self.db_facts_connections,
            self.db_statement_timeout_ms,
            self.db_acquire_timeout_ms
        )?;
        writeln!(
            f,
            "negative_cache_secs={} history_cache_bytes={}",
            self.negative_cache_secs, self.history_cache_bytes
        )?;
        writeln!(f, "policy_dir={}", self.policy_dir.display())?;
        writeln!(
            f,
            "ws_outbound_queue={} ws_ping_interval_secs={} ws_heartbeat_timeout_secs={} \
             ws_expiry_notice_secs={}",
            self.ws_outbound_queue,
            self.ws_ping_interval_secs,
            self.ws_heartbeat_timeout_secs,
            self.ws_expiry_notice_secs
        )?;
        writeln!(f, "presence_ttl_secs={}", self.presence_ttl_secs)?;
        Ok(())
    }

    /// Push providers (credentials only as set or unset) and consumer replicas.
    fn fmt_push_and_replicas(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let delays: Vec<String> = self
            .push_backoff_ms
            .0
            .iter()
            .map(|d| d.as_millis().to_string())
            .collect();
        writeln!(
            f,
            "push_backoff_ms={} push_concurrency={} push_request_timeout_secs={} \
             push_breaker_failures={} push_breaker_open_secs={} push_ttl_secs={}",
            delays.join(","),
            self.push_concurrency,
            self.push_request_timeout_secs,
            self.push_breaker_failures,
            self.push_breaker_open_secs,
            self.push_ttl_secs
        )?;
        let set = |secret: bool| if secret { "<set>" } else { "<unset>" };
        writeln!(
            f,
            "apns_key_file={:?} apns_key={} apns_key_id={:?} apns_team_id={:?} \
             apns_cert_file={:?} apns_cert_key_file={:?}",
            self.apns_key_file,
            set(self.apns_key.is_some()),
            self.apns_key_id,
            self.apns_team_id,
            self.apns_cert_file,
            self.apns_cert_key_file
        )?;
        writeln!(
            f,
            "fcm_credentials_file={:?} fcm_credentials={} fcm_base_url={} fcm_token_uri={:?} \
             fcm_project_id={:?}",
            self.fcm_credentials_file,
            set(self.fcm_credentials.is_some()),
            self.fcm_base_url,
            self.fcm_token_uri,
            self.fcm_project_id
        )?;
        write!(
            f,
            "consumer_replica={}/{} lease_ttl_secs={} delivery_niceness={}",
            self.consumer_replica,
            self.consumer_replicas,
            self.lease_ttl_secs,
            self.delivery_niceness
        )?;
        Ok(())
    }
}

/// Prints the configuration with the credentials in the NATS and database URLs and every
/// secret hidden.
impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.fmt_connections(f)?;
        self.fmt_ingress(f)?;
        self.fmt_delivery(f)?;
        self.fmt_push_and_replicas(f)
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
pub fn redact_url_password(url: &str) -> String {
    redact_userinfo(url, false)
}

/// A NATS URL (or a comma-separated list of them, as async-nats accepts) fit to print:
/// `nats://user:secret@host` → `nats://user:***@host`, and `nats://token@host` (NATS token
/// authentication, where the lone user-info part is the secret) → `nats://***@host`.
pub fn redact_nats_url(urls: &str) -> String {
    urls.split(',')
        .map(|url| redact_userinfo(url, true))
        .collect::<Vec<_>>()
        .join(",")
}

/// Hides the password of a URL's user-info, or all of it when a lone part is itself a secret.
fn redact_userinfo(url: &str, lone_part_is_secret: bool) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    // The user-info ends at the authority's last `@` (a password may hold an unescaped one);
    // the authority ends where the path, query or fragment begins.
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return url.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}{path}"),
        None if lone_part_is_secret => format!("{scheme}://***@{host}{path}"),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact_url_password("postgres://u:p@h:5/db"),
            "postgres://u:***@h:5/db"
        );
        assert_eq!(
            redact_url_password("postgres://u@h/db"),
            "postgres://u@h/db"
        );
        assert_eq!(
            redact_url_password("postgres://u:p@ss@h/db?application_name=a@b"),
            "postgres://u:***@h/db?application_name=a@b"
        );
    }

    #[test]
    fn printed_nats_urls_keep_no_credentials() {
        assert_eq!(
            redact_nats_url("nats://app:s3cret@nats.internal:4222"),
            "nats://app:***@nats.internal:4222"
        );
        // A lone user-info part is a token (NATS token authentication): all of it is secret.
        assert_eq!(
            redact_nats_url("nats://s3cret@nats.internal:4222"),
            "nats://***@nats.internal:4222"
        );
        assert_eq!(
            redact_nats_url("nats://a:s3cret@n1:4222,nats://s3cret@n2:4222,nats://n3:4222"),
            "nats://a:***@n1:4222,nats://***@n2:4222,nats://n3:4222"
        );
        assert_eq!(
            redact_nats_url("nats://127.0.0.1:4222"),
            "nats://127.0.0.1:4222"
        );

        let mut config = Config::from_env().unwrap();
        config.nats_url = "nats://app:s3cret@nats.internal:4222".into();
        let printed = config.to_string();
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(printed.contains("nats_url=nats://app:***@nats.internal:4222"));
    }

    #[test]
    fn validate_names_every_setting_to_fix() {
        let mut config = Config::from_env().unwrap();
        assert_eq!(config.validate(), Ok(()));
        config.partitions = 0;
        config.jwt_secret = Some("short".into());
        config.fcm_credentials = Some("{}".into());
        config.fcm_credentials_file = Some("/etc/fcm.json".into());
        config.apns_key_id = Some("KEY".into());
        config.apns_cert_file = Some("/etc/apns.pem".into());
        config.nats_replicas = 0;
        let error = config.validate().unwrap_err();
        assert_eq!(error.problems.len(), 5, "{error}");
        let text = error.to_string();
        for setting in [
            "HOTPATH_PARTITIONS",
            "HOTPATH_JWT_SECRET is 5 bytes",
            "HOTPATH_FCM_CREDENTIALS_FILE",
            "HOTPATH_APNS_CERT_FILE",
            "HOTPATH_NATS_REPLICAS is 0",
        ] {
            assert!(text.contains(setting), "{setting} in {text}");
        }
    }

    #[test]
    fn nats_credentials_print_as_their_path_and_replicas_default_to_one() {
        let mut config = Config::from_env().unwrap();
        assert_eq!(config.nats_creds, None);
        assert_eq!(config.nats_replicas, 1);
        config.nats_creds = Some("/run/secrets/nats/gateway.nk".into());
        config.nats_replicas = 3;
        assert_eq!(config.validate(), Ok(()));
        let printed = config.to_string();
        assert!(
            printed.contains("nats_creds=Some(\"/run/secrets/nats/gateway.nk\") nats_replicas=3"),
            "{printed}"
        );
        config.nats_replicas = MAX_NATS_REPLICAS + 1;
        assert!(config.validate().is_err());
    }

    #[test]
    fn nats_sync_is_always_or_an_interval() {
        assert_eq!(parse_nats_sync("always"), Ok(NatsSync::Always));
        assert_eq!(
            parse_nats_sync("250ms"),
            Ok(NatsSync::Every(Duration::from_millis(250)))
        );
        assert_eq!(
            parse_nats_sync("2m"),
            Ok(NatsSync::Every(Duration::from_secs(120)))
        );
        for bad in ["", "0s", "often", "5", "1.5s", "-1s", "10d"] {
            assert!(parse_nats_sync(bad).is_err(), "{bad:?}");
        }
        assert_eq!(NatsSync::Always.to_string(), "always");
        assert_eq!(
            NatsSync::Every(Duration::from_secs(1)).to_string(),
            "1000ms"
        );
    }

    #[test]
    fn backoff_parses_and_secrets_stay_hidden() {
        let config = Config::from_env().unwrap();
        assert_eq!(
            config.push_backoff_ms.0,
            vec![
                Duration::from_secs(1),
                Duration::from_secs(5),
                Duration::from_secs(30)
            ]
        );
        assert!(parse_backoff("100, x").is_err());
        let mut config = config;
        config.fcm_credentials = Some("{\"private_key\": \"very-secret\"}".into());
        config.apns_key = Some("-----BEGIN PRIVATE KEY----- very-secret".into());
        let printed = config.to_string();
        assert!(!printed.contains("very-secret"), "{printed}");
        assert!(printed.contains("fcm_credentials=<set>"));
    }

    #[test]
    fn the_member_cap_defaults_to_the_recipient_limit() {
        let config = Config::from_env().unwrap();
        assert_eq!(config.max_members, 1000);
        assert_eq!(config.max_members, DEFAULT_MAX_MEMBERS);
    }

    #[test]
    fn replicas_split_partitions_disjointly() {
        let mut config = Config::from_env().unwrap();
        config.partitions = 16;
        config.consumer_replicas = 3;
        let all: Vec<u32> = (0..3)
            .flat_map(|k| {
                let mut c = config.clone();
                c.consumer_replica = k;
                c.owned_partitions()
            })
            .collect();
        let mut sorted = all.clone();
        sorted.sort();
        assert_eq!(sorted, (0..16).collect::<Vec<_>>());
        assert_eq!(config.owns_nothing_because(), None);
        config.consumer_replica = 3;
        assert!(config.owned_partitions().is_empty());
        let why = config.owns_nothing_because().expect("misconfigured");
        assert!(why.contains("HOTPATH_CONSUMER_REPLICA=3"), "{why}");
        config.consumer_replica = 0;
        config.partitions = 0;
        assert!(config.owns_nothing_because().is_some());
    }
}
