//! The supervisor: one task per member of the topology (a NATS node, Postgres, a role
//! process) that restarts it when it ends without being asked to, the way Kubernetes
//! restarts a pod's container.
//!
//! * **Restarts back off**: 250 ms after the first unexpected end, doubling to at most 10 s
//!   while the member keeps dying; a member that ran for 30 s before it ended counts as
//!   healthy again and is restarted after 250 ms. Each restart is logged (and printed) with
//!   the exit status, the new pid and the count, and the new pid is written to `ports.json`.
//! * **Held members are left alone**: while `<data-dir>/hold/<name>` exists
//!   ([`Ports::hold_file`]), a member that ended stays down. That is how a fault drill stops
//!   Postgres for a while without the supervisor fighting it; removing the file restarts it.
//! * **Stopping is the owner's call**: when its token is cancelled, the task stops its member
//!   gracefully (SIGTERM and a grace period for a role, each server's own shutdown) and
//!   returns. The owner cancels the groups in the order that drains the system.

use std::path::PathBuf;
use std::time::Duration;

use hotpath_localstack::{NatsNode, NatsServer, OwnedChild, Ports, Postgres};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::registry::Registry;
use super::role::RoleSpec;

/// How long a role has to drain after SIGTERM before it is killed.
const ROLE_GRACE: Duration = Duration::from_secs(30);
/// How often a member is checked for having ended.
const POLL: Duration = Duration::from_millis(100);

/// A supervised process and how to start it again.
pub enum Process {
    Role { spec: RoleSpec, child: OwnedChild },
    Nats { name: String, server: NatsServer },
    NatsNode { name: String, node: NatsNode },
    Postgres(Postgres),
}

impl Process {
    pub fn name(&self) -> &str {
        match self {
            Process::Role { spec, .. } => &spec.name,
            Process::Nats { name, .. } | Process::NatsNode { name, .. } => name,
            Process::Postgres(_) => "postgres",
        }
    }

    pub fn pid(&self) -> Option<u32> {
        match self {
            Process::Role { child, .. } => Some(child.pid()),
            Process::Nats { server, .. } => server.pid(),
            Process::NatsNode { node, .. } => node.pid(),
            Process::Postgres(postgres) => postgres.pid(),
        }
    }

    /// How it ended, once it is no longer running; `None` while it runs.
    fn ended(&mut self) -> Option<String> {
        let status = match self {
            Process::Role { child, .. } => child.try_exit(),
            Process::Nats { server, .. } if server.pid().is_none() => return Some(not_running()),
            Process::Nats { server, .. } => server.try_exit(),
            Process::NatsNode { node, .. } if node.pid().is_none() => return Some(not_running()),
            Process::NatsNode { node, .. } => node.try_exit(),
            Process::Postgres(postgres) if postgres.pid().is_none() => {
                return Some(not_running());
            }
            Process::Postgres(postgres) => postgres.try_exit(),
        };
        match status {
            Ok(status) => status.map(|status| status.to_string()),
            Err(error) => Some(format!("{error:#}")),
        }
    }

    /// Starts it again (a server: on the same port and data, waiting until it is ready).
    async fn restart(&mut self) -> anyhow::Result<()> {
        match self {
            Process::Role { spec, child } => {
                *child = spec.spawn().await?;
                Ok(())
            }
            Process::Nats { server, .. } => server.restart().await,
            Process::NatsNode { node, .. } => node.restart().await,
            Process::Postgres(postgres) => postgres.restart().await,
        }
    }

    /// Stops it gracefully (a role drains on SIGTERM).
    async fn stop(&mut self) {
        let name = self.name().to_owned();
        let stopped = match self {
            Process::Role { child, .. } => match child.terminate(ROLE_GRACE).await {
                Ok((_, true)) => Ok(()),
                Ok((_, false)) => {
                    tracing::warn!(member = %name, "did not stop within {ROLE_GRACE:?}; killed it");
                    Ok(())
                }
                Err(error) => Err(error),
            },
            Process::Nats { server, .. } => server.stop().await,
            Process::NatsNode { node, .. } => node.stop().await,
            Process::Postgres(postgres) => postgres.stop().await,
        };
        if let Err(error) = stopped {
            tracing::warn!(member = %name, error = format!("{error:#}"), "stopping");
        }
    }
}

fn not_running() -> String {
    "not running".to_owned()
}

/// Supervises `process` on a task until `stop` is cancelled, then stops it.
pub fn supervise(
    process: Process,
    registry: Registry,
    data_dir: PathBuf,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let hold = Ports::hold_file(&data_dir, process.name());
        let mut supervised = Supervised {
            process,
            registry,
            hold,
            stop,
            backoff: Backoff::default(),
        };
        supervised.run().await;
    })
}

struct Supervised {
    process: Process,
    registry: Registry,
    hold: PathBuf,
    stop: CancellationToken,
    backoff: Backoff,
}

impl Supervised {
    async fn run(&mut self) {
        let mut started = Instant::now();
        loop {
            let Some(how) = self.until_ended().await else {
                break;
            };
            let name = self.process.name().to_owned();
            self.registry.set_pid(&name, None);
            tracing::warn!(member = %name, exit = %how, "ended unexpectedly");
            if !self.wait_while_held().await {
                break;
            }
            let delay = self.backoff.delay(started.elapsed());
            if !self.restart_after(delay).await {
                break;
            }
            started = Instant::now();
            let pid = self.process.pid();
            self.registry.restarted(&name, pid);
            let restarts = self.restart_count(&name);
            println!("{name} ended ({how}); restarted as pid {pid:?} (restart {restarts})");
            tracing::warn!(member = %name, exit = %how, pid, restarts, "restarted");
        }
        self.process.stop().await;
        let name = self.process.name().to_owned();
        self.registry.set_pid(&name, None);
    }

    /// Waits until the process ends (`Some(how)`) or the owner stops it (`None`).
    async fn until_ended(&mut self) -> Option<String> {
        loop {
            if let Some(how) = self.process.ended() {
                return Some(how);
            }
            tokio::select! {
                () = self.stop.cancelled() => return None,
                () = tokio::time::sleep(POLL) => {}
            }
        }
    }

    /// While the hold file exists, waits; false if the owner stopped us meanwhile.
    async fn wait_while_held(&self) -> bool {
        let name = self.process.name();
        let mut said = false;
        while self.hold.exists() {
            if !said {
                tracing::info!(member = %name, hold = %self.hold.display(), "held: not restarting until the file is removed");
                said = true;
            }
            tokio::select! {
                () = self.stop.cancelled() => return false,
                () = tokio::time::sleep(POLL) => {}
            }
        }
        if said {
            tracing::info!(member = %name, "released: restarting");
        }
        true
    }

    /// Waits `delay`, then restarts, retrying with backoff until it works; false if the
    /// owner stopped us meanwhile.
    async fn restart_after(&mut self, mut delay: Duration) -> bool {
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return false,
                () = tokio::time::sleep(delay) => {}
            }
            match self.process.restart().await {
                Ok(()) => return true,
                Err(error) => {
                    delay = self.backoff.delay(Duration::ZERO);
                    tracing::error!(
                        member = %self.process.name(),
                        error = format!("{error:#}"),
                        retry_in_ms = delay.as_millis() as u64,
                        "restart failed"
                    );
                }
            }
        }
    }

    fn restart_count(&self, name: &str) -> u32 {
        self.registry
            .snapshot()
            .members()
            .find(|member| member.name == name)
            .map_or(0, |member| member.restarts)
    }
}

/// The wait before a restart: doubling while a member keeps dying, back to the first step
/// once it ran long enough to count as healthy.
struct Backoff {
    next: Duration,
}

const FIRST_DELAY: Duration = Duration::from_millis(250);
const MAX_DELAY: Duration = Duration::from_secs(10);
/// A member that ran this long before it ended is restarted as if for the first time.
const HEALTHY_RUN: Duration = Duration::from_secs(30);

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff { next: FIRST_DELAY }
    }
}

impl Backoff {
    /// The delay before the next restart of a member that ran for `ran_for`.
    fn delay(&mut self, ran_for: Duration) -> Duration {
        if ran_for >= HEALTHY_RUN {
            self.next = FIRST_DELAY;
        }
        let delay = self.next;
        self.next = (self.next * 2).min(MAX_DELAY);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_while_a_member_keeps_dying_and_reset_once_it_ran() {
        let mut backoff = Backoff::default();
        let quick = Duration::from_secs(1);
        let delays: Vec<u64> = (0..8)
            .map(|_| backoff.delay(quick).as_millis() as u64)
            .collect();
        assert_eq!(delays, [250, 500, 1000, 2000, 4000, 8000, 10_000, 10_000]);
        assert_eq!(backoff.delay(HEALTHY_RUN), FIRST_DELAY);
        assert_eq!(backoff.delay(quick), FIRST_DELAY * 2);
    }
}
