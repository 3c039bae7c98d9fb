//! The benchmark's result: one structure, printed for people and written as JSON for
//! comparisons between runs.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::baseline::{RawJetStream, RawUnnest};
use super::delivery::DeliveryResult;
use super::load::{CapacityResult, OpenLoopResult};
use super::persisted::Persisted;
use super::stats::Percentiles;
use super::transport::{SenderSockets, TransportKind};
use super::workload::GroupSizes;

/// Generator lag (p99) above which the latency figures say more about the load generator
/// than about the gateway.
const LAG_WARNING_MS: f64 = 5.0;

#[derive(Debug, Serialize)]
pub struct Report {
    pub run_id: String,
    pub started_at: DateTime<Utc>,
    pub machine: Machine,
    pub settings: Settings,
    pub latency_phase: OpenLoopResult,
    pub capacity_phase: Option<CapacityResult>,
    /// `--transport ws` only: the senders' sockets.
    pub sender_sockets: Option<SenderSockets>,
    /// Delivery mode only: live `message.new` frames received over WebSockets during the
    /// latency phase.
    pub delivery: Option<DeliveryResult>,
    pub persisted: PersistedReport,
    pub baselines: Baselines,
    pub ratios: Ratios,
    /// Anything in the figures that deserves a second look.
    pub warnings: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    /// Share of all CPUs busy in the second before the run, while the system under test was
    /// idle: whatever else the machine was doing competes with the benchmark.
    pub busy_before_run_pct: Option<f64>,
}

/// How long the pre-run CPU sample lasts.
const IDLE_SAMPLE: std::time::Duration = std::time::Duration::from_secs(1);
/// Pre-run CPU use above which the figures are flagged as taken on a busy machine.
const BUSY_WARNING_PCT: f64 = 20.0;

impl Machine {
    /// This machine: logical CPUs, the CPU model from /proc/cpuinfo, and how busy it is
    /// (sampled for a second).
    pub async fn detect() -> Machine {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find(|line| line.starts_with("model name"))
                    .and_then(|line| line.split_once(':'))
                    .map(|(_, model)| model.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".to_string());
        let before = cpu_times();
        tokio::time::sleep(IDLE_SAMPLE).await;
        let busy_before_run_pct = match (before, cpu_times()) {
            (Some((busy0, total0)), Some((busy1, total1))) if total1 > total0 => {
                // saturating: the kernel's iowait counter may step backwards.
                let busy = busy1.saturating_sub(busy0);
                Some(100.0 * busy as f64 / (total1 - total0) as f64)
            }
            _ => None,
        };
        Machine {
            nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            busy_before_run_pct,
        }
    }
}

/// (busy, total) jiffies of all CPUs from /proc/stat; idle and iowait count as not busy.
fn cpu_times() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3)? + fields.get(4)?;
    Some((total - idle, total))
}

/// What the run was asked to do, and what it derived (secrets left out).
#[derive(Debug, Serialize)]
pub struct Settings {
    pub gateway: String,
    /// How the senders sent: `http` or `ws` (`--transport`).
    pub transport: TransportKind,
    pub nats_url: String,
    pub database_url: String,
    pub partitions: u32,
    pub rate: u32,
    pub duration_secs: u64,
    pub warmup_secs: u64,
    pub users: usize,
    pub conversations: usize,
    pub members_per_conversation: GroupSizes,
    pub capacity_secs: u64,
    pub concurrency: usize,
    pub max_in_flight: usize,
    pub content_chars: usize,
    pub request_body_bytes: usize,
    pub envelope_bytes: usize,
}

#[derive(Debug, Serialize)]
pub struct PersistedReport {
    pub latency_phase: Persisted,
    pub capacity_phase: Option<Persisted>,
    /// A backlog published straight into the stream: the consumers' own persisting rate,
    /// not bounded by what the gateway can feed them.
    pub consumer_drain: Option<Persisted>,
    /// The headline: the capacity phase's figure when it ran (the consumers under the most
    /// load the gateway could give them), else the latency phase's.
    pub msgs_per_sec: f64,
}

#[derive(Debug, Serialize)]
pub struct Baselines {
    pub messages: usize,
    pub raw_jetstream: Option<RawJetStream>,
    pub raw_unnest: Option<RawUnnest>,
    pub errors: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct Ratios {
    /// Gateway capacity over raw JetStream publishing: the share of the broker's rate the
    /// HTTP path keeps.
    pub accepted_capacity_over_raw_jetstream: Option<f64>,
    /// End-to-end persisting over raw inserts: the share of Postgres's rate the consumers
    /// keep. Bounded by what the gateway fed them.
    pub persisted_over_raw_unnest: Option<f64>,
    /// The consumers draining a backlog over raw inserts: the consumer machinery's cost.
    pub drained_over_raw_unnest: Option<f64>,
}

impl Report {
    /// Fills in the ratios and warnings from the figures (the rest of the report is built
    /// with them empty).
    pub fn complete(&mut self) {
        let capacity = self.capacity_phase.as_ref().map(|c| c.accepted_per_sec);
        let raw_js = self
            .baselines
            .raw_jetstream
            .as_ref()
            .map(|b| b.msgs_per_sec);
        let raw_unnest = self.baselines.raw_unnest.as_ref().map(|b| b.msgs_per_sec);
        self.ratios = Ratios {
            accepted_capacity_over_raw_jetstream: ratio(capacity, raw_js),
            persisted_over_raw_unnest: ratio(Some(self.persisted.msgs_per_sec), raw_unnest),
            drained_over_raw_unnest: ratio(
                self.persisted
                    .consumer_drain
                    .as_ref()
                    .map(|d| d.msgs_per_sec),
                raw_unnest,
            ),
        };
        self.warnings = self.find_warnings();
    }

    fn find_warnings(&self) -> Vec<String> {
        let mut warnings = latency_warnings(&self.latency_phase);
        if let Some(delivery) = &self.delivery {
            warnings.extend(delivery_warnings(delivery));
        }
        if let Some(capacity) = &self.capacity_phase
            && capacity.rate_limited() > 0
        {
            warnings.push(format!(
                "capacity phase: {} sends were rate limited (429); pass more --users so the \
                 per-user limit does not cap the measured capacity",
                capacity.rate_limited()
            ));
        }
        if let Some(sockets) = &self.sender_sockets
            && sockets.reconnects > 0
        {
            warnings.push(format!(
                "{} sending WebSockets ended during the run and were opened again; the sends \
                 waiting on them count as transport errors",
                sockets.reconnects
            ));
        }
        warnings.extend(self.persistence_warnings());
        for error in &self.baselines.errors {
            warnings.push(format!("baseline failed: {error}"));
        }
        warnings.extend(self.environment_warnings());
        warnings
    }

    /// Phases whose accepted messages did not all reach Postgres within the wait limit.
    fn persistence_warnings(&self) -> Vec<String> {
        let phases = std::iter::once(("latency", &self.persisted.latency_phase))
            .chain(
                self.persisted
                    .capacity_phase
                    .iter()
                    .map(|p| ("capacity", p)),
            )
            .chain(self.persisted.consumer_drain.iter().map(|p| ("drain", p)));
        phases
            .filter(|(_, persisted)| !persisted.complete)
            .map(|(phase, persisted)| {
                format!(
                    "{phase} phase: only {} of {} accepted messages were persisted within the wait limit",
                    persisted.persisted, persisted.expected
                )
            })
            .collect()
    }

    /// What the machine the run shared makes of the figures: other work before the run, and
    /// the load generator itself when it runs next to the gateway.
    fn environment_warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if let Some(busy) = self.machine.busy_before_run_pct
            && busy > BUSY_WARNING_PCT
        {
            warnings.push(format!(
                "the machine was already {busy:.0}% busy before the run: other work competes \
                 with the benchmark and the figures are noisy"
            ));
        }
        if is_loopback(&self.settings.gateway) {
            warnings.push(format!(
                "the load generator runs on the same {} CPUs as the system under test and \
                 competes with it",
                self.machine.nproc
            ));
        }
        warnings
    }

    /// Writes the report as pretty JSON.
    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        let json = serde_json::to_vec_pretty(self).context("serialising the report")?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))
    }

    /// The human summary.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_summary(&mut out);
        out
    }

    fn write_summary(&self, out: &mut String) -> std::fmt::Result {
        self.write_run(out)?;
        if let Some(sockets) = &self.sender_sockets {
            write_sender_sockets(out, sockets)?;
        }
        self.write_latency_phase(out)?;
        if let Some(delivery) = &self.delivery {
            write_delivery(out, delivery)?;
        }
        if let Some(capacity) = &self.capacity_phase {
            write_capacity(out, capacity)?;
        }
        self.write_persistence(out)?;
        self.write_baselines(out)?;
        for warning in &self.warnings {
            writeln!(out, "warning: {warning}")?;
        }
        Ok(())
    }

    /// Which run, on what machine, with what workload.
    fn write_run(&self, out: &mut String) -> std::fmt::Result {
        let s = &self.settings;
        writeln!(
            out,
            "\nhotpath bench {} ({})",
            self.run_id,
            self.started_at.to_rfc3339()
        )?;
        let busy = self
            .machine
            .busy_before_run_pct
            .map_or_else(|| "unknown".to_string(), |b| format!("{b:.0}%"));
        writeln!(
            out,
            "machine      {} CPUs, {}; {busy} busy before the run",
            self.machine.nproc, self.machine.cpu_model
        )?;
        writeln!(
            out,
            "workload     {} users, {} group conversations of {}-{} members, {}-char text, \
             {} B request, {} B envelope, {} partitions; sent over {}",
            s.users,
            s.conversations,
            s.members_per_conversation.min,
            s.members_per_conversation.max,
            s.content_chars,
            s.request_body_bytes,
            s.envelope_bytes,
            s.partitions,
            s.transport.label()
        )?;
        Ok(())
    }

    fn write_latency_phase(&self, out: &mut String) -> std::fmt::Result {
        let latency = &self.latency_phase;
        writeln!(
            out,
            "\nlatency      over {}, open loop at {} msg/s for {} s (after {} s warm-up): {} \
             scheduled",
            latency.transport.label(),
            latency.rate,
            latency.duration_secs,
            latency.warmup_secs,
            latency.scheduled
        )?;
        write_percentiles(out, "  latency", &latency.latency_ms)?;
        write_percentiles(out, "  service", &latency.service_ms)?;
        write_percentiles(out, "  gen. lag", &latency.scheduler_lag_ms)?;
        write_percentiles(out, "  warm-up", &latency.warmup_latency_ms)?;
        writeln!(
            out,
            "  accepted   {:.0} msg/s; outcomes: {}; peak in flight {} (warm-up included)",
            latency.accepted_per_sec,
            describe(&latency.outcomes),
            latency.peak_in_flight
        )?;
        Ok(())
    }

    /// Every phase's persisting figures, then the headline rate.
    fn write_persistence(&self, out: &mut String) -> std::fmt::Result {
        writeln!(out)?;
        write_persisted(out, "latency", &self.persisted.latency_phase)?;
        if let Some(persisted) = &self.persisted.capacity_phase {
            write_persisted(out, "capacity", persisted)?;
        }
        if let Some(drained) = &self.persisted.consumer_drain {
            write_persisted(out, "drain", drained)?;
        }
        writeln!(out, "persisted    {:.0} msg/s", self.persisted.msgs_per_sec)?;
        Ok(())
    }

    fn write_baselines(&self, out: &mut String) -> std::fmt::Result {
        let b = &self.baselines;
        writeln!(out, "\nbaselines    {} messages each", b.messages)?;
        match &b.raw_jetstream {
            Some(js) => writeln!(
                out,
                "  raw JetStream publish  {:.0} msg/s ({:.2} s)",
                js.msgs_per_sec, js.secs
            )?,
            None => writeln!(out, "  raw JetStream publish  failed")?,
        }
        match &b.raw_unnest {
            Some(unnest) => writeln!(
                out,
                "  raw UNNEST insert      {:.0} msg/s ({:.2} s, {} workers x {} rows)",
                unnest.msgs_per_sec, unnest.secs, unnest.workers, unnest.batch_rows
            )?,
            None => writeln!(out, "  raw UNNEST insert      failed")?,
        }
        let r = &self.ratios;
        writeln!(
            out,
            "ratios       accepted capacity / raw JetStream {}; persisted / raw UNNEST {}; \
             drained backlog / raw UNNEST {}\n",
            percent(r.accepted_capacity_over_raw_jetstream),
            percent(r.persisted_over_raw_unnest),
            percent(r.drained_over_raw_unnest)
        )
    }
}

/// Sends the gateway did not accept, sends issued late, sends never answered.
fn latency_warnings(latency: &OpenLoopResult) -> Vec<String> {
    let mut warnings = Vec::new();
    let errors: u64 = latency
        .outcomes
        .iter()
        .filter(|(label, _)| label.as_str() != "202")
        .map(|(_, n)| n)
        .sum();
    if errors > 0 {
        warnings.push(format!(
            "latency phase: {errors} of {} sends were not accepted ({})",
            latency.scheduled,
            describe(&latency.outcomes)
        ));
    }
    if latency.scheduler_lag_ms.p99 > LAG_WARNING_MS {
        warnings.push(format!(
            "the load generator issued sends late (lag p99 {:.1} ms, max {:.1} ms): the \
             latencies include its own delay; the machine is short of CPU",
            latency.scheduler_lag_ms.p99, latency.scheduler_lag_ms.max
        ));
    }
    if latency.unanswered > 0 {
        warnings.push(format!(
            "{} latency-phase sends were still unanswered when the phase ended",
            latency.unanswered
        ));
    }
    warnings
}

/// Frames that never arrived, receivers that left early, and a gateway clock ahead of ours.
fn delivery_warnings(delivery: &DeliveryResult) -> Vec<String> {
    let mut warnings = Vec::new();
    if delivery.frames_missing > 0 {
        warnings.push(format!(
            "delivery: {} of {} expected message.new frames did not arrive",
            delivery.frames_missing, delivery.frames_expected
        ));
    }
    if delivery.sockets_ended_early > 0 {
        warnings.push(format!(
            "delivery: {} receiver sockets ended before the phase did",
            delivery.sockets_ended_early
        ));
    }
    if delivery.clock_skewed > 0 {
        warnings.push(format!(
            "delivery: {} frames arrived before their acceptedAt: the gateway's clock \
             is not this machine's, and the delivery latencies are off",
            delivery.clock_skewed
        ));
    }
    warnings
}

fn write_delivery(out: &mut String, delivery: &DeliveryResult) -> std::fmt::Result {
    writeln!(
        out,
        "\ndelivery     {} WebSocket receivers (connected in {:.2} s): {}/{} message.new \
         frames received ({} missing), {:.0} frames/s delivered in the measured part",
        delivery.receivers,
        delivery.connect_secs,
        delivery.frames_received,
        delivery.frames_expected,
        delivery.frames_missing,
        delivery.delivered_per_sec
    )?;
    write_percentiles(out, "  accept->delivered", &delivery.accept_to_delivered_ms)?;
    Ok(())
}

fn write_capacity(out: &mut String, capacity: &CapacityResult) -> std::fmt::Result {
    writeln!(
        out,
        "\ncapacity     over {}, {} workers back to back for {} s: {:.0} msg/s accepted; \
         outcomes: {}",
        capacity.transport.label(),
        capacity.concurrency,
        capacity.secs,
        capacity.accepted_per_sec,
        describe(&capacity.outcomes)
    )?;
    write_percentiles(out, "  latency", &capacity.latency_ms)?;
    Ok(())
}

fn write_sender_sockets(out: &mut String, sockets: &SenderSockets) -> std::fmt::Result {
    writeln!(
        out,
        "senders      {} WebSockets, one per user, opened in {:.2} s before the phases; {} \
         reopened; {} other frames read (fanout to the senders: message.new, state changes)",
        sockets.sockets, sockets.connect_secs, sockets.reconnects, sockets.other_frames
    )
}

fn write_percentiles(out: &mut String, label: &str, p: &Percentiles) -> std::fmt::Result {
    writeln!(
        out,
        "{label:<12} p50 {:.2} ms  p95 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms",
        p.p50, p.p95, p.p99, p.p999, p.max
    )
}

fn write_persisted(out: &mut String, phase: &str, p: &Persisted) -> std::fmt::Result {
    writeln!(
        out,
        "persisted    {phase} phase: {}/{} rows{} at {:.0} msg/s; drained {:.2} s after the last \
         answer; accept->persist p50 {:.0} ms p95 {:.0} ms p99 {:.0} ms max {:.0} ms",
        p.persisted,
        p.expected,
        if p.complete { "" } else { " (INCOMPLETE)" },
        p.msgs_per_sec,
        p.drain_secs,
        p.accept_to_persist_ms.p50,
        p.accept_to_persist_ms.p95,
        p.accept_to_persist_ms.p99,
        p.accept_to_persist_ms.max
    )
}

/// `202 x19998, 503 x2`.
fn describe(outcomes: &std::collections::BTreeMap<String, u64>) -> String {
    if outcomes.is_empty() {
        return "none".to_string();
    }
    outcomes
        .iter()
        .map(|(label, n)| format!("{label} x{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn ratio(numerator: Option<f64>, denominator: Option<f64>) -> Option<f64> {
    match (numerator, denominator) {
        (Some(n), Some(d)) if d > 0.0 => Some(n / d),
        _ => None,
    }
}

fn percent(ratio: Option<f64>) -> String {
    ratio.map_or_else(|| "n/a".to_string(), |r| format!("{:.1}%", r * 100.0))
}

fn is_loopback(url: &str) -> bool {
    let authority = url.split_once("://").map_or(url, |(_, rest)| rest);
    ["localhost", "127.", "[::1]"]
        .iter()
        .any(|loopback| authority.starts_with(loopback))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_gateways_are_recognised() {
        assert!(is_loopback("http://127.0.0.1:8080"));
        assert!(is_loopback("http://localhost:18181/"));
        assert!(is_loopback("http://[::1]:8080"));
        assert!(!is_loopback("http://10.0.0.7:8080"));
    }

    #[test]
    fn ratios_need_both_sides() {
        assert_eq!(ratio(Some(1.0), Some(4.0)), Some(0.25));
        assert_eq!(ratio(Some(1.0), None), None);
        assert_eq!(ratio(Some(1.0), Some(0.0)), None);
    }
}
