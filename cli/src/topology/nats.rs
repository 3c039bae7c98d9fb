//! The topology's NATS: one development nats-server (`--nats-nodes 1`, the default), or the
//! production configuration of `nats/cluster/` (`--nats-nodes 3`): clustered nodes with the
//! least-privilege accounts, each role connecting as its own nkey user.
//!
//! One node keeps the data where one-process `hotpath up` keeps it (`<data-dir>/nats`), so
//! switching between the two modes keeps the streams. A cluster keeps its nodes' stores in
//! `<data-dir>/nats-cluster/<node>/` and its users' seeds in `<data-dir>/nats-cluster/creds/`
//! (fresh on every start). Its streams and buckets get `min(nodes, 3)` replicas: on three
//! nodes an acknowledged message is on two of them before the 202, and the stream carries on
//! when any one node dies. (On two nodes, R2 stops accepting while either is down: use three.)

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use hotpath_core::config::Config;
use hotpath_localstack::{Member, NatsCluster, NatsNode, NatsRole, NatsServer, NodePorts, Ports};

use super::role::Role;
use super::supervisor::Process;
use crate::up::{self, port_is_free};

/// The most replicas a stream gets here, whatever the node count.
const MAX_REPLICAS: usize = 3;

pub enum LocalNats {
    Server(NatsServer),
    Cluster(NatsCluster),
}

impl LocalNats {
    /// Starts `nodes` nodes: the development server on `ports.nats`, or a cluster on the ports
    /// its nodes had last time (`recorded`) if they are all still free, else on free ones.
    pub async fn start(
        data_dir: &Path,
        nodes: u32,
        ports: &Ports,
        recorded: Option<&Ports>,
        config: &Config,
    ) -> anyhow::Result<LocalNats> {
        if nodes <= 1 {
            println!(
                "starting nats-server on 127.0.0.1:{} (data in {})",
                ports.nats,
                data_dir.join("nats").display()
            );
            let server = NatsServer::start_with(
                &data_dir.join("nats"),
                ports.nats,
                up::nats_options(config),
            )
            .await?;
            return Ok(LocalNats::Server(server));
        }
        let dir = data_dir.join("nats-cluster");
        let node_ports = match recorded.and_then(|r| recorded_node_ports(r, nodes as usize)) {
            Some(node_ports) => node_ports,
            None => (0..nodes)
                .map(|_| NodePorts::free())
                .collect::<anyhow::Result<Vec<_>>>()?,
        };
        println!(
            "starting a {nodes}-node NATS cluster with accounts (data in {})",
            dir.display()
        );
        Ok(LocalNats::Cluster(
            NatsCluster::start_on(&dir, node_ports).await?,
        ))
    }

    /// What `HOTPATH_NATS_URL` takes: every node's client URL.
    pub fn url(&self) -> String {
        match self {
            LocalNats::Server(server) => server.url(),
            LocalNats::Cluster(cluster) => cluster.urls(),
        }
    }

    /// The first node's client port (`ports.json`'s `nats`).
    pub fn port(&self) -> u16 {
        match self {
            LocalNats::Server(server) => server.port(),
            LocalNats::Cluster(cluster) => cluster.node(0).ports().client,
        }
    }

    /// JetStream replicas of the streams and buckets.
    pub fn replicas(&self) -> usize {
        match self {
            LocalNats::Server(_) => 1,
            LocalNats::Cluster(cluster) => cluster.nodes().len().min(MAX_REPLICAS),
        }
    }

    /// The seed file `role` connects with (`None`: the development server needs none).
    pub fn creds(&self, role: Role) -> Option<PathBuf> {
        let user = match role {
            Role::Gateway => NatsRole::Gateway,
            Role::Consumers => NatsRole::Consumers,
            Role::Push => NatsRole::Push,
        };
        self.cluster().map(|cluster| cluster.creds(user))
    }

    /// The operator's seed file: set-up and the operator tools.
    pub fn operator_creds(&self) -> Option<PathBuf> {
        self.cluster()
            .map(|cluster| cluster.creds(NatsRole::Operator))
    }

    /// Where the users' seeds are.
    pub fn creds_dir(&self) -> Option<PathBuf> {
        self.cluster().map(|cluster| cluster.dir().join("creds"))
    }

    fn cluster(&self) -> Option<&NatsCluster> {
        match self {
            LocalNats::Server(_) => None,
            LocalNats::Cluster(cluster) => Some(cluster),
        }
    }

    /// The nodes as `ports.json` records them.
    pub fn members(&self, data_dir: &Path) -> Vec<Member> {
        match self {
            LocalNats::Server(server) => vec![server_member(server, data_dir)],
            LocalNats::Cluster(cluster) => cluster
                .nodes()
                .iter()
                .enumerate()
                .map(|(i, node)| node_member(i, node))
                .collect(),
        }
    }

    /// The nodes, each to be supervised on its own, named as in [`LocalNats::members`].
    pub fn into_processes(self) -> Vec<Process> {
        match self {
            LocalNats::Server(server) => vec![Process::Nats {
                name: "nats-0".to_owned(),
                server,
            }],
            LocalNats::Cluster(cluster) => cluster
                .into_nodes()
                .into_iter()
                .enumerate()
                .map(|(i, node)| Process::NatsNode {
                    name: format!("nats-{i}"),
                    node,
                })
                .collect(),
        }
    }
}

/// The ports the cluster's nodes had last time, if there were `nodes` of them and they are
/// all free.
fn recorded_node_ports(recorded: &Ports, nodes: usize) -> Option<Vec<NodePorts>> {
    let ports: Vec<NodePorts> = recorded
        .nats_nodes
        .iter()
        .map(|member| {
            Some(NodePorts {
                client: member.listen.port(),
                cluster: member.cluster_listen?.port(),
                monitor: member.monitor_listen?.port(),
            })
        })
        .collect::<Option<_>>()?;
    let free = ports.iter().all(|p| {
        [p.client, p.cluster, p.monitor]
            .into_iter()
            .all(port_is_free)
    });
    (ports.len() == nodes && free).then_some(ports)
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn server_member(server: &NatsServer, data_dir: &Path) -> Member {
    let dir = data_dir.join("nats");
    Member {
        name: "nats-0".to_owned(),
        listen: loopback(server.port()),
        url: server.url(),
        pid: server.pid(),
        restarts: 0,
        log: dir.join("nats.log"),
        data_dir: Some(dir.join("jetstream")),
        cluster_listen: None,
        monitor_listen: None,
    }
}

fn node_member(index: usize, node: &NatsNode) -> Member {
    let ports = node.ports();
    Member {
        name: format!("nats-{index}"),
        listen: loopback(ports.client),
        url: node.url(),
        pid: node.pid(),
        restarts: 0,
        log: node.log_path(),
        data_dir: Some(node.dir().join("jetstream")),
        cluster_listen: Some(loopback(ports.cluster)),
        monitor_listen: Some(loopback(ports.monitor)),
    }
}
