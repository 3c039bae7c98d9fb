//! The consumers' SQL, one module per table, so a schema change touches one place.
//!
//! Plain async functions over a pool or a transaction's connection, each one statement, named
//! for what it does to its table; the callers own the transactions and the reasoning about
//! them (why a batch is exactly once, why a receipt locks its message), and say so in their
//! module docs. A statement that reads several tables lives with the one it is about: the
//! batch insert, which also records rejections and bumps `last_seq`, is in [`messages`].

pub(crate) mod conversations;
pub(crate) mod devices;
pub(crate) mod messages;
pub(crate) mod push_deliveries;
pub(crate) mod receipts;
