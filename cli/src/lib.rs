//! The `hotpath` command's pieces, as a library so the integration tests start exactly what
//! the command starts.

pub mod bench;
pub mod dlq;
pub mod policy;
pub mod replay;
pub mod roles;
pub mod up;
