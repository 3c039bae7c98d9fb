//! The policy chain on the request path, and keeping it in step with NATS.
//!
//! Every send passes the active chain of WebAssembly policies (`policies/ABI.md`): `schema`,
//! `authz`, and whatever operators pushed. [`ActiveChain`] runs them; [`sync`] watches the
//! chain's KV key, compiles and self-tests new modules off the request path, and swaps the
//! whole chain atomically (`ArcSwap`), so a request sees either the old chain or the new one,
//! never a mix, and no request waits for a compile. Policies on trial (shadow, canary) run
//! beside the chain ([`trial`]).

mod chain;
mod metrics;
pub mod sync;
mod trial;

pub use chain::{ActiveChain, Enforcing};
pub use metrics::PolicyMetrics;
pub use trial::DecisionSink;
