//! The HTTP API, one file per resource (and the WebSocket upgrade, `ws`; the web client's
//! files, `webclient`).

pub mod blocks;
pub mod conversations;
pub mod devices;
pub mod health;
pub mod send;
pub mod status;
pub mod webclient;
pub mod ws;
