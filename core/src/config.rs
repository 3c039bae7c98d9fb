//! Configuration: one struct, read from flags or `HOTPATH_*` environment variables, with
//! defaults that suit a laptop. Printed at start-up with secrets redacted.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser};

#[derive(Debug, Clone, Args)]
pub struct Config {
    /// NATS server URL.
    #[arg(
        long,
        env = "HOTPATH_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats_url: String,

    /// Postgres URL.
    #[arg(
        long,
        env = "HOTPATH_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/hotpath"
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

    /// Sustained messages per second per user; 0 turns rate limiting off.
    #[arg(long, env = "HOTPATH_RATE_PER_USER", default_value_t = 50)]
    pub rate_per_user: u32,

    /// Burst of messages a user may send at once.
    #[arg(long, env = "HOTPATH_RATE_BURST", default_value_t = 100)]
    pub rate_burst: u32,

    /// Largest request body accepted, in bytes (413 above it).
    #[arg(long, env = "HOTPATH_MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,

    /// Sends handled at once per gateway; above it a send is answered 503 at once (load
    /// shedding) instead of queueing until every client times out.
    #[arg(long, env = "HOTPATH_MAX_IN_FLIGHT_SENDS", default_value_t = 8192)]
    pub max_in_flight_sends: usize,

    /// How long a publish may wait for JetStream's acknowledgement before answering 503.
    #[arg(long, env = "HOTPATH_PUBLISH_TIMEOUT_MS", default_value_t = 1000)]
    pub publish_timeout_ms: u64,

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

    /// Postgres pool size per process.
    #[arg(long, env = "HOTPATH_DB_MAX_CONNECTIONS", default_value_t = 20)]
    pub db_max_connections: u32,

    /// This consumer replica's index k: it owns the partitions p with p mod n == k.
    #[arg(long, env = "HOTPATH_CONSUMER_REPLICA", default_value_t = 0)]
    pub consumer_replica: u32,

    /// Number n of consumer replicas.
    #[arg(long, env = "HOTPATH_CONSUMER_REPLICAS", default_value_t = 1)]
    pub consumer_replicas: u32,

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

    /// How long a socket node's presence entry outlives its last refresh (the `PRESENCE`
    /// bucket's max age); nodes refresh every third of it, so a dead node's entries vanish
    /// within this time.
    #[arg(long, env = "HOTPATH_PRESENCE_TTL_SECS", default_value_t = 30)]
    pub presence_ttl_secs: u64,
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

    pub fn publish_timeout(&self) -> Duration {
        Duration::from_millis(self.publish_timeout_ms)
    }

    pub fn ack_wait(&self) -> Duration {
        Duration::from_secs(self.ack_wait_secs)
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

    pub fn presence_ttl(&self) -> Duration {
        // Below 3 s the refresh (every third) would be sub-second: not worth the traffic.
        Duration::from_secs(self.presence_ttl_secs.max(3))
    }

    /// The partitions this consumer replica owns.
    pub fn owned_partitions(&self) -> Vec<u32> {
        let replicas = self.consumer_replicas.max(1);
        (0..self.partitions)
            .filter(|p| p % replicas == self.consumer_replica)
            .collect()
    }
}

/// Prints the configuration with the database password and the JWT secret hidden.
impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "nats_url={}", self.nats_url)?;
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
        writeln!(
            f,
            "rate_per_user={} rate_burst={}",
            self.rate_per_user, self.rate_burst
        )?;
        writeln!(f, "max_body_bytes={}", self.max_body_bytes)?;
        writeln!(f, "max_in_flight_sends={}", self.max_in_flight_sends)?;
        writeln!(f, "publish_timeout_ms={}", self.publish_timeout_ms)?;
        writeln!(
            f,
            "batch_size={} ack_wait_secs={} poison_max_deliver={}",
            self.batch_size, self.ack_wait_secs, self.poison_max_deliver
        )?;
        writeln!(f, "facts_ttl_secs={}", self.facts_ttl_secs)?;
        writeln!(f, "db_max_connections={}", self.db_max_connections)?;
        writeln!(f, "policy_dir={}", self.policy_dir.display())?;
        writeln!(
            f,
            "ws_outbound_queue={} ws_ping_interval_secs={} ws_heartbeat_timeout_secs={}",
            self.ws_outbound_queue, self.ws_ping_interval_secs, self.ws_heartbeat_timeout_secs
        )?;
        writeln!(f, "presence_ttl_secs={}", self.presence_ttl_secs)?;
        write!(
            f,
            "consumer_replica={}/{}",
            self.consumer_replica, self.consumer_replicas
        )
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
pub fn redact_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
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
    }
}
