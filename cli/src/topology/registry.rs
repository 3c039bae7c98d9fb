//! The running topology's record, `ports.json`: one copy in memory that every supervisor
//! updates (a member's pid when it is restarted), written through to the file after each
//! change so that tools and tests always find the live processes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use hotpath_localstack::{Member, Ports};

#[derive(Clone)]
pub struct Registry {
    inner: Arc<Mutex<Ports>>,
    data_dir: PathBuf,
}

impl Registry {
    /// Takes `ports` as the record of the stack in `data_dir` and writes it.
    pub fn new(data_dir: &Path, ports: Ports) -> anyhow::Result<Registry> {
        ports.write(data_dir)?;
        Ok(Registry {
            inner: Arc::new(Mutex::new(ports)),
            data_dir: data_dir.to_path_buf(),
        })
    }

    /// A copy of the record.
    pub fn snapshot(&self) -> Ports {
        self.lock().clone()
    }

    /// Records that `name` now runs as `pid` (`None`: it is not running).
    pub fn set_pid(&self, name: &str, pid: Option<u32>) {
        self.update(name, |member| member.pid = pid);
    }

    /// Records that `name` was restarted and now runs as `pid`.
    pub fn restarted(&self, name: &str, pid: Option<u32>) {
        self.update(name, |member| {
            member.pid = pid;
            member.restarts += 1;
        });
    }

    fn update(&self, name: &str, change: impl FnOnce(&mut Member)) {
        let mut ports = self.lock();
        let Some(member) = ports.member_mut(name) else {
            tracing::warn!(member = name, "no such member in ports.json");
            return;
        };
        change(member);
        if let Err(error) = ports.write(&self.data_dir) {
            tracing::warn!(%error, "could not update ports.json");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ports> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
