//! The small library every Hotpath role links: what a message looks like on the stream
//! ([`envelope`]), where it goes ([`names`]), how its ids are derived ([`ids`]), how a rejection
//! looks on the wire ([`rejection`]), how callers prove who they are ([`auth`]), what connected
//! users are told ([`events`]) and where they are connected ([`presence`]), and the shared
//! plumbing for configuration, telemetry, Postgres and JetStream set-up.

// Small functions read as their steps (see clippy.toml).
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

pub mod announcements;
pub mod auth;
pub mod config;
pub mod db;
pub mod domain;
pub mod envelope;
pub mod events;
pub mod ids;
pub mod names;
pub mod nats_auth;
pub mod policy_store;
pub mod presence;
pub mod receipts;
pub mod rejection;
pub mod stream_copy;
pub mod stream_migration;
pub mod streams;
pub mod telemetry;
pub mod tls;
pub mod trace;
