//! The socket node: WebSockets of connected users and live delivery to them.
//!
//! ```text
//! delivery consumers ──publish──► deliver.user.<id> (NATS core)
//!                                        │ one subscription per connected user per gateway
//!                                        ▼
//!                           node (registry: user → sockets)
//!                                        │ bounded queue per socket
//!                                        ▼
//!                      connection: writer ──► WebSocket ◄── reader (send, sync, ping, ack)
//! ```
//!
//! [`node`] keeps the registry, the subscriptions and presence; [`connection`] runs one
//! socket; [`commands`] is what each client frame does; [`protocol`] is the frame format;
//! [`sync`] is catch-up from Postgres; [`receipt`] takes delivered/read acks; [`expiry`]
//! closes a socket when its token expires.

pub mod close;
pub mod commands;
pub mod connection;
pub mod expiry;
mod metrics;
pub mod node;
pub mod protocol;
pub mod receipt;
pub mod sync;

pub use node::SocketNode;
