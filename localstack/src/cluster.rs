//! A local NATS run from the production configuration: `nats/cluster/`, with its accounts.
//!
//! [`NatsServer`](crate::NatsServer) is a development server that lets anyone do anything.
//! Production is three clustered nodes on which nobody connects anonymously and each role is a
//! least-privilege nkey user (`nats/cluster/accounts.conf`, docs/adr/0009-nats-accounts.md).
//! [`NatsCluster`] runs exactly that on loopback, from the very files Kubernetes uses: they
//! are embedded here and written unchanged into the cluster's directory, and everything that
//! differs per node (its name, ports, store, the routes, the users' public keys) is passed in
//! the environment, as a pod gets it.
//!
//! * **Nodes.** Three (or any count above one) run `nats/cluster/nats-server.conf`, which
//!   clusters them; one runs `nats/cluster/node.conf`, the same node without the cluster (a
//!   JetStream cluster of one never elects a leader). Each node gets free loopback ports for
//!   clients, routes and monitoring, and its store and log under `<dir>/<node name>/`.
//! * **Users.** Every start generates a fresh nkey per user of the accounts ([`NatsRole`]):
//!   the seeds are written into `<dir>/creds/<role>.nk`, mode 0600 (what `HOTPATH_NATS_CREDS`
//!   points at), and only the public keys reach the servers.
//! * **Faults.** Each node can be SIGKILLed, stopped and restarted on its ports and store, and
//!   [`NatsCluster::wait_healthy`] waits on the monitoring endpoint for JetStream to be enabled
//!   on every node (`/healthz?js-enabled-only=true`, what Kubernetes' start-up probe asks) and
//!   then current (`/healthz`: a meta leader is known and the node has caught up with every
//!   stream it holds).
//!
//! Dropping the cluster SIGKILLs and reaps every node, as dropping a `NatsServer` does.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep, timeout};

use crate::nats::{find_nats_server, quote, quote_path};
use crate::process::{self, create_dir, ensure_port_free, log_tail};
use crate::{free_port, spawner};

const NODE_CONF: &str = include_str!("../../nats/cluster/node.conf");
const CLUSTER_CONF: &str = include_str!("../../nats/cluster/nats-server.conf");
const ACCOUNTS_CONF: &str = include_str!("../../nats/cluster/accounts.conf");

/// How long a node may take to come up, and a cluster to elect its leaders and catch up.
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_GRACE: Duration = Duration::from_secs(10);

/// The users of `nats/cluster/accounts.conf`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NatsRole {
    Gateway,
    Consumers,
    Push,
    /// Everything in the application account: set-up and the operator commands.
    Operator,
    /// The system account (server reports and events).
    System,
}

impl NatsRole {
    pub const ALL: [NatsRole; 5] = [
        NatsRole::Gateway,
        NatsRole::Consumers,
        NatsRole::Push,
        NatsRole::Operator,
        NatsRole::System,
    ];

    /// The name of its seed file, `<name>.nk`.
    pub fn name(self) -> &'static str {
        match self {
            NatsRole::Gateway => "gateway",
            NatsRole::Consumers => "consumers",
            NatsRole::Push => "push",
            NatsRole::Operator => "operator",
            NatsRole::System => "system",
        }
    }

    /// The variable `accounts.conf` reads the user's public key from.
    pub fn env_var(self) -> &'static str {
        match self {
            NatsRole::Gateway => "NATS_GATEWAY_NKEY",
            NatsRole::Consumers => "NATS_CONSUMERS_NKEY",
            NatsRole::Push => "NATS_PUSH_NKEY",
            NatsRole::Operator => "NATS_OPERATOR_NKEY",
            NatsRole::System => "NATS_SYSTEM_NKEY",
        }
    }
}

/// The loopback ports of one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodePorts {
    pub client: u16,
    /// Routes between the nodes (unused by a node that runs alone).
    pub cluster: u16,
    /// Monitoring: `/healthz`, `/varz`, `/jsz`.
    pub monitor: u16,
}

impl NodePorts {
    /// Three ports that were free a moment ago.
    pub fn free() -> Result<NodePorts> {
        Ok(NodePorts {
            client: free_port()?,
            cluster: free_port()?,
            monitor: free_port()?,
        })
    }
}

/// What the monitoring endpoint is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// `/healthz?js-enabled-only=true`: the server runs with JetStream enabled.
    JetStreamEnabled,
    /// `/healthz`: a meta leader is known and this node is current with every stream and
    /// consumer it holds a replica of.
    Current,
}

impl Health {
    fn path(self) -> &'static str {
        match self {
            Health::JetStreamEnabled => "/healthz?js-enabled-only=true",
            Health::Current => "/healthz",
        }
    }
}

/// Local nats-servers run from `nats/cluster/`, with fresh nkey users (see the module doc).
#[derive(Debug)]
pub struct NatsCluster {
    dir: PathBuf,
    nodes: Vec<NatsNode>,
}

impl NatsCluster {
    /// Starts `nodes` nodes on free loopback ports in `dir` and waits until every one is
    /// healthy and current ([`NatsCluster::wait_healthy`]).
    pub async fn start(dir: &Path, nodes: usize) -> Result<NatsCluster> {
        let ports = (0..nodes)
            .map(|_| NodePorts::free())
            .collect::<Result<Vec<_>>>()?;
        NatsCluster::start_on(dir, ports).await
    }

    /// [`NatsCluster::start`] on the given ports, one [`NodePorts`] per node.
    pub async fn start_on(dir: &Path, ports: Vec<NodePorts>) -> Result<NatsCluster> {
        anyhow::ensure!(!ports.is_empty(), "a NATS cluster needs at least one node");
        let bin = tokio::task::spawn_blocking(find_nats_server)
            .await
            .context("looking for nats-server")??;
        let (dir, _) = create_dir(dir)?;
        let conf = write_config(&dir)?;
        let mut env = write_users(&dir)?;
        let entry = if ports.len() == 1 {
            conf.join("node.conf")
        } else {
            env.push(("NATS_ROUTES".to_string(), routes(&ports)));
            conf.join("nats-server.conf")
        };
        let mut cluster = NatsCluster {
            nodes: Vec::with_capacity(ports.len()),
            dir: dir.clone(),
        };
        for (index, ports) in ports.into_iter().enumerate() {
            let name = format!("hotpath-{index}");
            let (node_dir, _) = create_dir(&dir.join(&name))?;
            let mut node = NatsNode {
                name,
                ports,
                dir: node_dir,
                bin: bin.clone(),
                config: entry.clone(),
                env: env.clone(),
                child: None,
            };
            node.spawn().await?;
            cluster.nodes.push(node);
        }
        cluster.wait_healthy().await?;
        Ok(cluster)
    }

    /// Where the configuration, the seeds and the nodes' stores are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn nodes(&self) -> &[NatsNode] {
        &self.nodes
    }

    /// The node at `index` (0-based; its name is `hotpath-<index>`).
    pub fn node(&self, index: usize) -> &NatsNode {
        &self.nodes[index]
    }

    pub fn node_mut(&mut self, index: usize) -> &mut NatsNode {
        &mut self.nodes[index]
    }

    /// The index of the node whose `server_name` is `name` (as JetStream names a leader).
    pub fn node_named(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|node| node.name == name)
    }

    /// The nodes, each to be owned (and supervised) on its own; the cluster's directory and
    /// its seeds stay where they are.
    pub fn into_nodes(self) -> Vec<NatsNode> {
        self.nodes
    }

    /// Every node's client URL, comma-separated: what `HOTPATH_NATS_URL` takes.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsNode::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The seed file of `role`'s user (what `HOTPATH_NATS_CREDS` takes).
    pub fn creds(&self, role: NatsRole) -> PathBuf {
        creds_path(&self.dir, role)
    }

    /// Waits until every running node has JetStream enabled, then until every one is current.
    pub async fn wait_healthy(&mut self) -> Result<()> {
        for health in [Health::JetStreamEnabled, Health::Current] {
            for node in self.nodes.iter_mut().filter(|node| node.pid().is_some()) {
                node.wait_healthy(health, HEALTHY_TIMEOUT).await?;
            }
        }
        Ok(())
    }
}

/// One nats-server of a [`NatsCluster`]. Dropping it SIGKILLs and reaps the server.
#[derive(Debug)]
pub struct NatsNode {
    name: String,
    ports: NodePorts,
    dir: PathBuf,
    bin: PathBuf,
    config: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl NatsNode {
    /// Its `server_name`.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn ports(&self) -> NodePorts {
        self.ports
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.ports.client)
    }

    /// The server's log: its stdout and stderr, appended across restarts.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("nats.log")
    }

    /// The server's pid while it runs (`None` after `stop`/`kill`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The node's directory: its store (`jetstream/`) and its log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The exit status of a server that ended by itself (killed from outside, crashed);
    /// `None` while it runs, and after [`NatsNode::stop`] or [`NatsNode::kill`]. A
    /// supervisor polls this and calls [`NatsNode::restart`].
    pub fn try_exit(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(child) => Ok(child.try_wait()?),
            None => Ok(None),
        }
    }

    /// SIGKILL and reap: no goodbye to the other nodes, nothing flushed. Does nothing if the
    /// node is not running.
    pub async fn kill(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        let status = process::kill(child).await?;
        self.child = None;
        tracing::info!(node = %self.name, %status, "nats-server killed");
        Ok(())
    }

    /// SIGTERM, wait up to 10 s, then SIGKILL. Does nothing if the node is not running.
    pub async fn stop(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        let (status, graceful) = process::terminate(child, libc::SIGTERM, STOP_GRACE).await?;
        self.child = None;
        tracing::info!(node = %self.name, %status, graceful, "nats-server stopped");
        Ok(())
    }

    /// Starts the node again on its ports and store (stopping it first if it still runs) and
    /// waits until JetStream is enabled on it. That it has caught up with the others is
    /// [`Health::Current`], for the caller to wait for.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await?;
        self.spawn().await?;
        self.wait_healthy(Health::JetStreamEnabled, HEALTHY_TIMEOUT)
            .await
    }

    /// Whether the monitoring endpoint answers `health` with 200 now.
    pub async fn is_healthy(&self, health: Health) -> bool {
        get_status(self.ports.monitor, health.path()).await == Some(200)
    }

    /// Waits up to `within` until the node answers `health` with 200; fails at once if the
    /// server is not running or exits meanwhile (say, on a port taken in the meantime).
    pub async fn wait_healthy(&mut self, health: Health, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if self.is_healthy(health).await {
                return Ok(());
            }
            let exited = match self.child.as_mut() {
                Some(child) => child.try_wait()?.map(|status| status.to_string()),
                None => Some("not running".to_string()),
            };
            if let Some(status) = exited {
                self.child = None;
                bail!(
                    "nats-server {} exited ({status})\n{}",
                    self.name,
                    log_tail(&self.log_path())
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "nats-server {} did not answer {} with 200 within {within:?}\n{}",
                    self.name,
                    health.path(),
                    log_tail(&self.log_path())
                );
            }
            sleep(Duration::from_millis(100)).await;
        }
    }

    async fn spawn(&mut self) -> Result<()> {
        for port in [self.ports.client, self.ports.cluster, self.ports.monitor] {
            ensure_port_free(port).with_context(|| format!("cannot start {}", self.name))?;
        }
        let (stdout, stderr) = process::log_stdio(&self.log_path())?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-c")
            .arg(&self.config)
            .current_dir(&self.dir)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(self.node_env()?)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let child = spawner::spawn(cmd, None)
            .await
            .with_context(|| format!("spawning {}", self.bin.display()))?;
        tracing::info!(node = %self.name, pid = child.id(), ports = ?self.ports, "nats-server started");
        self.child = Some(child);
        Ok(())
    }

    /// The variables of `node.conf` and `nats-server.conf` that differ per node.
    fn node_env(&self) -> Result<Vec<(&'static str, String)>> {
        let listen = |port: u16| quote(&format!("127.0.0.1:{port}"));
        Ok(vec![
            ("NATS_SERVER_NAME", quote(&self.name)?),
            ("NATS_LISTEN", listen(self.ports.client)?),
            ("NATS_MONITOR_LISTEN", listen(self.ports.monitor)?),
            ("NATS_CLUSTER_LISTEN", listen(self.ports.cluster)?),
            ("NATS_STORE_DIR", quote_path(&self.dir.join("jetstream"))?),
        ])
    }
}

impl Drop for NatsNode {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            process::kill_blocking(child);
        }
    }
}

/// Writes the three files of `nats/cluster/` unchanged into `<dir>/conf` and returns it.
fn write_config(dir: &Path) -> Result<PathBuf> {
    let (conf, _) = create_dir(&dir.join("conf"))?;
    for (name, text) in [
        ("node.conf", NODE_CONF),
        ("nats-server.conf", CLUSTER_CONF),
        ("accounts.conf", ACCOUNTS_CONF),
    ] {
        let path = conf.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(conf)
}

fn creds_path(dir: &Path, role: NatsRole) -> PathBuf {
    dir.join("creds").join(format!("{}.nk", role.name()))
}

/// Generates a user per [`NatsRole`], writes each seed into its own 0600 file and returns the
/// public keys as the environment `accounts.conf` reads them from.
fn write_users(dir: &Path) -> Result<Vec<(String, String)>> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    create_dir(&dir.join("creds"))?;
    let mut env = Vec::new();
    for role in NatsRole::ALL {
        let user = nkeys::KeyPair::new_user();
        let seed = user
            .seed()
            .map_err(|e| anyhow::anyhow!("encoding an nkey seed: {e}"))?;
        let path = creds_path(dir, role);
        // A new file each time, created 0600: the seed is never readable by others, not even
        // for a moment, whatever the umask or an older file's mode.
        let _ = std::fs::remove_file(&path);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        writeln!(file, "{seed}").with_context(|| format!("writing {}", path.display()))?;
        env.push((role.env_var().to_string(), user.public_key()));
    }
    Ok(env)
}

/// `NATS_ROUTES`: every node's route URL, as a config list.
fn routes(ports: &[NodePorts]) -> String {
    let urls: Vec<String> = ports
        .iter()
        .map(|p| format!("\"nats://127.0.0.1:{}\"", p.cluster))
        .collect();
    format!("[{}]", urls.join(", "))
}

/// The status code of `GET <path>` on 127.0.0.1:`port`, or `None` if nothing answered within
/// a second.
async fn get_status(port: u16, path: &str) -> Option<u16> {
    let exchange = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut head = vec![0u8; 64];
        let read = stream.read(&mut head).await?;
        std::io::Result::Ok(String::from_utf8_lossy(&head[..read]).into_owned())
    };
    let head = timeout(Duration::from_secs(1), exchange).await.ok()?.ok()?;
    head.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_list_every_node() {
        let ports = [
            NodePorts {
                client: 1,
                cluster: 6222,
                monitor: 3,
            },
            NodePorts {
                client: 4,
                cluster: 6223,
                monitor: 6,
            },
        ];
        assert_eq!(
            routes(&ports),
            "[\"nats://127.0.0.1:6222\", \"nats://127.0.0.1:6223\"]"
        );
    }

    #[test]
    fn every_user_of_the_accounts_is_generated() {
        for role in NatsRole::ALL {
            assert!(
                ACCOUNTS_CONF.contains(&format!("${}", role.env_var())),
                "{role:?}"
            );
        }
    }
}
