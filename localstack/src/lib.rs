//! Starts and stops a real nats-server (with JetStream) and a real Postgres as child
//! processes, for `hotpath up` (a persistent directory that survives restarts) and for
//! integration tests (temporary directories, free ports, servers killed and restarted to
//! inject faults).
//!
//! Two rules shape this crate:
//!
//! * The servers must never outlive their owner, even when it is killed with SIGKILL or a
//!   test binary exits without running destructors. Children get `PR_SET_PDEATHSIG(SIGKILL)`,
//!   and since that signal is tied to the forking *thread*, all forks happen on one
//!   long-lived thread (module `spawner`). Dropping a server handle also SIGKILLs and reaps it.
//! * CI runs as root and Postgres refuses to: Postgres then runs as the `postgres` system
//!   user, switched to in the forked child (module `postgres`).
//!
//! Besides the development nats-server that lets anyone in ([`NatsServer`]), a
//! [`NatsCluster`] runs the production configuration of `nats/cluster/` (one node or a
//! three-node JetStream cluster, with the least-privilege accounts and fresh nkey users).
//!
//! Servers listen on 127.0.0.1 only, and log (stdout and stderr, appended) into their
//! directory.
//!
//! A persistent stack records the ports it chose in its directory ([`Ports`]), which is how
//! the tools that talk to it find it. [`OwnedChild`] starts any other program under the same
//! rule (`hotpath up` runs each role as one).

// Small functions read as their steps (see clippy.toml).
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

mod child;
mod cluster;
mod nats;
mod ports;
mod postgres;
mod process;
mod spawner;

pub use child::OwnedChild;
pub use cluster::{Health, NatsCluster, NatsNode, NatsRole, NodePorts};
pub use nats::{NatsOptions, NatsServer, find_nats_server, nats_server_version};
pub use ports::{Member, Mode, Ports};
pub use postgres::Postgres;

/// A port that was free on 127.0.0.1 a moment ago (bound to port 0, then released).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()?
        .port())
}
