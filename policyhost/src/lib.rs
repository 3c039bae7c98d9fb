//! The host side of Hotpath's WebAssembly policies (`policies/ABI.md`, version 1).
//!
//! A policy is a core WebAssembly module that sees one send (the request plus the facts the
//! gateway holds) and answers allow, allow-with-a-normalised-request, or reject with one of the
//! codes policies may give. This crate is everything between the gateway and such a module:
//!
//! * [`PolicyEngine::load`] compiles a module once and checks it against the ABI (no imports,
//!   the required exports with the right types, `hotpath_abi_version() == 1`), giving a
//!   [`Policy`] that is cheap to clone and share across threads.
//! * [`Policy::evaluate`] runs one evaluation on a fresh instance and classifies the answer as
//!   an [`Evaluation`]. It never panics and is bounded in time (10 ms of CPU, 250 ms of wall
//!   clock at worst) and memory (16 MiB of linear memory, 64 KiB of output): a hostile or
//!   broken module is a [`Failure`], never a crashed or hung gateway.
//! * [`Evaluation::decide`] turns a failure into the policy's configured [`OnError`] outcome:
//!   fail-closed 403 `FORBIDDEN` by default.
//! * [`input_json`] builds the ABI input, so the gateway and the tests build it the same way.
//! * [`run_vectors`] runs a policy's test vectors, the gate before a module is activated.

// Small functions read as their steps (see clippy.toml).
#![cfg_attr(not(test), warn(clippy::too_many_lines))]
#![forbid(unsafe_code)]

mod engine;
mod input;
mod policy;
mod vectors;

pub use engine::{LoadError, PolicyEngine};
pub use input::{ConversationInput, input_json};
pub use policy::{Decision, Evaluation, Failure, FailureKind, OnError, Policy};
pub use vectors::{VectorFailure, VectorReport, VectorsError, run_vectors};

use std::time::Duration;

/// The ABI version this host speaks; a module's `hotpath_abi_version()` must return it.
pub const ABI_VERSION: i32 = 1;

/// The most linear memory one instance may have.
pub const MAX_MEMORY_BYTES: usize = 16 << 20;

/// The largest output a policy may return.
pub const MAX_OUTPUT_BYTES: usize = 64 << 10;

/// The longest `message` a rejecting policy may give, in characters.
pub const MAX_MESSAGE_CHARS: usize = 1000;

/// The CPU budget of one evaluation, measured by the evaluating thread's CPU clock while the
/// module's code runs: time the thread spends descheduled does not count, nor does
/// instantiation (the host's work on the instance's memory), so a busy host does not fail
/// healthy policies. Instantiation is bounded by [`WALL_DEADLINE`].
pub const DEADLINE: Duration = Duration::from_millis(10);

/// The wall-clock backstop: however starved of CPU, an evaluation is interrupted this long after
/// it started, so no request waits on a policy for longer. Generous, because a healthy policy
/// only gets near it on a host so overloaded that its threads wait that long for a core.
pub const WALL_DEADLINE: Duration = Duration::from_millis(250);
