//! `hotpath-bench` against a real stack (testkit: nats-server, Postgres, gateway and consumers
//! in-process): its WebSocket transport sends `send` frames, each answered `send.ack` for a
//! message that is stored.

use hotpath_testkit as support;

use std::time::{Duration, Instant};

use clap::Parser as _;
use serde_json::Value;
use support::System;
use support::ws::PATIENCE;

/// A short soak over `--transport ws` (no capacity phase, 20 msg/s for 2 s, 4 users, so 4
/// sockets): the soak checks every accepted `messageId` (read from the `send.ack` frames)
/// against Postgres.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_sends_over_websockets_and_every_ack_is_a_stored_row() {
    let system = System::start().await;
    let out = system.servers.dir.path().join("soak.json");
    let cli = hotpath_bench::Cli::parse_from([
        "hotpath-bench",
        "--gateway",
        &system.base,
        "--nats-url",
        &system.config.nats_url,
        "--database-url",
        &system.config.database_url,
        "--jwt-secret",
        support::SECRET,
        "--transport",
        "ws",
        "--rate",
        "20",
        "--users",
        "4",
        "--conversations",
        "2",
        "--capacity-secs",
        "0",
        "--soak-rate",
        "20",
        "--soak-secs",
        "2",
        "--out",
        out.to_str().expect("utf-8 path"),
    ]);

    let outcome = hotpath_bench::main_with(cli).await;

    let report: Value =
        serde_json::from_slice(&std::fs::read(&out).expect("soak.json")).expect("json");
    outcome.unwrap_or_else(|error| panic!("the soak passes: {error:#}\n{report:#}"));
    assert_eq!(report["transport"], "ws", "{report:#}");
    assert_eq!(report["load"]["transport"], "ws", "{report:#}");
    let sockets = &report["sender_sockets"];
    assert_eq!(sockets["sockets"], 4, "one socket per user: {report:#}");
    assert_eq!(sockets["reconnects"], 0, "{report:#}");
    assert_eq!(
        report["load"]["outcomes"],
        serde_json::json!({"202": 40}),
        "every send got a send.ack: {report:#}"
    );
    let verdict = &report["verdict"];
    assert_eq!(verdict["accepted"], 40, "{report:#}");
    assert_eq!(verdict["lost"], 0, "{report:#}");
    assert_eq!(verdict["duplicated"], 0, "{report:#}");
    let (rows,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM messages WHERE sender_id LIKE 'bench-u%'")
            .fetch_one(&system.pool)
            .await
            .expect("count");
    assert_eq!(rows, 40);
    // The bench sent its close frames before it returned; the gateway counts each once it
    // has read it.
    let closed = |metrics: &str| {
        support::metric_sum(
            metrics,
            "websocket_connections_closed_total",
            "client_closed",
        )
    };
    let deadline = Instant::now() + PATIENCE;
    let mut metrics = system.metrics().await;
    while closed(&metrics) < 4.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        metrics = system.metrics().await;
    }
    assert_eq!(
        closed(&metrics),
        4.0,
        "the bench closed its 4 sockets: {metrics}"
    );
}
