//! Delivery mode (`--delivery`): WebSocket receivers listen while the latency phase runs, and
//! every `message.new` they get is timed from the moment the gateway accepted the message.
//!
//! * Receivers are the workload's first `--receivers` users, each on one socket
//!   (`/v1/ws?token=…`); the phase starts once every socket answered a ping, i.e. the gateway
//!   registered it and wrote its presence.
//! * Accept → delivered latency is the frame's arrival time minus the message's `acceptedAt`,
//!   which the gateway stamped with the same machine's clock (`hotpath up` and the bench run
//!   side by side). Frames of warm-up messages are counted but not timed.
//! * The senders count, for every accepted send, how many of its recipients are receivers:
//!   frames expected. Receivers count what arrived, so lost live frames show as the
//!   difference.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use futures::{SinkExt as _, StreamExt as _, TryStreamExt as _};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

use super::stats::Percentiles;
use super::workload::Workload;

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Sockets opened at once while connecting.
const CONNECT_CONCURRENCY: usize = 32;
/// Longest wait for one socket to open and answer its first ping.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// After the senders stop: how long receivers wait for the frames still owed...
const SETTLE_LIMIT: Duration = Duration::from_secs(30);
/// ...or for this long without a single new frame.
const SETTLE_QUIET: Duration = Duration::from_secs(3);
/// Longest accept → delivered latency resolved, in µs.
const HISTOGRAM_MAX_US: u64 = 10 * 60 * 1_000_000;

/// How many frames the accepted sends owe the receivers; kept by the senders.
pub struct Expected {
    receivers: HashSet<String>,
    frames: AtomicU64,
}

impl Expected {
    /// One `message.new` for every recipient (each member but the sender) that is a receiver.
    pub fn accepted(&self, sender: &str, members: &[String]) {
        let owed = members
            .iter()
            .filter(|m| m.as_str() != sender && self.receivers.contains(m.as_str()))
            .count();
        self.frames.fetch_add(owed as u64, Ordering::Relaxed);
    }

    fn frames(&self) -> u64 {
        self.frames.load(Ordering::Relaxed)
    }
}

/// What every receiver adds to.
struct Shared {
    /// `acceptedAt` before this (µs since the epoch) is warm-up: counted, not timed.
    measured_from_us: AtomicU64,
    frames: AtomicU64,
    stop: CancellationToken,
}

/// The open receivers, from connecting until [`Receivers::finish`].
pub struct Receivers {
    expected: Arc<Expected>,
    shared: Arc<Shared>,
    tasks: JoinSet<anyhow::Result<Tally>>,
    count: usize,
    connect_secs: f64,
}

/// One receiver's figures.
struct Tally {
    latency: Histogram<u64>,
    frames: u64,
    warmup_frames: u64,
    other_frames: u64,
    /// Frames whose `acceptedAt` was later than their arrival (clocks disagree): timed as 0.
    clock_skewed: u64,
    ended_early: bool,
}

#[derive(Debug, Serialize)]
pub struct DeliveryResult {
    pub receivers: usize,
    /// Time to open every socket and have each answer a ping.
    pub connect_secs: f64,
    /// `message.new` frames the accepted sends owed the receivers (warm-up included).
    pub frames_expected: u64,
    /// `message.new` frames that arrived (warm-up included).
    pub frames_received: u64,
    /// Expected minus received, when positive: live frames lost (or still late after the wait).
    pub frames_missing: u64,
    /// Received frames of messages accepted in the measured part: the ones timed below.
    pub frames_timed: u64,
    /// Other frames (state changes for the receivers' own sends, and the like).
    pub other_frames: u64,
    /// `message.new` frames per second over the measured part.
    pub delivered_per_sec: f64,
    /// Arrival minus the message's `acceptedAt`.
    pub accept_to_delivered_ms: Percentiles,
    /// Frames that arrived "before" they were accepted (clocks disagree); timed as 0.
    pub clock_skewed: u64,
    /// Receivers whose socket ended before the phase did.
    pub sockets_ended_early: usize,
}

impl Receivers {
    /// Opens a socket for each of the workload's first `count` users and waits until every
    /// one answered a ping.
    pub async fn connect(
        gateway: &str,
        workload: &Workload,
        count: usize,
    ) -> anyhow::Result<Receivers> {
        let count = count.min(workload.users.len());
        let users = &workload.users[..count];
        tracing::info!(receivers = count, "delivery: opening WebSocket receivers");
        let started = Instant::now();
        let sockets: Vec<Socket> = futures::stream::iter(users.iter().map(|user| {
            let url = socket_url(gateway, &user.token);
            async move {
                tokio::time::timeout(CONNECT_TIMEOUT, open(&url))
                    .await
                    .with_context(|| format!("socket of {} not ready in time", user.id))?
                    .with_context(|| format!("opening the socket of {}", user.id))
            }
        }))
        .buffer_unordered(CONNECT_CONCURRENCY)
        .try_collect()
        .await?;
        let connect_secs = started.elapsed().as_secs_f64();
        tracing::info!(
            receivers = count,
            connect_secs,
            "delivery: all receivers connected"
        );

        let shared = Arc::new(Shared {
            measured_from_us: AtomicU64::new(0),
            frames: AtomicU64::new(0),
            stop: CancellationToken::new(),
        });
        let mut tasks = JoinSet::new();
        for socket in sockets {
            tasks.spawn(receive(socket, shared.clone()));
        }
        Ok(Receivers {
            expected: Arc::new(Expected {
                receivers: users.iter().map(|u| u.id.clone()).collect(),
                frames: AtomicU64::new(0),
            }),
            shared,
            tasks,
            count,
            connect_secs,
        })
    }

    /// What the senders add to.
    pub fn expected(&self) -> Arc<Expected> {
        self.expected.clone()
    }

    /// Messages accepted from `at` on are timed; earlier ones are warm-up.
    pub fn measure_from(&self, at: DateTime<Utc>) {
        let us = u64::try_from(at.timestamp_micros()).unwrap_or(0);
        self.shared.measured_from_us.store(us, Ordering::Relaxed);
    }

    /// Call once the senders are done: waits for the frames still owed (up to a limit), then
    /// closes the sockets and adds up. `measured_secs` is the measured part's length.
    pub async fn finish(mut self, measured_secs: u64) -> anyhow::Result<DeliveryResult> {
        let expected = self.expected.frames();
        let deadline = Instant::now() + SETTLE_LIMIT;
        let mut last = self.shared.frames.load(Ordering::Relaxed);
        let mut quiet_since = Instant::now();
        loop {
            let received = self.shared.frames.load(Ordering::Relaxed);
            if received >= expected || Instant::now() >= deadline {
                break;
            }
            if received != last {
                last = received;
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() >= SETTLE_QUIET {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.shared.stop.cancel();

        let mut latency = new_histogram()?;
        let (mut received, mut timed, mut other, mut skewed, mut ended) = (0, 0, 0, 0, 0);
        while let Some(joined) = self.tasks.join_next().await {
            let tally = joined.context("a receiver panicked")??;
            latency.add(&tally.latency).context("merging histograms")?;
            received += tally.frames + tally.warmup_frames;
            timed += tally.frames;
            other += tally.other_frames;
            skewed += tally.clock_skewed;
            ended += usize::from(tally.ended_early);
        }
        Ok(DeliveryResult {
            receivers: self.count,
            connect_secs: self.connect_secs,
            frames_expected: expected,
            frames_received: received,
            frames_missing: expected.saturating_sub(received),
            frames_timed: timed,
            other_frames: other,
            delivered_per_sec: timed as f64 / measured_secs.max(1) as f64,
            accept_to_delivered_ms: Percentiles::of(&latency),
            clock_skewed: skewed,
            sockets_ended_early: ended,
        })
    }
}

/// The WebSocket URL of the gateway at `gateway` (an `http(s)://` base) for `token`.
pub fn socket_url(gateway: &str, token: &str) -> String {
    let base = gateway
        .replacen("https://", "wss://", 1)
        .replacen("http://", "ws://", 1);
    format!("{base}/v1/ws?token={token}")
}

/// Opens one socket and waits for the answer to a ping: once it comes, the gateway has
/// registered the socket and recorded the user as online.
pub async fn open(url: &str) -> anyhow::Result<Socket> {
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await?;
    let ping = r#"{"type":"ping","reqId":"bench-ready"}"#;
    socket.send(Message::Text(ping.into())).await?;
    loop {
        match socket.next().await {
            Some(Ok(Message::Text(text))) if text.contains("\"pong\"") => return Ok(socket),
            Some(Ok(_)) => continue,
            Some(Err(error)) => return Err(error.into()),
            None => anyhow::bail!("the gateway closed the socket"),
        }
    }
}

#[derive(Deserialize)]
struct Frame {
    #[serde(rename = "type")]
    kind: String,
    message: Option<FrameMessage>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FrameMessage {
    accepted_at: DateTime<Utc>,
}

/// One receiver: reads until told to stop, timing every `message.new`.
async fn receive(mut socket: Socket, shared: Arc<Shared>) -> anyhow::Result<Tally> {
    let mut tally = Tally {
        latency: new_histogram()?,
        frames: 0,
        warmup_frames: 0,
        other_frames: 0,
        clock_skewed: 0,
        ended_early: false,
    };
    loop {
        let next = tokio::select! {
            next = socket.next() => next,
            () = shared.stop.cancelled() => break,
        };
        let arrived = Utc::now();
        let text = match next {
            Some(Ok(Message::Text(text))) => text,
            // Pings are answered by the WebSocket layer while we read.
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
            Some(Ok(Message::Binary(_))) => {
                tally.other_frames += 1;
                continue;
            }
            Some(Ok(Message::Close(_)) | Err(_)) | None => {
                tally.ended_early = true;
                break;
            }
        };
        let frame: Frame = match serde_json::from_str(&text) {
            Ok(frame) => frame,
            Err(_) => {
                tally.other_frames += 1;
                continue;
            }
        };
        let Some(message) = frame.message.filter(|_| frame.kind == "message.new") else {
            tally.other_frames += 1;
            continue;
        };
        shared.frames.fetch_add(1, Ordering::Relaxed);
        let accepted_us = message.accepted_at.timestamp_micros();
        let measured_from = shared.measured_from_us.load(Ordering::Relaxed);
        if u64::try_from(accepted_us).unwrap_or(0) < measured_from {
            tally.warmup_frames += 1;
            continue;
        }
        tally.frames += 1;
        let latency_us = arrived.timestamp_micros() - accepted_us;
        if latency_us < 0 {
            tally.clock_skewed += 1;
        }
        tally
            .latency
            .saturating_record(u64::try_from(latency_us).unwrap_or(0).max(1));
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), socket.close(None)).await;
    Ok(tally)
}

fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, HISTOGRAM_MAX_US, 3).context("creating a latency histogram")
}
