//! The compiler and sandbox configuration shared by every policy, and loading a module.

use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::Duration;

use anyhow::Context;
use sha2::{Digest, Sha256};
use wasmtime::{
    Config, Enabled, Engine, ExternType, FuncType, InstanceAllocationStrategy, Linker, Module,
    PoolingAllocationConfig, ProfilingStrategy,
};

use crate::policy::{Exports, OnError, Policy, PolicyParts, StoreState};
use crate::{ABI_VERSION, Failure, MAX_MEMORY_BYTES};

/// How often the ticker advances the engine's epoch: the granularity of the deadline.
pub(crate) const TICK: Duration = Duration::from_millis(1);

/// How many instances (and so linear memories) may be live at once across all policies of an
/// engine. An instance lives for one evaluation, so this bounds concurrent evaluations, which
/// the gateway's threads bound far lower. Each slot costs address space, not memory.
const POOL_SLOTS: u32 = 1000;

/// Linear memory (and table) bytes a freed slot keeps mapped, reset to their initial contents
/// in place, instead of being handed back to the kernel and faulted in again by the next
/// instance. A Rust policy touches its 1 MiB stack and a little heap; with `PAGEMAP_SCAN`
/// (Linux 6.7+) only the pages actually dirtied are reset. Halves the cost of an evaluation
/// here, at the price of this much resident memory per warm slot.
const KEEP_RESIDENT_MEMORY_BYTES: usize = 2 << 20;
const KEEP_RESIDENT_TABLE_BYTES: usize = 64 << 10;

/// Unmapped bytes after each linear memory, so accesses at a constant offset past a checked
/// index need no bounds check of their own.
const MEMORY_GUARD_BYTES: u64 = 2 << 20;

/// Compiles and loads policies; owns the sandbox configuration they all run under.
///
/// * **Epoch interruption** bounds time: compiled code checks the engine's epoch at function
///   entries and loop back-edges, a cheap load and compare, far less than fuel metering's
///   per-instruction accounting. One background thread advances the epoch every millisecond.
///   When an evaluation's epoch deadline comes, the store asks how much CPU the evaluating
///   thread has actually used: past [`crate::DEADLINE`] (or past [`crate::WALL_DEADLINE`] of
///   wall clock) it is interrupted, otherwise the deadline moves to when the rest of the budget
///   could be spent. A healthy policy preempted on a busy host is therefore not failed, which
///   a pure wall-clock deadline would do whenever the thread waits 10 ms for a core.
/// * **The pooling allocator** makes a fresh instance per evaluation cheap: linear memories,
///   tables and instance metadata are preallocated slots that are reset and reused (copy-on-write
///   images for data segments) instead of being mapped and unmapped per request. Each memory slot
///   reserves only [`MAX_MEMORY_BYTES`] plus a guard, so the pool's address-space reservation
///   stays near 20 GiB rather than the terabytes of the default 4 GiB-per-memory layout, at the
///   price of explicit bounds checks in compiled code.
///
/// Cloning the engine or a [`Policy`] is cheap: clones share the compiler, the compiled code and
/// the ticker.
#[derive(Clone)]
pub struct PolicyEngine {
    engine: Engine,
    ticker: Arc<Ticker>,
}

impl PolicyEngine {
    pub fn new() -> anyhow::Result<PolicyEngine> {
        PolicyEngine::build(false)
    }

    /// An engine that also writes `/tmp/perf-<pid>.map` as it compiles, so `perf report` names
    /// the policies' compiled functions (from the module's name section: build it unstripped)
    /// instead of showing bare addresses. For profiling (`hotpath policy bench --perf-map`);
    /// the server never turns it on.
    pub fn with_perf_map() -> anyhow::Result<PolicyEngine> {
        PolicyEngine::build(true)
    }

    fn build(perf_map: bool) -> anyhow::Result<PolicyEngine> {
        let mut pool = PoolingAllocationConfig::new();
        pool.total_core_instances(POOL_SLOTS)
            .total_memories(POOL_SLOTS)
            .total_tables(POOL_SLOTS)
            .max_memory_size(MAX_MEMORY_BYTES)
            .linear_memory_keep_resident(KEEP_RESIDENT_MEMORY_BYTES)
            .table_keep_resident(KEEP_RESIDENT_TABLE_BYTES)
            .pagemap_scan(Enabled::Auto);

        let mut config = Config::new();
        config
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .memory_reservation(MAX_MEMORY_BYTES as u64)
            .memory_guard_size(MEMORY_GUARD_BYTES);
        if perf_map {
            config.profiler(ProfilingStrategy::PerfMap);
        }

        let engine = Engine::new(&config)
            .map_err(anyhow::Error::from)
            .context("configuring the WebAssembly engine (pooling allocator)")?;
        let ticker = Ticker::start(engine.clone()).context("starting the epoch ticker thread")?;
        Ok(PolicyEngine {
            engine,
            ticker: Arc::new(ticker),
        })
    }

    /// Compiles `bytes` and checks the module against the ABI: no imports, the required exports
    /// with the right types, and `hotpath_abi_version() == 1` (checked by instantiating it once,
    /// under the same limits as an evaluation).
    ///
    /// Compiling is CPU-heavy (milliseconds to seconds for a large module): callers keep it off
    /// the request path, e.g. in `spawn_blocking`.
    pub fn load(&self, name: &str, bytes: &[u8], on_error: OnError) -> Result<Policy, LoadError> {
        let module =
            Module::new(&self.engine, bytes).map_err(|e| LoadError::Compile(format!("{e:#}")))?;

        let imports: Vec<String> = module
            .imports()
            .map(|import| format!("{}.{}", import.module(), import.name()))
            .collect();
        if !imports.is_empty() {
            return Err(LoadError::Imports(imports));
        }
        check_exports(&module)?;

        let exports = Exports::of(&module).map_err(LoadError::MissingExport)?;
        let pre = Linker::<StoreState>::new(&self.engine)
            .instantiate_pre(&module)
            .map_err(|e| LoadError::Instantiate(format!("{e:#}")))?;
        let policy = Policy::new(PolicyParts {
            name: name.to_owned(),
            digest: hex::encode(Sha256::digest(bytes)),
            on_error,
            pre,
            exports,
            ticker: Arc::clone(&self.ticker),
        });
        let found = policy.abi_version().map_err(LoadError::AbiCall)?;
        if found != ABI_VERSION {
            return Err(LoadError::AbiVersion { found });
        }
        Ok(policy)
    }
}

/// Why a module was refused at load.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("the module does not compile: {0}")]
    Compile(String),
    #[error("the module imports {}; a policy may import nothing", .0.join(", "))]
    Imports(Vec<String>),
    #[error("the module does not export `{0}`")]
    MissingExport(&'static str),
    #[error("export `{name}` must be {expected}, found {found}")]
    WrongExport {
        name: &'static str,
        expected: &'static str,
        found: String,
    },
    #[error("the module cannot be instantiated: {0}")]
    Instantiate(String),
    #[error("the module failed its trial instantiation and hotpath_abi_version() call: {0}")]
    AbiCall(Failure),
    #[error("hotpath_abi_version() returned {found}; this host speaks ABI version {ABI_VERSION}")]
    AbiVersion { found: i32 },
}

/// The exports the ABI requires, with their types as [`signature`] writes them.
const REQUIRED_FUNCS: [(&str, &str); 3] = [
    ("hotpath_abi_version", "() -> (i32)"),
    ("hotpath_alloc", "(i32) -> (i32)"),
    ("hotpath_validate", "(i32, i32) -> (i64)"),
];

fn check_exports(module: &Module) -> Result<(), LoadError> {
    match module.get_export("memory") {
        Some(ExternType::Memory(memory)) if !memory.is_64() && !memory.is_shared() => {}
        Some(ExternType::Memory(_)) => {
            return Err(LoadError::WrongExport {
                name: "memory",
                expected: "a 32-bit unshared memory",
                found: "a 64-bit or shared memory".to_owned(),
            });
        }
        Some(other) => {
            return Err(LoadError::WrongExport {
                name: "memory",
                expected: "a memory",
                found: describe(&other),
            });
        }
        None => return Err(LoadError::MissingExport("memory")),
    }
    for (name, expected) in REQUIRED_FUNCS {
        match module.get_export(name) {
            Some(ExternType::Func(func)) if signature(&func) == expected => {}
            Some(other) => {
                return Err(LoadError::WrongExport {
                    name,
                    expected,
                    found: describe(&other),
                });
            }
            None => return Err(LoadError::MissingExport(name)),
        }
    }
    Ok(())
}

fn signature(func: &FuncType) -> String {
    let join = |types: Vec<String>| types.join(", ");
    format!(
        "({}) -> ({})",
        join(func.params().map(|t| t.to_string()).collect()),
        join(func.results().map(|t| t.to_string()).collect())
    )
}

fn describe(export: &ExternType) -> String {
    match export {
        ExternType::Func(func) => format!("a function {}", signature(func)),
        ExternType::Memory(_) => "a memory".to_owned(),
        ExternType::Table(_) => "a table".to_owned(),
        ExternType::Global(_) => "a global".to_owned(),
        ExternType::Tag(_) => "a tag".to_owned(),
    }
}

/// Advances the engine's epoch every [`TICK`] on a background thread, for as long as the
/// engine or any policy compiled by it is alive (each holds an `Arc` of the ticker): a policy
/// outliving its engine must still be interrupted. Dropping the last `Arc` drops the sender,
/// which ends the thread within one tick.
pub(crate) struct Ticker {
    _stop: mpsc::Sender<()>,
}

impl Ticker {
    fn start(engine: Engine) -> std::io::Result<Ticker> {
        let (stop, stopped) = mpsc::channel::<()>();
        thread::Builder::new()
            .name("policy-epoch".to_owned())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(TICK) {
                    engine.increment_epoch();
                }
            })?;
        Ok(Ticker { _stop: stop })
    }
}
