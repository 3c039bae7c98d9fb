//! `hotpath-bench`: the binary; everything it does is in the library (`lib.rs`).

use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    hotpath_core::telemetry::init_tracing();
    hotpath_core::tls::install_crypto_provider();
    hotpath_bench::main_with(hotpath_bench::Cli::parse()).await
}
