//! Any program started the way the servers are: by the spawner thread, in a process group of
//! its own, with `PR_SET_PDEATHSIG(SIGKILL)`, so that it dies with its owner even when the
//! owner is killed with SIGKILL.
//!
//! `hotpath up` runs each of Hotpath's roles (gateways, consumer replicas, push workers) as
//! such a child of itself when it runs the production topology: a `kill -9` of `hotpath up`
//! then leaves no role behind, exactly as it leaves no server behind. The process group
//! keeps a Ctrl-C in the terminal from reaching the children: the owner signals them itself,
//! in the order that drains the system (see `hotpath up`).

use std::process::{Child, Command, ExitStatus};
use std::time::Duration;

use anyhow::{Context as _, Result};

use crate::process;
use crate::spawner;

/// A child process that dies with this process. Dropping the handle SIGKILLs and reaps it.
#[derive(Debug)]
pub struct OwnedChild {
    child: Child,
    exited: Option<ExitStatus>,
}

impl OwnedChild {
    /// Spawns `cmd` (stdio as the caller set it) on the spawner thread.
    pub async fn spawn(cmd: Command) -> Result<OwnedChild> {
        let program = cmd.get_program().to_string_lossy().into_owned();
        let child = spawner::spawn(cmd, None)
            .await
            .with_context(|| format!("spawning {program}"))?;
        Ok(OwnedChild {
            child,
            exited: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has ended (it is reaped then), `None` while it runs.
    pub fn try_exit(&mut self) -> Result<Option<ExitStatus>> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().context("waiting for a child")?;
        }
        Ok(self.exited)
    }

    /// Waits until the process ends, however long that takes.
    pub async fn exited(&mut self) -> Result<ExitStatus> {
        loop {
            if let Some(status) = self.try_exit()? {
                return Ok(status);
            }
            tokio::time::sleep(process::POLL).await;
        }
    }

    /// Sends SIGTERM (every Hotpath role drains on it), waits up to `grace`, then SIGKILLs.
    /// Returns the exit status and whether the process ended within the grace period.
    pub async fn terminate(&mut self, grace: Duration) -> Result<(ExitStatus, bool)> {
        if let Some(status) = self.try_exit()? {
            return Ok((status, true));
        }
        let outcome = process::terminate(&mut self.child, libc::SIGTERM, grace).await?;
        self.exited = Some(outcome.0);
        Ok(outcome)
    }
}

impl Drop for OwnedChild {
    fn drop(&mut self) {
        if self.exited.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            process::kill_blocking(&mut self.child);
        }
    }
}
