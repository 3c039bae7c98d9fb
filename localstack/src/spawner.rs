//! The one thread that forks every server process.
//!
//! Servers are started with `prctl(PR_SET_PDEATHSIG, SIGKILL)` so that they die with their
//! owner even when the owner is killed with SIGKILL, or when a test binary exits without
//! running destructors (handles kept in statics are never dropped). The catch is that the
//! kernel sends the death signal when the *thread* that forked the child exits, not the
//! process. Tokio worker and blocking-pool threads come and go, and every `#[tokio::test]`
//! runs on its own short-lived runtime thread, so a server spawned from one of those would be
//! killed at a random later moment. Every fork therefore happens on a single dedicated thread
//! that lives as long as the process: it blocks on a channel whose sender sits in a static
//! that is never dropped, so the thread never returns.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::{Mutex, PoisonError};

use tokio::sync::oneshot;

/// The user a child switches to before `exec` (used to run Postgres as `postgres` when we
/// are root, because Postgres refuses to run as root).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Credentials {
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
}

struct Request {
    cmd: Command,
    reply: oneshot::Sender<io::Result<Child>>,
}

static SPAWNER: Mutex<Option<mpsc::Sender<Request>>> = Mutex::new(None);

/// Spawns `cmd` on the spawner thread, in its own process group, with a parent-death signal,
/// optionally as another user.
///
/// The process group keeps a Ctrl-C in the owner's terminal from reaching the servers
/// directly: the owner decides the shutdown order.
pub(crate) async fn spawn(mut cmd: Command, creds: Option<Credentials>) -> io::Result<Child> {
    // Pids are at most 2^22 on Linux (PID_MAX_LIMIT), so they always fit in pid_t.
    let parent = std::process::id() as libc::pid_t;
    cmd.process_group(0);
    // SAFETY: `child_setup` only makes async-signal-safe system calls and does not allocate,
    // which is what is allowed between fork and exec.
    unsafe {
        cmd.pre_exec(move || child_setup(parent, creds));
    }
    let (reply, response) = oneshot::channel();
    sender()?
        .send(Request { cmd, reply })
        .map_err(|_| io::Error::other("the localstack spawner thread is gone"))?;
    response
        .await
        .map_err(|_| io::Error::other("the localstack spawner thread dropped a request"))?
}

/// Runs in the child between fork and exec.
fn child_setup(parent: libc::pid_t, creds: Option<Credentials>) -> io::Result<()> {
    // SAFETY (all blocks below): plain system calls on integers and a pointer to a local.
    if let Some(Credentials { uid, gid }) = creds {
        // Drop root's supplementary groups, then the group, then the user (in this order:
        // after setuid we would no longer be allowed to change groups).
        if unsafe { libc::setgroups(1, &gid) } != 0 {
            return Err(io::Error::last_os_error());
        }
        if unsafe { libc::setgid(gid) } != 0 {
            return Err(io::Error::last_os_error());
        }
        if unsafe { libc::setuid(uid) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // Must come after the credential change, which clears the parent-death signal.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // If the owner died between fork and prctl, the signal was never armed: we have been
    // reparented already, so give up instead of running unowned.
    if unsafe { libc::getppid() } != parent {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    Ok(())
}

fn sender() -> io::Result<mpsc::Sender<Request>> {
    let mut slot = SPAWNER.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(tx) = slot.as_ref() {
        return Ok(tx.clone());
    }
    let (tx, rx) = mpsc::channel::<Request>();
    std::thread::Builder::new()
        .name("hotpath-localstack-spawner".into())
        .spawn(move || {
            for Request { mut cmd, reply } in rx {
                if let Err(Ok(mut orphan)) = reply.send(cmd.spawn()) {
                    // The caller gave up waiting (its future was dropped); nobody owns this
                    // child, so do not let it run.
                    let _ = orphan.kill();
                    let _ = orphan.wait();
                }
            }
        })?;
    *slot = Some(tx.clone());
    Ok(tx)
}
