//! The sending phases, over either transport (`--transport`, [`super::transport`]).
//!
//! * The latency phase is open loop: sends are scheduled at a fixed arrival rate and issued on
//!   time whether or not earlier ones were answered, and each latency is measured from the
//!   send's *scheduled* time. A stalling gateway therefore shows up as latency instead of
//!   quietly slowing the generator down (no coordinated omission).
//! * The capacity phase is closed loop: a fixed number of workers send back to back, which
//!   finds the most the gateway accepts per second.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::Utc;
use serde::Serialize;
use tokio::runtime::Handle;
use tokio::task::JoinSet;

use super::delivery::Expected;
use super::stats::{DROPPED, Outcome, Percentiles, PhaseStats, Progress, Timing, Window};
use super::transport::{Transport, TransportKind};
use super::workload::Workload;

/// How long one send (an HTTP request, or a `send` frame until its answer) may take before it
/// counts as a timeout: far above any healthy latency, short enough that a stalled gateway
/// cannot hang the run.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends the workload's messages, numbered from 0 across all phases so every
/// `clientMessageId` of the run is distinct, over the run's [`Transport`].
pub struct Sender {
    transport: Transport,
    workload: Arc<Workload>,
    next_seq: AtomicU64,
    /// In delivery mode: the frames accepted sends owe the WebSocket receivers.
    expected: Option<Arc<Expected>>,
    /// In soak mode: the `messageId` of every accepted send, to check each was stored once.
    accepted_ids: Option<Arc<std::sync::Mutex<Vec<uuid::Uuid>>>>,
}

impl Sender {
    pub fn new(transport: Transport, workload: Arc<Workload>) -> Sender {
        Sender {
            transport,
            workload,
            next_seq: AtomicU64::new(0),
            expected: None,
            accepted_ids: None,
        }
    }

    /// Keeps the `messageId` of every accepted send in `ids`.
    pub fn recording(mut self, ids: Arc<std::sync::Mutex<Vec<uuid::Uuid>>>) -> Sender {
        self.accepted_ids = Some(ids);
        self
    }

    /// Counts, for every accepted send, the frames it owes the delivery receivers.
    pub fn expecting(mut self, expected: Option<Arc<Expected>>) -> Sender {
        self.expected = expected;
        self
    }

    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// Sends the next message and waits for the whole answer.
    async fn send_next(&self) -> Outcome {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let message = self.workload.message(seq);
        let answer = self.transport.send(&message).await;
        if let Some(body) = &answer.accepted {
            if let Some(expected) = &self.expected {
                expected.accepted(&message.user.id, &message.conversation.members);
            }
            if let Some(ids) = &self.accepted_ids {
                record_message_id(ids, body);
            }
        }
        answer.outcome
    }
}

/// Adds the `messageId` of a 202 body (or `send.ack` frame) to `ids` (a body without one is a gateway bug the soak's
/// check then reports as a missing row).
fn record_message_id(ids: &std::sync::Mutex<Vec<uuid::Uuid>>, body: &[u8]) {
    let id = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| uuid::Uuid::parse_str(v.get("messageId")?.as_str()?).ok())
        .unwrap_or_default();
    ids.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(id);
}

/// The latency phase's plan.
pub struct OpenLoop {
    pub rate: u32,
    pub warmup_secs: u64,
    pub duration_secs: u64,
    /// Sends due while this many are unanswered are skipped and counted as dropped, so a
    /// stalled gateway cannot make the generator exhaust memory or file descriptors.
    pub max_in_flight: usize,
}

#[derive(Debug, Serialize)]
pub struct OpenLoopResult {
    /// How the sends were sent.
    pub transport: TransportKind,
    pub rate: u32,
    pub warmup_secs: u64,
    pub duration_secs: u64,
    /// Sends scheduled in the measured part (after warm-up).
    pub scheduled: u64,
    pub dropped: u64,
    pub accepted: u64,
    /// Accepted (202) in the measured part per second of it.
    pub accepted_per_sec: f64,
    /// Measured sends by HTTP status or failure.
    pub outcomes: BTreeMap<String, u64>,
    /// Answer minus scheduled send time (what the report calls latency).
    pub latency_ms: Percentiles,
    /// Answer minus actual send time.
    pub service_ms: Percentiles,
    /// How late the generator issued sends; large values mean the machine could not keep
    /// up with the schedule and the latencies include the generator's own delay.
    pub scheduler_lag_ms: Percentiles,
    /// Latency during the warm-up, not part of the figures above.
    pub warmup_latency_ms: Percentiles,
    pub peak_in_flight: usize,
    /// Sends still unanswered when the phase gave up waiting for them.
    pub unanswered: usize,
    pub window: Window,
}

/// Runs the latency phase: `warmup_secs` unmeasured, then `duration_secs` measured, at
/// `rate` sends per second throughout.
pub async fn open_loop(sender: &Arc<Sender>, plan: &OpenLoop) -> anyhow::Result<OpenLoopResult> {
    let stats = Arc::new(PhaseStats::new()?);
    let rate = u64::from(plan.rate);
    let warmup_sends = rate * plan.warmup_secs;
    let total = warmup_sends + rate * plan.duration_secs;
    tracing::info!(
        rate,
        warmup_secs = plan.warmup_secs,
        duration_secs = plan.duration_secs,
        "latency phase (open loop) starting"
    );

    let first_send = Utc::now();
    let start = Instant::now();
    let progress = Progress::spawn("latency", stats.clone(), start, plan.warmup_secs);
    let schedule = Schedule {
        start,
        rate,
        total,
        warmup_sends,
        max_in_flight: plan.max_in_flight,
        runtime: Handle::current(),
        sender: sender.clone(),
        stats: stats.clone(),
    };
    tokio::task::spawn_blocking(move || schedule.run())
        .await
        .context("the scheduler thread panicked")?;
    let unanswered = stats.drain(REQUEST_TIMEOUT + Duration::from_secs(5)).await;
    progress.finish();

    let detail = stats.detail();
    let accepted = detail.outcomes.get("202").copied().unwrap_or(0);
    Ok(OpenLoopResult {
        transport: sender.transport.kind(),
        rate: plan.rate,
        warmup_secs: plan.warmup_secs,
        duration_secs: plan.duration_secs,
        scheduled: total - warmup_sends,
        dropped: detail.outcomes.get(DROPPED).copied().unwrap_or(0),
        accepted,
        accepted_per_sec: accepted as f64 / plan.duration_secs.max(1) as f64,
        outcomes: detail.outcomes.clone(),
        latency_ms: Percentiles::of(&detail.latency),
        service_ms: Percentiles::of(&detail.service),
        scheduler_lag_ms: Percentiles::of(&detail.lag),
        warmup_latency_ms: Percentiles::of(&detail.warmup_latency),
        peak_in_flight: stats.peak_in_flight.load(Ordering::Relaxed),
        unanswered,
        window: Window {
            first_send,
            last_answer: detail.last_answer.unwrap_or(first_send),
            accepted_total: accepted + detail.warmup_accepted,
        },
    })
}

/// When each send of the latency phase is due, and what to do when it is.
struct Schedule {
    start: Instant,
    rate: u64,
    total: u64,
    /// Sends before this one are warm-up: sent, but not measured.
    warmup_sends: u64,
    max_in_flight: usize,
    /// Where the sends run.
    runtime: Handle,
    sender: Arc<Sender>,
    stats: Arc<PhaseStats>,
}

impl Schedule {
    /// Issues every send at its time, from a thread of its own: `thread::sleep` wakes within
    /// about 0.1 ms where tokio's timer rounds up to whole milliseconds, so the generator
    /// adds little of its own to the measured latency. A late send is issued at once, never
    /// skipped (unless over the in-flight bound), so the schedule does not bend to the system.
    fn run(self) {
        let stats = &self.stats;
        for i in 0..self.total {
            let due = self.start + Duration::from_nanos(nanos_until(i, self.rate));
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let measured = i >= self.warmup_sends;
            if stats.in_flight.load(Ordering::Relaxed) >= self.max_in_flight {
                stats.dropped(measured);
                continue;
            }
            stats.started();
            let send = timed_send(self.sender.clone(), stats.clone(), due, measured);
            self.runtime.spawn(send);
        }
    }
}

/// Nanoseconds from the start to send number `i` at `rate` per second.
fn nanos_until(i: u64, rate: u64) -> u64 {
    let nanos = u128::from(i) * 1_000_000_000 / u128::from(rate.max(1));
    u64::try_from(nanos).unwrap_or(u64::MAX)
}

/// One scheduled send, timed against its schedule.
async fn timed_send(
    sender: Arc<Sender>,
    stats: Arc<PhaseStats>,
    scheduled: Instant,
    measured: bool,
) {
    let issued = Instant::now();
    let outcome = sender.send_next().await;
    let answered = Instant::now();
    let timing = Timing {
        latency: answered - scheduled,
        service: answered - issued,
        lag: issued - scheduled,
    };
    stats.answered(outcome, timing, measured);
}

#[derive(Debug, Serialize)]
pub struct CapacityResult {
    /// How the sends were sent.
    pub transport: TransportKind,
    pub secs: u64,
    pub concurrency: usize,
    pub sent: u64,
    pub accepted: u64,
    /// Accepted (202) per second, over the phase including its last answers.
    pub accepted_per_sec: f64,
    pub outcomes: BTreeMap<String, u64>,
    /// Per-request time under full load (closed loop: there is no schedule to lag behind).
    pub latency_ms: Percentiles,
    pub window: Window,
}

impl CapacityResult {
    pub fn rate_limited(&self) -> u64 {
        self.outcomes.get("429").copied().unwrap_or(0)
    }
}

/// Runs the capacity phase: `concurrency` workers sending back to back for `secs`.
pub async fn capacity(
    sender: &Arc<Sender>,
    secs: u64,
    concurrency: usize,
) -> anyhow::Result<CapacityResult> {
    let stats = Arc::new(PhaseStats::new()?);
    tracing::info!(secs, concurrency, "capacity phase (closed loop) starting");
    let first_send = Utc::now();
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let progress = Progress::spawn("capacity", stats.clone(), start, 0);
    let mut workers = JoinSet::new();
    for _ in 0..concurrency {
        workers.spawn(back_to_back(sender.clone(), stats.clone(), deadline));
    }
    while let Some(joined) = workers.join_next().await {
        joined.context("a capacity worker panicked")?;
    }
    let elapsed = start.elapsed();
    progress.finish();

    let accepted = stats.count("202");
    let detail = stats.detail();
    Ok(CapacityResult {
        transport: sender.transport.kind(),
        secs,
        concurrency,
        sent: stats.sent.load(Ordering::Relaxed),
        accepted,
        accepted_per_sec: accepted as f64 / elapsed.as_secs_f64(),
        outcomes: detail.outcomes.clone(),
        latency_ms: Percentiles::of(&detail.service),
        window: Window {
            first_send,
            last_answer: detail.last_answer.unwrap_or(first_send),
            accepted_total: accepted,
        },
    })
}

/// One closed-loop worker: the next send starts when the previous one is answered.
async fn back_to_back(sender: Arc<Sender>, stats: Arc<PhaseStats>, deadline: Instant) {
    while Instant::now() < deadline {
        stats.started();
        let issued = Instant::now();
        let outcome = sender.send_next().await;
        let service = issued.elapsed();
        let timing = Timing {
            latency: service,
            service,
            lag: Duration::ZERO,
        };
        stats.answered(outcome, timing, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_is_evenly_spaced() {
        assert_eq!(nanos_until(0, 2000), 0);
        assert_eq!(nanos_until(1, 2000), 500_000);
        assert_eq!(nanos_until(2000, 2000), 1_000_000_000);
        assert_eq!(nanos_until(7, 3), 2_333_333_333);
    }
}
