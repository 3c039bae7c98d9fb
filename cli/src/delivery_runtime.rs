//! The delivery side's own runtime in a process that also serves the gateway (`hotpath up`):
//! docs/adr/0013-the-delivery-side-yields.md.

use std::future::Future;

use anyhow::Context as _;
use tokio::task::JoinHandle;

/// The runtime of the delivery side (consumers and push workers) in a process that also
/// serves the gateway: its own worker threads, run lower than the gateway's, so the
/// request path never waits behind a batch being built or a recipient list being walked on
/// a shared worker. At the default niceness (10, `HOTPATH_DELIVERY_NICENESS`) the scheduler gives
/// a busy gateway thread about ten times the CPU of a busy delivery thread: under a spike the
/// gateway keeps answering and the delivery side falls behind instead (the backlog bound is
/// what stops it falling too far); when the gateway is idle the delivery side has the cores to
/// itself. See docs/adr/0013-the-delivery-side-yields.md.
pub struct DeliveryRuntime {
    runtime: Option<tokio::runtime::Runtime>,
}

impl DeliveryRuntime {
    /// Starts the runtime: as many worker threads as the machine has cores, each lowered by
    /// `niceness` as it starts (0: the gateway's priority).
    pub fn start(niceness: i32) -> anyhow::Result<DeliveryRuntime> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .thread_name("hotpath-delivery")
            .on_thread_start(move || lower_this_thread(niceness))
            .enable_all()
            .build()
            .context("starting the delivery side's runtime")?;
        Ok(DeliveryRuntime {
            runtime: Some(runtime),
        })
    }

    /// Runs `role` (one of the `spawn_*` functions of this module) on the delivery runtime, so
    /// that the role's tasks, its NATS connection and its Postgres pool all live there, and
    /// returns the role's task.
    pub async fn spawn<F>(&self, role: F) -> anyhow::Result<JoinHandle<anyhow::Result<()>>>
    where
        F: Future<Output = anyhow::Result<JoinHandle<anyhow::Result<()>>>> + Send + 'static,
    {
        let runtime = self
            .runtime
            .as_ref()
            .expect("the runtime runs until dropped");
        runtime
            .spawn(role)
            .await
            .context("the delivery side's start-up task died")?
    }
}

impl Drop for DeliveryRuntime {
    /// Stops the runtime without waiting for its tasks: by then the roles have drained, and a
    /// runtime dropped inside another one may not block.
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Lowers the calling thread's scheduling priority by `niceness`. On Linux a nice value is a
/// thread's own (`setpriority(PRIO_PROCESS, tid)` touches that thread only). Failing is
/// harmless: the thread keeps the process's priority, and that is logged.
fn lower_this_thread(niceness: i32) {
    if niceness == 0 {
        return;
    }
    // SAFETY: plain system calls on the calling thread's own id, no memory passed.
    let lowered = unsafe {
        let tid = libc::gettid();
        let current = libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t);
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, current + niceness)
    };
    if lowered != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "could not lower a delivery thread's priority; it runs at the gateway's"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn this_threads_niceness() -> i32 {
        // SAFETY: a plain system call on the calling thread's own id.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
    }

    /// The niceness of a role's start-up and of a task it spawns, on a delivery runtime of
    /// `niceness`, and of the thread that started the runtime, afterwards.
    fn niceness_of_a_role(niceness: i32) -> (i32, i32, i32) {
        let gateway = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        gateway.block_on(async {
            let delivery = DeliveryRuntime::start(niceness).expect("delivery runtime");
            let (report, reported) = tokio::sync::oneshot::channel();
            let role = delivery
                .spawn(async move {
                    let at_start_up = this_threads_niceness();
                    Ok(tokio::spawn(async move {
                        let _ = report.send((at_start_up, this_threads_niceness()));
                        Ok(())
                    }))
                })
                .await
                .expect("role started");
            role.await.expect("task").expect("role");
            let (at_start_up, in_task) = reported.await.expect("niceness reported");
            (at_start_up, in_task, this_threads_niceness())
        })
    }

    #[test]
    fn a_role_on_the_delivery_runtime_runs_below_the_gateways_priority() {
        let ours = this_threads_niceness();
        let lowered = (ours + 5).min(19);
        assert_eq!(niceness_of_a_role(5), (lowered, lowered, ours));
    }

    #[test]
    fn niceness_zero_runs_the_delivery_side_like_the_gateway() {
        let ours = this_threads_niceness();
        assert_eq!(niceness_of_a_role(0), (ours, ours, ours));
    }
}
