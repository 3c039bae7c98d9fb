//! The `hotpath` command's pieces, as a library so the integration tests start exactly what
//! the command starts.

// Small functions read as their steps (see clippy.toml).
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

pub mod delivery_runtime;
pub mod dlq;
pub mod nats_target;
pub mod policy;
pub mod prepared;
pub mod replay;
pub mod roles;
pub mod topology;
pub mod up;
