//! A second gateway, in a process of its own (`hotpath gateway` of the built binary), beside a
//! [`System`]'s in-process one: the same NATS and Postgres, the same configuration, another
//! address. Killing it with SIGKILL is what a crashed gateway pod is: its connections drop
//! mid-request, nothing is drained, its presence entries are left to expire.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::{SECRET, System};

/// A `hotpath gateway` process, killed when dropped.
pub struct GatewayProcess {
    child: Child,
    /// `http://127.0.0.1:<port>`
    pub base: String,
    log: PathBuf,
}

impl GatewayProcess {
    /// Starts `bin gateway` (`bin`: the built `hotpath`, `env!("CARGO_BIN_EXE_hotpath")` in
    /// the CLI's tests) with `system`'s configuration, and waits (bounded) until its `/readyz`
    /// answers 200: NATS and Postgres reached, the policy chain loaded.
    pub async fn start(system: &System, bin: &str, name: &str) -> GatewayProcess {
        let config = &system.config;
        let port = hotpath_localstack::free_port().expect("free port");
        let log = system.servers.dir.path().join(format!("{name}.log"));
        let output = File::create(&log).expect("log file");
        let child = Command::new(bin)
            .arg("gateway")
            .env("HOTPATH_LISTEN", format!("127.0.0.1:{port}"))
            .env("HOTPATH_NATS_URL", &config.nats_url)
            .env("HOTPATH_DATABASE_URL", &config.database_url)
            .env("HOTPATH_JWT_SECRET", SECRET)
            .env("HOTPATH_RATE_PER_USER", config.rate_per_user.to_string())
            .env(
                "HOTPATH_ACK_RATE_PER_USER",
                config.ack_rate_per_user.to_string(),
            )
            .env(
                "HOTPATH_MEMBERSHIP_RATE_PER_MIN",
                config.membership_rate_per_min.to_string(),
            )
            .env("HOTPATH_PARTITIONS", config.partitions.to_string())
            .env("HOTPATH_ACK_WAIT_SECS", config.ack_wait_secs.to_string())
            .env("HOTPATH_DB_MAX_CONNECTIONS", "5")
            .env("HOTPATH_POLICY_DIR", &config.policy_dir)
            .env("RUST_LOG", "info,sqlx=warn,async_nats=warn")
            .stdout(output.try_clone().expect("log file"))
            .stderr(output)
            .spawn()
            .expect("hotpath gateway starts");
        let gateway = GatewayProcess {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
        };
        gateway.wait_until_ready(&system.http).await;
        gateway
    }

    async fn wait_until_ready(&self, http: &reqwest::Client) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let ready = http.get(self.url("/readyz")).send().await;
            if ready.is_ok_and(|response| response.status() == 200) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "the gateway was not ready within 60 s; log:\n{}",
            self.log()
        );
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: open connections and requests in flight end on the spot.
    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL delivered");
        let _ = self.child.wait();
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
