//! `hotpath policy bench`: the shipped chain evaluated on a representative valid message, from
//! one thread or from many at once.
//!
//! Many threads matter because an evaluation's cost is not all in the module: each one takes a
//! fresh instance from the pool, and what the kernel does to set up and reset its memory
//! (`mprotect`, `madvise`, the TLB shootdowns they send to every core running the process)
//! grows with the threads sharing the address space. One thread alone hides most of it.
//!
//! Reported: per policy and for the whole chain (input building included), the wall-clock
//! p50/p99 of one evaluation, and the CPU each chain evaluation cost its thread on average (the
//! thread's CPU clock, user and kernel time), which is what a send pays whether or not the
//! machine has idle cores.

use std::path::Path;
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use hotpath_policy_host::{ConversationInput, OnError, Policy, PolicyEngine, input_json};
use rustix::time::{ClockId, clock_gettime};
use serde_json::{Value, json};

use super::read;

/// The conversation every evaluation is about.
const CONVERSATION_ID: &str = "6f9c1f2e-8d4b-4c1a-9a51-2f2d4c8e7b10";

/// What else the bench does besides timing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Write wasmtime's perf map (`--perf-map`).
    pub perf_map: bool,
    /// Tell the chains another thread preempted from the others (`--preemption`).
    pub preemption: bool,
}

pub fn run(dir: &Path, iterations: u64, threads: usize, options: Options) -> anyhow::Result<()> {
    anyhow::ensure!(threads >= 1, "--threads must be at least 1");
    anyhow::ensure!(iterations >= 1, "--iterations must be at least 1");
    let engine = if options.perf_map {
        PolicyEngine::with_perf_map()?
    } else {
        PolicyEngine::new()?
    };
    let policies: Vec<Policy> = ["schema", "authz"]
        .iter()
        .map(|name| {
            let bytes = read(&dir.join(format!("{name}.wasm")))?;
            Ok(engine.load(name, &bytes, OnError::Deny)?)
        })
        .collect::<anyhow::Result<_>>()?;
    let request = json!({
        "conversationId": CONVERSATION_ID,
        "content": "a".repeat(200),
        "contentType": "text",
        "clientMessageId": "bench-1",
        "metadata": {"replyTo": "x"}
    });
    let members: Vec<String> = (0..24).map(|i| format!("user-{i}")).collect();

    let start = Barrier::new(threads);
    let per_thread: Vec<Samples> = thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    start.wait();
                    evaluate_many(&policies, &request, &members, iterations, options)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().expect("a bench thread panicked"))
            .collect()
    });
    let samples = Samples::merge(per_thread);
    report(&policies, iterations, threads, options, samples);
    Ok(())
}

/// What one thread measured.
struct Samples {
    /// Wall-clock nanoseconds of each evaluation, per policy.
    per_policy: Vec<Vec<u64>>,
    /// Wall-clock nanoseconds of each whole chain, input building included.
    chain: Vec<u64>,
    /// The same, of the chains during which the thread was not preempted (`--preemption`).
    uninterrupted: Vec<u64>,
    /// The CPU the thread used for all of them.
    cpu: Duration,
}

impl Samples {
    fn merge(all: Vec<Samples>) -> Samples {
        let mut merged = Samples {
            per_policy: Vec::new(),
            chain: Vec::new(),
            uninterrupted: Vec::new(),
            cpu: Duration::ZERO,
        };
        for samples in all {
            merged
                .per_policy
                .resize_with(samples.per_policy.len(), Vec::new);
            for (into, from) in merged.per_policy.iter_mut().zip(samples.per_policy) {
                into.extend(from);
            }
            merged.chain.extend(samples.chain);
            merged.uninterrupted.extend(samples.uninterrupted);
            merged.cpu += samples.cpu;
        }
        merged.per_policy.iter_mut().for_each(|n| n.sort_unstable());
        merged.chain.sort_unstable();
        merged.uninterrupted.sort_unstable();
        merged
    }
}

fn evaluate_many(
    policies: &[Policy],
    request: &Value,
    members: &[String],
    iterations: u64,
    options: Options,
) -> Samples {
    let conversation = || ConversationInput {
        id: CONVERSATION_ID,
        kind: "group",
        is_active: true,
        members: members.iter().map(String::as_str).collect(),
    };
    let capacity = usize::try_from(iterations).unwrap_or(0);
    let mut per_policy: Vec<Vec<u64>> = policies
        .iter()
        .map(|_| Vec::with_capacity(capacity))
        .collect();
    let mut chain = Vec::with_capacity(capacity);
    let mut uninterrupted = Vec::new();
    let cpu_start = thread_cpu_time();
    for _ in 0..iterations {
        let switches = options.preemption.then(involuntary_switches).flatten();
        let chain_started = Instant::now();
        // Once per chain, as the gateway does (no shipped policy rewrites the request).
        let input = input_json("user-0", request, Some(conversation()), std::iter::empty());
        for (policy, nanos) in policies.iter().zip(per_policy.iter_mut()) {
            let started = Instant::now();
            let _ = policy.evaluate(&input);
            nanos.push(nanos_since(started));
        }
        let nanos = nanos_since(chain_started);
        chain.push(nanos);
        if switches.is_some() && involuntary_switches() == switches {
            uninterrupted.push(nanos);
        }
    }
    Samples {
        per_policy,
        chain,
        uninterrupted,
        cpu: thread_cpu_time().saturating_sub(cpu_start),
    }
}

/// How often the calling thread has been switched out against its will (`ru_nivcsw` of
/// `RUSAGE_THREAD`): preempted by another thread, not waiting for anything.
fn involuntary_switches() -> Option<i64> {
    // SAFETY: `getrusage` only writes the `rusage` it is given; an all-zero `rusage` is valid.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a `rusage`; RUSAGE_THREAD is the calling thread.
    let status = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
    (status == 0).then_some(usage.ru_nivcsw)
}

fn report(
    policies: &[Policy],
    iterations: u64,
    threads: usize,
    options: Options,
    samples: Samples,
) {
    println!(
        "policy chain evaluation, {iterations} iterations on each of {threads} thread(s), fresh instance per evaluation (input building included in 'chain'):"
    );
    for (policy, nanos) in policies.iter().zip(&samples.per_policy) {
        println!(
            "  {:<8} p50 {:>7.1} µs  p99 {:>7.1} µs",
            policy.name(),
            micros_at(nanos, 0.5),
            micros_at(nanos, 0.99)
        );
    }
    let evaluations = samples.chain.len().max(1) as f64;
    println!(
        "  {:<8} p50 {:>7.1} µs  p99 {:>7.1} µs  CPU {:>6.1} µs per chain (mean)",
        "chain",
        micros_at(&samples.chain, 0.5),
        micros_at(&samples.chain, 0.99),
        samples.cpu.as_secs_f64() * 1e6 / evaluations
    );
    if options.preemption {
        println!(
            "  {:<8} p50 {:>7.1} µs  p99 {:>7.1} µs  of the {:.1}% of chains not preempted",
            "unpreempted",
            micros_at(&samples.uninterrupted, 0.5),
            micros_at(&samples.uninterrupted, 0.99),
            samples.uninterrupted.len() as f64 * 100.0 / evaluations
        );
    }
}

fn nanos_since(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The calling thread's CPU clock: user and kernel time.
fn thread_cpu_time() -> Duration {
    let now = clock_gettime(ClockId::ThreadCPUTime);
    Duration::new(
        u64::try_from(now.tv_sec).unwrap_or(0),
        u32::try_from(now.tv_nsec).unwrap_or(0),
    )
}

/// The `q` quantile (nearest rank) of `sorted` nanoseconds, in microseconds; 0 when empty.
fn micros_at(sorted: &[u64], q: f64) -> f64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).max(1);
    sorted
        .get(rank - 1)
        .map_or(0.0, |&nanos| nanos as f64 / 1000.0)
}
