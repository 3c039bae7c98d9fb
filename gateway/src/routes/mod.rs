//! The HTTP API, one file per resource.

pub mod conversations;
pub mod health;
pub mod send;
pub mod status;
