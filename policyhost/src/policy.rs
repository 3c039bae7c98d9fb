//! A loaded policy, and one evaluation of it in the sandbox.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hotpath_core::rejection::{PolicyCode, Rejection};
use rustix::time::{ClockId, clock_gettime};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use wasmtime::{
    Extern, Instance, InstancePre, Module, ModuleExport, ResourceLimiter, Store, Trap, TypedFunc,
    UpdateDeadline, WasmParams, WasmResults,
};

use crate::engine::{TICK, Ticker};
use crate::{DEADLINE, MAX_MEMORY_BYTES, MAX_MESSAGE_CHARS, MAX_OUTPUT_BYTES, WALL_DEADLINE};

/// What happens to a message when its policy fails (traps, misses its deadline, answers
/// nonsense): rejected with 403 `FORBIDDEN` (fail-closed, the default), or let through.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    #[default]
    Deny,
    Allow,
}

/// A compiled, checked policy, ready to evaluate; cheap to clone and share between threads.
#[derive(Clone)]
pub struct Policy {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    digest: String,
    on_error: OnError,
    pre: InstancePre<StoreState>,
    exports: Exports,
    /// Keeps the epoch advancing while this policy can run, even after its engine is dropped.
    _ticker: Arc<Ticker>,
}

/// What [`crate::PolicyEngine::load`] assembles into a [`Policy`].
pub(crate) struct PolicyParts {
    pub name: String,
    pub digest: String,
    pub on_error: OnError,
    pub pre: InstancePre<StoreState>,
    pub exports: Exports,
    pub ticker: Arc<Ticker>,
}

/// The ABI's exports, resolved once at load so an evaluation looks them up without strings.
pub(crate) struct Exports {
    memory: ModuleExport,
    abi_version: ModuleExport,
    alloc: ModuleExport,
    validate: ModuleExport,
}

impl Exports {
    /// The exports of `module`, or the name of the first one missing.
    pub(crate) fn of(module: &Module) -> Result<Exports, &'static str> {
        let get = |name: &'static str| module.get_export_index(name).ok_or(name);
        Ok(Exports {
            memory: get("memory")?,
            abi_version: get("hotpath_abi_version")?,
            alloc: get("hotpath_alloc")?,
            validate: get("hotpath_validate")?,
        })
    }
}

/// The per-evaluation store's data: the memory limiter and the time budget.
pub(crate) struct StoreState {
    limiter: MemoryLimiter,
    budget: Budget,
}

/// One evaluation's time budget: [`DEADLINE`] of the evaluating thread's CPU time while the
/// module's code runs, and at most [`WALL_DEADLINE`] of wall clock from the start of
/// instantiation. Checked only when the epoch deadline comes (10 ms after the start, then
/// whenever the rest of the budget could have been spent), so a healthy evaluation pays two
/// clock reads.
///
/// The CPU window opens at [`Budget::module_runs`], after instantiation: setting up an
/// instance's memory (`mprotect`, copy-on-write faults, TLB shootdowns) is the host's work, and
/// on a busy many-threaded host it can take milliseconds that no policy asked for. The clock is
/// the kernel's exact per-thread CPU clock, user and system time together: `getrusage`'s
/// user-mode split is estimated from timer-tick samples and, over a window of a few
/// milliseconds, can charge a policy for kernel time it never caused.
///
/// Reading the thread's CPU clock is a system call (it is not in the vDSO), so it is read once
/// per evaluation to open the window, not also at the start of instantiation.
struct Budget {
    /// The thread's CPU time when the module's code started; `None` until then.
    cpu_start: Option<Duration>,
    wall_start: Instant,
    /// Which limit interrupted the evaluation, if one did.
    exceeded: Option<Limit>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Limit {
    Cpu,
    Wall,
}

impl Budget {
    fn start() -> Budget {
        Budget {
            cpu_start: None,
            wall_start: Instant::now(),
            exceeded: None,
        }
    }

    /// The instance is ready and the module's code is about to run: the CPU window opens.
    fn module_runs(&mut self) {
        self.cpu_start = Some(thread_cpu_time());
    }

    /// The epoch deadline came: interrupt, or move the deadline to when the rest of the CPU
    /// budget could be spent if the thread ran all the time.
    fn on_epoch_deadline(&mut self) -> UpdateDeadline {
        let now = thread_cpu_time();
        // A deadline during instantiation (a module's start function): the window opens now.
        let used = now.saturating_sub(*self.cpu_start.get_or_insert(now));
        if used >= DEADLINE {
            self.exceeded = Some(Limit::Cpu);
            return UpdateDeadline::Interrupt;
        }
        if self.wall_start.elapsed() >= WALL_DEADLINE {
            self.exceeded = Some(Limit::Wall);
            return UpdateDeadline::Interrupt;
        }
        UpdateDeadline::Continue(ticks(DEADLINE - used))
    }
}

/// The CPU time the calling thread has used so far (`CLOCK_THREAD_CPUTIME_ID`).
fn thread_cpu_time() -> Duration {
    let now = clock_gettime(ClockId::ThreadCPUTime);
    Duration::new(
        u64::try_from(now.tv_sec).unwrap_or(0),
        u32::try_from(now.tv_nsec).unwrap_or(0),
    )
}

/// Whole epoch ticks covering `time` (at least one).
fn ticks(time: Duration) -> u64 {
    let ticks = time.as_nanos().div_ceil(TICK.as_nanos()).max(1);
    u64::try_from(ticks).unwrap_or(u64::MAX)
}

/// Caps linear memory at [`MAX_MEMORY_BYTES`], and makes hitting the cap end the evaluation.
///
/// The WebAssembly specification has a refused `memory.grow` return -1 and carry on, which
/// would let a module that ran into the cap still answer "allow" (an allocator that gives up
/// quietly, a policy that skips the check it had no room for). The ABI says hitting the cap is
/// a failure, so a refused growth traps on the spot, as wasmtime's own `StoreLimits` does with
/// `trap_on_grow_failure`: the module cannot answer after it, and no CPU is spent on a module
/// that keeps asking. `refused` keeps why, so [`failure`] reports a memory failure in plain words
/// rather than a trap with a backtrace. The pooling allocator enforces the same cap; this is
/// what lets us see it happen.
#[derive(Default)]
struct MemoryLimiter {
    refused: Option<String>,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > MAX_MEMORY_BYTES {
            let reason = format!(
                "memory.grow to {desired} bytes refused: the cap is {} MiB",
                MAX_MEMORY_BYTES >> 20
            );
            self.refused = Some(reason.clone());
            wasmtime::bail!(reason);
        }
        Ok(true)
    }

    /// Growth within the cap that still failed (past the module's own declared maximum, or the
    /// operating system out of memory) is a memory failure all the same.
    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        let reason = format!(
            "memory growth failed within the {} MiB cap: {error:#}",
            MAX_MEMORY_BYTES >> 20
        );
        self.refused = Some(reason.clone());
        wasmtime::bail!(reason)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        _desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Tables are bounded by the pool's per-table element limit.
        Ok(true)
    }
}

impl Policy {
    pub(crate) fn new(parts: PolicyParts) -> Policy {
        Policy {
            inner: Arc::new(Inner {
                name: parts.name,
                digest: parts.digest,
                on_error: parts.on_error,
                pre: parts.pre,
                exports: parts.exports,
                _ticker: parts.ticker,
            }),
        }
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The SHA-256 of the module's bytes, lowercase hex.
    pub fn digest(&self) -> &str {
        &self.inner.digest
    }

    pub fn on_error(&self) -> OnError {
        self.inner.on_error
    }

    /// Evaluates one input (the ABI's input JSON, see [`crate::input_json`]).
    ///
    /// Every call gets a fresh instance, so nothing a policy does can leak into the next
    /// evaluation (no state, no leaked memory, no half-finished work after a trap) and a policy
    /// needs no deallocation. With the pooling allocator and a pre-linked template, that costs a
    /// few microseconds. The call is bounded by the time budget ([`DEADLINE`] of CPU,
    /// [`WALL_DEADLINE`] of wall clock, instantiation included) and the 16 MiB memory cap, and
    /// never panics: whatever the module does is an [`Evaluation`].
    ///
    /// The module runs on the calling thread, within a 512 KiB slice of its stack: any thread
    /// with the usual 2 MiB stack will do.
    pub fn evaluate(&self, input: &[u8]) -> Evaluation {
        self.run(input).unwrap_or_else(Evaluation::Failed)
    }

    /// Calls `hotpath_abi_version` on a fresh instance.
    pub(crate) fn abi_version(&self) -> Result<i32, Failure> {
        let (mut store, instance) = self.instantiate()?;
        let abi_version =
            typed_func::<(), i32>(&mut store, &instance, &self.inner.exports.abi_version)?;
        abi_version
            .call(&mut store, ())
            .map_err(|error| failure(&store, error))
    }

    /// A new store with its time budget and memory limit set, and a fresh instance in it.
    fn instantiate(&self) -> Result<(Store<StoreState>, Instance), Failure> {
        let state = StoreState {
            limiter: MemoryLimiter::default(),
            budget: Budget::start(),
        };
        let mut store = Store::new(self.inner.pre.module().engine(), state);
        store.limiter(|state| &mut state.limiter);
        store.set_epoch_deadline(ticks(DEADLINE));
        store.epoch_deadline_callback(|mut store| Ok(store.data_mut().budget.on_epoch_deadline()));
        match self.inner.pre.instantiate(&mut store) {
            Ok(instance) => {
                store.data_mut().budget.module_runs();
                Ok((store, instance))
            }
            Err(error) => Err(failure(&store, error)),
        }
    }

    fn run(&self, input: &[u8]) -> Result<Evaluation, Failure> {
        let len = match i32::try_from(input.len()) {
            Ok(len) if input.len() <= MAX_MEMORY_BYTES => len,
            _ => {
                return Err(Failure::new(
                    FailureKind::Memory,
                    format!(
                        "the input ({} bytes) exceeds a policy's memory",
                        input.len()
                    ),
                ));
            }
        };
        let (mut store, instance) = self.instantiate()?;
        let exports = &self.inner.exports;
        let memory = instance
            .get_module_export(&mut store, &exports.memory)
            .and_then(Extern::into_memory)
            .ok_or_else(|| Failure::new(FailureKind::Trap, "export `memory` is unavailable"))?;
        let alloc = typed_func::<i32, i32>(&mut store, &instance, &exports.alloc)?;
        let validate = typed_func::<(i32, i32), i64>(&mut store, &instance, &exports.validate)?;

        let ptr = alloc
            .call(&mut store, len)
            .map_err(|error| failure(&store, error))?;
        if ptr == 0 && len > 0 {
            return Err(Failure::new(
                FailureKind::Memory,
                format!("hotpath_alloc({len}) returned 0"),
            ));
        }
        memory
            .write(&mut store, ptr as u32 as usize, input)
            .map_err(|_| {
                Failure::new(
                    FailureKind::BadOutput,
                    format!(
                        "hotpath_alloc({len}) returned {ptr:#x}, not {len} bytes inside memory"
                    ),
                )
            })?;

        let packed = validate
            .call(&mut store, (ptr, len))
            .map_err(|error| failure(&store, error))? as u64;
        let out_ptr = (packed >> 32) as usize;
        let out_len = (packed & 0xffff_ffff) as usize;
        if out_len > MAX_OUTPUT_BYTES {
            return Err(Failure::new(
                FailureKind::BadOutput,
                format!("output of {out_len} bytes exceeds the {MAX_OUTPUT_BYTES}-byte limit"),
            ));
        }
        let output = out_ptr
            .checked_add(out_len)
            .and_then(|end| memory.data(&store).get(out_ptr..end))
            .ok_or_else(|| {
                Failure::new(
                    FailureKind::BadOutput,
                    format!(
                        "output at {out_ptr:#x} (+{out_len} bytes) lies outside memory ({} bytes)",
                        memory.data_size(&store)
                    ),
                )
            })?;
        self.interpret(output)
    }

    /// Reads the output JSON (`policies/ABI.md`, "Output").
    fn interpret(&self, output: &[u8]) -> Result<Evaluation, Failure> {
        let malformed = |detail: String| Failure::new(FailureKind::Malformed, detail);
        let output: Output = serde_json::from_slice(output)
            .map_err(|e| malformed(format!("output is not the ABI's JSON: {e}")))?;
        match output.verdict.as_str() {
            "allow" => match output.request {
                None => Ok(Evaluation::Allow),
                Some(request @ Value::Object(_)) => Ok(Evaluation::AllowNormalized(request)),
                Some(other) => Err(malformed(format!(
                    "the normalised request must be a JSON object, not {}",
                    json_type(&other)
                ))),
            },
            "reject" => {
                let wire = output
                    .code
                    .ok_or_else(|| malformed("a rejection without a code".to_owned()))?;
                let code = PolicyCode::from_wire(&wire).ok_or_else(|| {
                    malformed(format!("code {wire:?} is not one a policy may give"))
                })?;
                let message = match output.message {
                    Some(message) if message.chars().count() > MAX_MESSAGE_CHARS => {
                        return Err(malformed(format!(
                            "message longer than {MAX_MESSAGE_CHARS} characters"
                        )));
                    }
                    Some(message) => message,
                    None => format!("rejected by policy {}", self.name()),
                };
                let details = match output.details {
                    None => Value::Object(Map::new()),
                    Some(details @ Value::Object(_)) => details,
                    Some(other) => {
                        return Err(malformed(format!(
                            "details must be a JSON object, not {}",
                            json_type(&other)
                        )));
                    }
                };
                Ok(Evaluation::Reject(Rejection::Policy {
                    code,
                    message,
                    details,
                }))
            }
            // The ABI's convention for a policy that met something it cannot judge (a host
            // bug, such as unreadable input): a failure, with the policy's words in the log.
            "error" => {
                let message: String = output
                    .message
                    .unwrap_or_default()
                    .chars()
                    .take(MAX_MESSAGE_CHARS)
                    .collect();
                Err(malformed(format!(
                    "the policy reported an error: {message}"
                )))
            }
            other => Err(malformed(format!(
                "unknown verdict {:?}",
                other.chars().take(100).collect::<String>()
            ))),
        }
    }
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field("name", &self.inner.name)
            .field("digest", &self.inner.digest)
            .field("on_error", &self.inner.on_error)
            .finish_non_exhaustive()
    }
}

/// The output JSON as the ABI defines it; unknown fields are ignored, `null` is absent.
#[derive(Deserialize)]
struct Output {
    verdict: String,
    code: Option<String>,
    message: Option<String>,
    details: Option<Value>,
    request: Option<Value>,
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A typed handle on an export that load already checked; failing here would be a host bug,
/// reported as a failure rather than a panic all the same.
fn typed_func<P: WasmParams, R: WasmResults>(
    store: &mut Store<StoreState>,
    instance: &Instance,
    export: &ModuleExport,
) -> Result<TypedFunc<P, R>, Failure> {
    instance
        .get_module_export(&mut *store, export)
        .and_then(Extern::into_func)
        .ok_or_else(|| {
            Failure::new(
                FailureKind::Trap,
                "a required function export is unavailable",
            )
        })?
        .typed::<P, R>(&*store)
        .map_err(|e| Failure::new(FailureKind::Trap, format!("{e:#}")))
}

/// Classifies an error from instantiating or calling into the module. A refused memory growth
/// is the trap [`MemoryLimiter`] raised, whatever wasmtime wrapped it in.
fn failure(store: &Store<StoreState>, error: wasmtime::Error) -> Failure {
    if let Some(reason) = &store.data().limiter.refused {
        return Failure::new(FailureKind::Memory, reason.clone());
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => Failure::new(
            FailureKind::Deadline,
            match store.data().budget.exceeded {
                Some(Limit::Wall) => {
                    format!("still running after {} ms", WALL_DEADLINE.as_millis())
                }
                Some(Limit::Cpu) | None => {
                    format!("used its {} ms of CPU", DEADLINE.as_millis())
                }
            },
        ),
        Some(trap) => Failure::new(FailureKind::Trap, trap.to_string()),
        None => Failure::new(FailureKind::Trap, format!("{error:#}")),
    }
}

/// The outcome of one evaluation.
#[derive(Debug, Clone, PartialEq)]
pub enum Evaluation {
    Allow,
    /// Allow, with the request replaced by this (always a JSON object) for the policies after
    /// this one and for the publish.
    AllowNormalized(Value),
    /// A [`Rejection::Policy`] with a code from the ABI's table.
    Reject(Rejection),
    /// The policy broke: see [`Evaluation::decide`] for what that means for the message.
    Failed(Failure),
}

/// What happens to the message: an [`Evaluation`] with failures resolved per [`OnError`].
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Allow,
    AllowNormalized(Value),
    Reject(Rejection),
}

impl Evaluation {
    /// Resolves a failure per the policy's `on_error`: `Deny` (fail-closed) rejects with
    /// [`Failure::rejection`], `Allow` lets the message through unchanged. Anything else is
    /// passed on as it is. Count and log the failure before calling this; it is gone after.
    pub fn decide(self, policy: &Policy) -> Decision {
        match self {
            Evaluation::Allow => Decision::Allow,
            Evaluation::AllowNormalized(request) => Decision::AllowNormalized(request),
            Evaluation::Reject(rejection) => Decision::Reject(rejection),
            Evaluation::Failed(failure) => match policy.on_error() {
                OnError::Deny => Decision::Reject(failure.rejection(policy.name())),
                OnError::Allow => Decision::Allow,
            },
        }
    }
}

/// Why an evaluation produced no verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    /// For logs and `policy test` output; never sent to clients.
    pub detail: String,
}

impl Failure {
    pub fn new(kind: FailureKind, detail: impl Into<String>) -> Failure {
        Failure {
            kind,
            detail: detail.into(),
        }
    }

    /// The fail-closed rejection: 403 `FORBIDDEN`, `details: {"policy", "failure"}`. The detail
    /// stays in the logs: it may describe the module's internals.
    pub fn rejection(&self, policy_name: &str) -> Rejection {
        Rejection::Policy {
            code: PolicyCode::Forbidden,
            message: format!("policy {policy_name} failed"),
            details: json!({ "policy": policy_name, "failure": self.kind.as_str() }),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.detail)
    }
}

/// The classes of [`Failure`], one per `kind` label of `policy_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The module trapped (`unreachable`, an out-of-bounds access, a stack overflow...), or could
    /// not be instantiated.
    Trap,
    /// The evaluation used its 10 ms of CPU (or hit the 250 ms wall-clock backstop) and was
    /// interrupted.
    Deadline,
    /// The module needed more than its 16 MiB (or could not allocate room for the input).
    Memory,
    /// The output is not the ABI's JSON: not JSON, an unknown verdict or code, a message too
    /// long, details or a normalised request that is not an object; or the policy answered
    /// `{"verdict": "error"}`, the ABI's way for a policy to report that it cannot judge.
    Malformed,
    /// A pointer or length the module returned lies outside its memory, or the output is over
    /// 64 KiB.
    BadOutput,
}

impl FailureKind {
    /// Every kind, for exporting each one's count before it first happens.
    pub const ALL: [FailureKind; 5] = [
        FailureKind::Trap,
        FailureKind::Deadline,
        FailureKind::Memory,
        FailureKind::Malformed,
        FailureKind::BadOutput,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Trap => "trap",
            FailureKind::Deadline => "deadline",
            FailureKind::Memory => "memory",
            FailureKind::Malformed => "malformed",
            FailureKind::BadOutput => "bad_output",
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spins on the calling thread until it has used `cpu` of CPU time.
    fn burn(cpu: Duration) {
        let start = thread_cpu_time();
        while thread_cpu_time().saturating_sub(start) < cpu {
            std::hint::black_box(Instant::now());
        }
    }

    #[test]
    fn the_host_cpu_spent_before_the_module_runs_is_not_charged_to_it() {
        let mut budget = Budget::start();
        // Instantiation on a busy host: kernel and host work on the evaluating thread.
        burn(DEADLINE + Duration::from_millis(5));
        budget.module_runs();
        assert!(matches!(
            budget.on_epoch_deadline(),
            UpdateDeadline::Continue(_)
        ));
        assert_eq!(budget.exceeded, None);
    }

    #[test]
    fn the_cpu_the_module_spends_is_charged_to_it() {
        let mut budget = Budget::start();
        budget.module_runs();
        burn(DEADLINE + Duration::from_millis(1));
        assert!(matches!(
            budget.on_epoch_deadline(),
            UpdateDeadline::Interrupt
        ));
        assert_eq!(budget.exceeded, Some(Limit::Cpu));
    }
}
