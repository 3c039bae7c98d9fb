//! What the topology is made of: how many of each member, where each listens, and the
//! environment that makes a role process that member.
//!
//! Addresses stay the same from run to run where they can: gateway 0 listens where `--listen`
//! says (8080 by default) and gateway i on the port recorded for it last time, else on
//! `--listen`'s port + i, else on a free one; the consumers' and push workers' metrics
//! endpoints on their recorded ports, else on free ones. All on loopback unless `--listen`
//! names another address for the gateways.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::Path;

use hotpath_core::config::Config;
use hotpath_localstack::{Member, Ports, free_port};

use super::nats::LocalNats;
use super::role::{Role, RoleSpec};
use crate::up::{Topology, port_is_free, reuse_or_free};

/// How many of each member.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub nats_nodes: u32,
    pub gateways: u32,
    pub consumer_replicas: u32,
}

impl Shape {
    /// The counts asked for, 1 for each not given.
    pub fn of(topology: Topology) -> anyhow::Result<Shape> {
        let shape = Shape {
            nats_nodes: topology.nats_nodes.unwrap_or(1),
            gateways: topology.gateways.unwrap_or(1),
            consumer_replicas: topology.consumer_replicas.unwrap_or(1),
        };
        anyhow::ensure!(
            shape.gateways >= 1 && shape.consumer_replicas >= 1,
            "--gateways and --consumer-replicas must be at least 1"
        );
        Ok(shape)
    }
}

/// The role processes, in start order: gateways, consumer replicas, push workers.
pub fn role_specs(
    data_dir: &Path,
    config: &Config,
    shape: Shape,
    recorded: Option<&Ports>,
    forwarded: &[(String, OsString)],
    nats: &LocalNats,
) -> anyhow::Result<Vec<RoleSpec>> {
    let logs = data_dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let common = common_env(config, forwarded);
    let spec = |name: String, role: Role, listen: SocketAddr, extra: Vec<(String, OsString)>| {
        let mut env = common.clone();
        env.extend(extra);
        if let Some(creds) = nats.creds(role) {
            env.push(("HOTPATH_NATS_CREDS".to_owned(), creds.into()));
        }
        RoleSpec {
            log: logs.join(format!("{name}.log")),
            name,
            role,
            listen,
            env,
            niceness: match role {
                Role::Gateway => 0,
                Role::Consumers | Role::Push => config.delivery_niceness,
            },
        }
    };
    let recorded_port = |members: Option<&Vec<Member>>, i: usize| {
        members.and_then(|m| m.get(i)).map(|m| m.listen.port())
    };
    let mut specs = Vec::new();
    for i in 0..shape.gateways as usize {
        let listen = gateway_listen(
            config.listen,
            i,
            recorded_port(recorded.map(|p| &p.gateways), i),
        )?;
        let env = vec![var("HOTPATH_LISTEN", listen.to_string())];
        specs.push(spec(format!("gateway-{i}"), Role::Gateway, listen, env));
    }
    let replicas = shape.consumer_replicas;
    for k in 0..replicas as usize {
        let port = reuse_or_free(recorded_port(recorded.map(|p| &p.consumers), k))?;
        let listen = SocketAddr::from(([127, 0, 0, 1], port));
        let env = vec![
            var("HOTPATH_CONSUMER_REPLICA", k.to_string()),
            var("HOTPATH_CONSUMER_REPLICAS", replicas.to_string()),
            var("HOTPATH_METRICS_LISTEN", listen.to_string()),
        ];
        specs.push(spec(format!("consumers-{k}"), Role::Consumers, listen, env));
    }
    let port = reuse_or_free(recorded_port(recorded.map(|p| &p.push), 0))?;
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    let env = vec![var("HOTPATH_METRICS_LISTEN", listen.to_string())];
    specs.push(spec("push".to_owned(), Role::Push, listen, env));
    Ok(specs)
}

/// What every role gets: the flags `hotpath up` was given, then the local servers, the
/// streams' replicas and the token secret `hotpath up` chose (and, added per role, the role's
/// NATS user).
fn common_env(config: &Config, forwarded: &[(String, OsString)]) -> Vec<(String, OsString)> {
    let mut env = forwarded.to_vec();
    env.push(var("HOTPATH_NATS_URL", config.nats_url.clone()));
    env.push(var(
        "HOTPATH_NATS_REPLICAS",
        config.nats_replicas.to_string(),
    ));
    env.push(var("HOTPATH_DATABASE_URL", config.database_url.clone()));
    if let Some(file) = &config.jwt_secret_file {
        env.push(("HOTPATH_JWT_SECRET_FILE".to_owned(), file.clone().into()));
    }
    env
}

fn var(key: &str, value: String) -> (String, OsString) {
    (key.to_owned(), value.into())
}

/// Gateway `i`'s address: `--listen` for the first (a free port if it says 0), then the
/// recorded port, `--listen`'s port + i, or a free port, whichever is free first.
fn gateway_listen(
    listen: SocketAddr,
    i: usize,
    recorded: Option<u16>,
) -> anyhow::Result<SocketAddr> {
    let port = if i == 0 && listen.port() != 0 {
        listen.port()
    } else {
        let next = u16::try_from(usize::from(listen.port()) + i)
            .ok()
            .filter(|_| listen.port() != 0);
        match recorded.or(next).filter(|port| port_is_free(*port)) {
            Some(port) => port,
            None => next
                .filter(|port| port_is_free(*port))
                .map_or_else(free_port, Ok)?,
        }
    };
    Ok(SocketAddr::new(listen.ip(), port))
}

/// The record of a role process for `ports.json` (its pid comes once it runs).
pub fn role_member(spec: &RoleSpec) -> Member {
    Member {
        name: spec.name.clone(),
        listen: spec.listen,
        url: format!("http://{}", spec.listen),
        pid: None,
        restarts: 0,
        log: spec.log.clone(),
        data_dir: None,
        cluster_listen: None,
        monitor_listen: None,
    }
}
