//! Where a persistent local stack listens, and which processes it is made of, recorded in its
//! directory.
//!
//! `hotpath up` picks free ports on its first run and records them in `ports.json`, so the
//! URLs stay the same from one run to the next. The tools that talk to a running stack
//! (`hotpath dlq`, `hotpath policy`, `hotpath-bench`) read the same file to find its servers
//! without being told. The file's name and shape live here, next to the servers it describes,
//! so that the one writer and its readers in other crates cannot drift apart.
//!
//! `nats` and `postgres` (the ports) are all a stack in one process records, and all an older
//! reader knows. When `hotpath up` runs the production topology (each role its own process,
//! [`Mode::Processes`]) it also records every member: NATS nodes, Postgres, gateways,
//! consumer replicas and push workers, each with its address, its current pid (rewritten
//! when the supervisor restarts it) and its log, so tools and tests can find and kill them.
//! The fields it adds are optional, so a file written by an older `hotpath up` still reads.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// Where a local stack's servers listen (on 127.0.0.1), and, in process mode, every process
/// it runs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Ports {
    /// The (first) NATS node's client port.
    pub nats: u16,
    pub postgres: u16,
    /// How the roles run.
    #[serde(default)]
    pub mode: Mode,
    /// The `hotpath up` process that owns everything below.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub up_pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nats_nodes: Vec<Member>,
    /// A NATS with accounts (`--nats-nodes` above 1): the directory of its users' nkey seeds,
    /// `<role>.nk`; the operator tools take `operator.nk` as `HOTPATH_NATS_CREDS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats_creds_dir: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres_server: Option<Member>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<Member>,
    /// Consumer replicas, in replica order (`consumers-<k>`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub consumers: Vec<Member>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub push: Vec<Member>,
}

/// How `hotpath up` runs the roles.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Gateway, consumers and push workers inside the `hotpath up` process.
    #[default]
    InProcess,
    /// Each role its own child process, supervised by `hotpath up`.
    Processes,
}

/// One process of the stack.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Member {
    /// `nats-<i>`, `postgres`, `gateway-<i>`, `consumers-<k>`, `push`.
    pub name: String,
    /// Where it listens: a NATS node's client port, Postgres's port, a gateway's API, the
    /// metrics endpoint (`/metrics`, `/healthz`, `/readyz`) of a consumer or push process.
    pub listen: SocketAddr,
    /// The same as a URL a client uses (`http://…`, `nats://…`, `postgres://…`).
    pub url: String,
    /// The running process; `None` while it is being (re)started, or held (see
    /// [`Ports::hold_file`]).
    pub pid: Option<u32>,
    /// How often the supervisor restarted it since `hotpath up` started.
    #[serde(default)]
    pub restarts: u32,
    /// Its log file (stdout and stderr).
    pub log: PathBuf,
    /// Its data directory: a NATS node's store, Postgres's cluster (`pg_ctl -D` takes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// A clustered NATS node's route port (where the other nodes connect).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_listen: Option<SocketAddr>,
    /// A NATS node's monitoring endpoint (`/healthz`, `/varz`, `/jsz`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitor_listen: Option<SocketAddr>,
}

impl Ports {
    /// The ports recorded in `data_dir`.
    pub fn read(data_dir: &Path) -> anyhow::Result<Ports> {
        let path = data_dir.join(FILE);
        let bytes = std::fs::read(&path).with_context(|| {
            format!(
                "reading {} (start the system with `hotpath up --data-dir {}`)",
                path.display(),
                data_dir.display()
            )
        })?;
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
    }

    /// Records these ports in `data_dir` for the next run and for the tools. The file is
    /// replaced in one rename, so a reader never sees half of it.
    pub fn write(&self, data_dir: &Path) -> anyhow::Result<()> {
        let path = data_dir.join(FILE);
        let scratch = data_dir.join(format!(".{FILE}.tmp"));
        std::fs::write(&scratch, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", scratch.display()))?;
        std::fs::rename(&scratch, &path).with_context(|| format!("writing {}", path.display()))
    }

    /// The gateways' base URLs (`http://127.0.0.1:<port>`), in order.
    pub fn gateway_urls(&self) -> Vec<String> {
        self.gateways.iter().map(|g| g.url.clone()).collect()
    }

    /// Every member, servers first.
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.nats_nodes
            .iter()
            .chain(&self.postgres_server)
            .chain(&self.gateways)
            .chain(&self.consumers)
            .chain(&self.push)
    }

    /// The member called `name`, for updating its pid.
    pub fn member_mut(&mut self, name: &str) -> Option<&mut Member> {
        self.nats_nodes
            .iter_mut()
            .chain(&mut self.postgres_server)
            .chain(&mut self.gateways)
            .chain(&mut self.consumers)
            .chain(&mut self.push)
            .find(|member| member.name == name)
    }

    /// While this file exists, the supervisor of `hotpath up` does not restart the member
    /// `name` when it ends: the way to stop one on purpose (a fault drill stops Postgres for
    /// a while) without the supervisor fighting it. Removing the file lets it restart.
    pub fn hold_file(data_dir: &Path, name: &str) -> PathBuf {
        data_dir.join("hold").join(name)
    }
}

/// The file in the data directory.
const FILE: &str = "ports.json";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_from_a_stack_in_one_process_still_reads() {
        let ports: Ports = serde_json::from_str(r#"{"nats": 4222, "postgres": 5432}"#).unwrap();
        assert_eq!((ports.nats, ports.postgres), (4222, 5432));
        assert_eq!(ports.mode, Mode::InProcess);
        assert!(ports.members().next().is_none());
    }

    #[test]
    fn members_are_found_by_name() {
        let member = |name: &str| Member {
            name: name.to_owned(),
            listen: "127.0.0.1:8080".parse().unwrap(),
            url: "http://127.0.0.1:8080".to_owned(),
            pid: Some(1),
            restarts: 0,
            log: PathBuf::from("x.log"),
            data_dir: None,
            cluster_listen: None,
            monitor_listen: None,
        };
        let mut ports = Ports {
            mode: Mode::Processes,
            gateways: vec![member("gateway-0"), member("gateway-1")],
            consumers: vec![member("consumers-0")],
            ..Ports::default()
        };
        ports.member_mut("gateway-1").unwrap().pid = Some(7);
        let text = serde_json::to_string(&ports).unwrap();
        let read: Ports = serde_json::from_str(&text).unwrap();
        assert_eq!(read.gateways[1].pid, Some(7));
        assert_eq!(read.members().count(), 3);
        assert!(text.contains(r#""mode":"processes""#), "{text}");
    }
}
