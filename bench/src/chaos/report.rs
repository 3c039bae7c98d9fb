//! The drill's result: printed for people, written as JSON for tests and comparisons.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::client::SendSummary;
use super::faults::FaultReport;
use super::reconcile::Reconciled;

#[derive(Debug, Serialize)]
pub struct ChaosReport {
    pub run_id: String,
    pub started_at: DateTime<Utc>,
    pub duration_secs: u64,
    pub rate: u32,
    pub gateways: Vec<String>,
    pub faults: Vec<FaultReport>,
    /// The clients' failed attempts while no fault was in progress.
    pub errors_outside_faults: BTreeMap<String, u64>,
    pub sends: SendSummary,
    pub reconciled: Reconciled,
    pub verdict: Verdict,
}

#[derive(Debug, Serialize)]
pub struct Verdict {
    pub passed: bool,
    /// Each reason it did not pass.
    pub failures: Vec<String>,
}

impl ChaosReport {
    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        let json = serde_json::to_vec_pretty(self).context("serialising the chaos report")?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))
    }

    pub fn summary(&self) -> String {
        let s = &self.sends;
        let r = &self.reconciled;
        let mut text = format!(
            "\nchaos: {rate} msg/s for {secs} s through {g} gateway(s)\n\
             \x20 sends      scheduled {sched}, accepted {acc} ({retried} after a retry; {retries} retries, \
             at most {maxa} attempts), refused {refused:?}, gave up {gave}, dropped {dropped}\n\
             \x20 Postgres   persisted {pers}/{acc}, lost {lost}, duplicated {dup}, seq gaps {gaps}, \
             stored without a 202 {orphans}\n\
             \x20 timing     slowest 202 {acc_ms:.0} ms after the first attempt; slowest row {send_ms:.0} ms \
             after the first attempt ({pipe_ms:.0} ms after acceptance); caught up {catch:.1} s after the load\n\
             \x20 faults\n",
            rate = self.rate,
            secs = self.duration_secs,
            g = self.gateways.len(),
            sched = s.scheduled,
            acc = s.accepted,
            retried = s.accepted_after_retry,
            retries = s.retries,
            maxa = s.max_attempts,
            refused = s.refused,
            gave = s.gave_up,
            dropped = s.dropped,
            pers = r.persisted,
            lost = r.lost,
            dup = r.duplicated,
            gaps = r.seq_gaps,
            orphans = r.stored_without_202,
            acc_ms = s.max_ms_to_accept,
            send_ms = r.max_ms_first_send_to_persist,
            pipe_ms = r.max_ms_accept_to_persist,
            catch = r.catch_up_secs,
        );
        for fault in &self.faults {
            let healed = fault.heal_secs.map_or_else(
                || "did not heal".to_owned(),
                |secs| format!("healed in {secs:.1} s"),
            );
            let _ = writeln!(
                text,
                "    {:<16} {:<14} at t+{:>5.1} s, {healed}; errors {:?}",
                format!("{:?}", fault.kind),
                fault.target,
                fault.injected_at_secs.unwrap_or(fault.planned_at_secs),
                fault.errors
            );
        }
        let _ = writeln!(
            text,
            "    outside faults errors {:?}\n  verdict: {}",
            self.errors_outside_faults,
            if self.verdict.passed {
                "PASS".to_owned()
            } else {
                format!("FAIL ({})", self.verdict.failures.join("; "))
            }
        );
        text
    }
}

impl Verdict {
    /// Passed when nothing accepted was lost or stored twice, no seq has a gap, and every
    /// fault healed.
    pub fn of(faults: &[FaultReport], reconciled: &Reconciled) -> Verdict {
        let mut failures = Vec::new();
        if reconciled.lost > 0 {
            failures.push(format!("{} accepted messages lost", reconciled.lost));
        }
        if reconciled.duplicated > 0 {
            failures.push(format!("{} messages stored twice", reconciled.duplicated));
        }
        if reconciled.seq_gaps > 0 {
            failures.push(format!(
                "{} gaps in conversations' seq",
                reconciled.seq_gaps
            ));
        }
        for fault in faults.iter().filter(|fault| fault.heal_secs.is_none()) {
            failures.push(format!(
                "{} did not heal: {}",
                fault.target,
                fault.problem.as_deref().unwrap_or("unknown")
            ));
        }
        Verdict {
            passed: failures.is_empty(),
            failures,
        }
    }
}
