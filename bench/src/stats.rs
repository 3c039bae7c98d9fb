//! What a phase counts: outcomes by status, latency histograms, and the live progress line.

use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::task::JoinHandle;

/// Longest latency the histograms resolve, in µs; longer ones are recorded as this.
const HISTOGRAM_MAX_US: u64 = 10 * 60 * 1_000_000;

/// How one send ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Status(u16),
    Timeout,
    Connect,
    Transport,
    /// An answer the bench cannot read as a status (an `error` frame with a code the gateway
    /// does not give).
    Unrecognised,
}

impl Outcome {
    pub fn from_error(error: &reqwest::Error) -> Outcome {
        if error.is_timeout() {
            Outcome::Timeout
        } else if error.is_connect() {
            Outcome::Connect
        } else {
            Outcome::Transport
        }
    }

    pub fn is_accepted(self) -> bool {
        self == Outcome::Status(202)
    }

    /// The key under which the report counts it: the HTTP status, or what went wrong.
    fn label(self) -> String {
        match self {
            Outcome::Status(status) => status.to_string(),
            Outcome::Timeout => "timeout".to_string(),
            Outcome::Connect => "connect-error".to_string(),
            Outcome::Transport => "transport-error".to_string(),
            Outcome::Unrecognised => "unrecognised-answer".to_string(),
        }
    }
}

/// Label of sends the open loop skipped because too many were in flight.
pub const DROPPED: &str = "dropped";

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Percentiles {
    pub fn of(histogram: &Histogram<u64>) -> Percentiles {
        let ms = |us: u64| us as f64 / 1000.0;
        Percentiles {
            count: histogram.len(),
            p50: ms(histogram.value_at_quantile(0.50)),
            p95: ms(histogram.value_at_quantile(0.95)),
            p99: ms(histogram.value_at_quantile(0.99)),
            p999: ms(histogram.value_at_quantile(0.999)),
            max: ms(histogram.max()),
            mean: histogram.mean() / 1000.0,
        }
    }
}

/// When a send was due, issued and answered.
pub struct Timing {
    /// Answer minus scheduled time: what a user would have waited.
    pub latency: Duration,
    /// Answer minus the moment the request actually left: the gateway's service time.
    pub service: Duration,
    /// Issue minus scheduled time: how late the generator itself was.
    pub lag: Duration,
}

/// A phase's counters. The atomics feed the once-a-second progress line; the histograms and
/// per-outcome counts sit behind a mutex that each answer holds for a few hundred ns.
pub struct PhaseStats {
    pub sent: AtomicU64,
    pub accepted: AtomicU64,
    pub errors: AtomicU64,
    pub in_flight: AtomicUsize,
    pub peak_in_flight: AtomicUsize,
    detail: Mutex<Detail>,
}

/// What the report needs: the measured part of a phase, with warm-up sends kept apart.
pub struct Detail {
    pub latency: Histogram<u64>,
    pub service: Histogram<u64>,
    pub lag: Histogram<u64>,
    pub outcomes: BTreeMap<String, u64>,
    /// Warm-up latencies, kept apart: they show how cold the system was.
    pub warmup_latency: Histogram<u64>,
    pub warmup_accepted: u64,
    pub last_answer: Option<DateTime<Utc>>,
}

impl PhaseStats {
    pub fn new() -> anyhow::Result<PhaseStats> {
        let histogram = || {
            Histogram::<u64>::new_with_bounds(1, HISTOGRAM_MAX_US, 3)
                .context("creating a latency histogram")
        };
        Ok(PhaseStats {
            sent: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            peak_in_flight: AtomicUsize::new(0),
            detail: Mutex::new(Detail {
                latency: histogram()?,
                service: histogram()?,
                lag: histogram()?,
                outcomes: BTreeMap::new(),
                warmup_latency: histogram()?,
                warmup_accepted: 0,
                last_answer: None,
            }),
        })
    }

    /// The details, even if a recording task panicked while holding the lock: counters and
    /// histograms stay consistent enough for a report.
    pub fn detail(&self) -> MutexGuard<'_, Detail> {
        self.detail.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn started(&self) {
        self.sent.fetch_add(1, Ordering::Relaxed);
        let now = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak_in_flight.fetch_max(now, Ordering::Relaxed);
    }

    pub fn answered(&self, outcome: Outcome, timing: Timing, measured: bool) {
        let counter = if outcome.is_accepted() {
            &self.accepted
        } else {
            &self.errors
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let answered_at = Utc::now();
        {
            let mut detail = self.detail();
            detail.last_answer = Some(answered_at);
            if measured {
                detail.latency.saturating_record(micros(timing.latency));
                detail.service.saturating_record(micros(timing.service));
                detail.lag.saturating_record(micros(timing.lag));
                *detail.outcomes.entry(outcome.label()).or_default() += 1;
            } else {
                detail
                    .warmup_latency
                    .saturating_record(micros(timing.latency));
                detail.warmup_accepted += u64::from(outcome.is_accepted());
            }
        }
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn dropped(&self, measured: bool) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if measured {
            *self
                .detail()
                .outcomes
                .entry(DROPPED.to_string())
                .or_default() += 1;
        }
    }

    pub fn count(&self, label: &str) -> u64 {
        self.detail().outcomes.get(label).copied().unwrap_or(0)
    }

    /// Waits until nothing is in flight or `within` passed; returns what is still in flight.
    pub async fn drain(&self, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            let in_flight = self.in_flight.load(Ordering::Relaxed);
            if in_flight == 0 || Instant::now() >= deadline {
                return in_flight;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// When a phase sent its first message and got its last answer, and how many it had
/// accepted in all (warm-up included): what the persistence check waits for.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Window {
    pub first_send: DateTime<Utc>,
    pub last_answer: DateTime<Utc>,
    pub accepted_total: u64,
}

/// The once-a-second progress line on stderr: rewritten in place on a terminal, one line per
/// second otherwise (logs and CI keep every line).
pub struct Progress {
    task: JoinHandle<()>,
    view: ProgressView,
    tty: bool,
}

impl Progress {
    pub fn spawn(
        phase: &'static str,
        stats: Arc<PhaseStats>,
        start: Instant,
        warmup_secs: u64,
    ) -> Progress {
        let tty = std::io::stderr().is_terminal();
        let view = ProgressView {
            phase,
            stats,
            start,
            warmup_secs,
        };
        let printer = view.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await; // the first tick is immediate
            loop {
                tick.tick().await;
                print_progress(&printer.line(), tty);
            }
        });
        Progress { task, view, tty }
    }

    /// Stops the ticker and prints the phase's final counts.
    pub fn finish(self) {
        self.task.abort();
        print_progress(&self.view.line(), self.tty);
        if self.tty {
            eprintln!();
        }
    }
}

fn print_progress(line: &str, tty: bool) {
    if tty {
        eprint!("\r{line}\x1b[K");
    } else {
        eprintln!("{line}");
    }
}

/// What the progress line shows.
#[derive(Clone)]
struct ProgressView {
    phase: &'static str,
    stats: Arc<PhaseStats>,
    start: Instant,
    warmup_secs: u64,
}

impl ProgressView {
    fn line(&self) -> String {
        let secs = self.start.elapsed().as_secs_f64();
        let warming_up = secs < self.warmup_secs as f64;
        let p99 = {
            let detail = self.stats.detail();
            if detail.latency.is_empty() {
                "-".to_string()
            } else {
                let us = detail.latency.value_at_quantile(0.99);
                format!("{:.2} ms", us as f64 / 1000.0)
            }
        };
        let stats = &self.stats;
        format!(
            "[{}{} {secs:5.1}s] sent {} | 202 {} | errors {} | in flight {} | p99 {p99}",
            self.phase,
            if warming_up { " (warm-up)" } else { "" },
            stats.sent.load(Ordering::Relaxed),
            stats.accepted.load(Ordering::Relaxed),
            stats.errors.load(Ordering::Relaxed),
            stats.in_flight.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_labelled_by_status() {
        assert!(Outcome::Status(202).is_accepted());
        assert!(!Outcome::Status(429).is_accepted());
        assert_eq!(Outcome::Status(503).label(), "503");
        assert_eq!(Outcome::Timeout.label(), "timeout");
    }
}
