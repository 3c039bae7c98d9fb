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
//! Servers listen on 127.0.0.1 only, and log (stdout and stderr, appended) into their
//! directory.

mod nats;
mod postgres;
mod process;
mod spawner;

pub use nats::{NatsOptions, NatsServer, find_nats_server, nats_server_version};
pub use postgres::Postgres;

/// A port that was free on 127.0.0.1 a moment ago (bound to port 0, then released).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()?
        .port())
}
