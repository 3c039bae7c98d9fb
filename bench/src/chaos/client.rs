//! The drill's clients: open-loop load through every gateway, each message sent the way a
//! careful client sends it.
//!
//! * **One identity per message.** Every attempt at message `seq` carries the same body and
//!   `clientMessageId`, so a retry of a send that was in fact stored (the answer lost with a
//!   dying gateway) is an idempotent hit, never a second message.
//! * **Next gateway.** After any failure the next attempt goes to the next gateway in the
//!   list: a dead gateway costs one failed attempt, not the message.
//! * **Back off as told.** A 503 or 429 is retried after its `Retry-After`; other failures
//!   after a doubling backoff (100 ms to 2 s). A 4xx other than 429 is the client's own
//!   mistake and is not retried. After `--give-up-secs` without a 202 the client gives up:
//!   that message was never accepted, so it cannot count as lost.
//!
//! The load is open loop: message `seq` is due at `seq / rate` seconds whether or not the
//! earlier ones were answered, so an outage shows up as retries and latency, not as a
//! slower generator. Every failed attempt is counted by class under the fault in progress
//! when it happened (see [`Clients::set_phase`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::Instant;
use uuid::Uuid;

use super::ChaosArgs;
use crate::workload::Workload;

/// One attempt's limit: long enough for a healthy send under load, short enough that a hung
/// gateway costs the message little.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// The longest `Retry-After` honoured as given; longer ones are waited this long.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
/// Messages in flight (sending or waiting to retry) beyond which due messages are skipped
/// (counted as dropped), so a long outage cannot exhaust the generator.
const MAX_IN_FLIGHT: usize = 20_000;

/// The HTTP client every drill client shares.
pub fn http() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(ATTEMPT_TIMEOUT)
        .connect_timeout(Duration::from_secs(2))
        .build()
        .context("building the HTTP client")
}

/// What the clients share: where to send, what, and what went wrong when.
pub struct Clients {
    http: reqwest::Client,
    gateways: Vec<String>,
    workload: Arc<Workload>,
    give_up: Duration,
    /// The fault in progress: its index in the schedule plus one; 0 when none is.
    phase: AtomicUsize,
    /// Failed attempts by phase, then by class.
    errors: Mutex<BTreeMap<usize, BTreeMap<String, u64>>>,
    in_flight: AtomicUsize,
}

impl Clients {
    pub fn new(
        http: reqwest::Client,
        gateways: Vec<String>,
        workload: Arc<Workload>,
        args: &ChaosArgs,
    ) -> Clients {
        Clients {
            http,
            gateways,
            workload,
            give_up: Duration::from_secs(args.give_up_secs),
            phase: AtomicUsize::new(0),
            errors: Mutex::new(BTreeMap::new()),
            in_flight: AtomicUsize::new(0),
        }
    }

    /// Fault number `fault` of the schedule is in progress (`None`: no fault is).
    pub fn set_phase(&self, fault: Option<usize>) {
        self.phase
            .store(fault.map_or(0, |i| i + 1), Ordering::Relaxed);
    }

    /// The failed attempts seen while fault number `fault` was in progress.
    pub fn errors_during(&self, fault: usize) -> BTreeMap<String, u64> {
        self.errors_in_phase(fault + 1)
    }

    /// The failed attempts seen while no fault was in progress.
    pub fn errors_outside_faults(&self) -> BTreeMap<String, u64> {
        self.errors_in_phase(0)
    }

    fn errors_in_phase(&self, phase: usize) -> BTreeMap<String, u64> {
        let errors = self.errors.lock().unwrap_or_else(PoisonError::into_inner);
        errors.get(&phase).cloned().unwrap_or_default()
    }

    fn count_error(&self, class: &str) {
        let phase = self.phase.load(Ordering::Relaxed);
        let mut errors = self.errors.lock().unwrap_or_else(PoisonError::into_inner);
        *errors
            .entry(phase)
            .or_default()
            .entry(class.to_owned())
            .or_default() += 1;
    }

    /// Sends message `seq` until a gateway accepts it, it is refused for good, or the
    /// client gives up.
    async fn deliver(&self, seq: u64) -> SendRecord {
        let message = self.workload.message(seq);
        let body = serde_json::json!({
            "conversationId": message.conversation.id.to_string(),
            // The clientMessageId as the text: each logical message has a text of its own,
            // so a message stored twice under two ids would still be found.
            "content": message.client_message_id,
            "contentType": "text",
            "clientMessageId": message.client_message_id,
        })
        .to_string();
        let first_sent_at = Utc::now();
        let started = Instant::now();
        let mut gateway = (seq % self.gateways.len() as u64) as usize;
        let mut backoff = FIRST_BACKOFF;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let outcome = self
                .attempt(&self.gateways[gateway], &message.user.authorization, &body)
                .await;
            let (class, retry_after) = match outcome {
                Attempt::Accepted(message_id) => {
                    return SendRecord::new(first_sent_at, attempts, Outcome::Accepted(message_id));
                }
                Attempt::Refused(status) => {
                    self.count_error(status.as_str());
                    return SendRecord::new(
                        first_sent_at,
                        attempts,
                        Outcome::Refused(status.as_u16()),
                    );
                }
                Attempt::Retry { class, after } => (class, after),
            };
            self.count_error(&class);
            let wait = retry_after.unwrap_or(backoff);
            backoff = (backoff * 2).min(MAX_BACKOFF);
            if started.elapsed() + wait >= self.give_up {
                return SendRecord::new(first_sent_at, attempts, Outcome::GaveUp);
            }
            gateway = (gateway + 1) % self.gateways.len();
            tokio::time::sleep(wait).await;
        }
    }

    /// One `POST /v1/messages` to `gateway`.
    async fn attempt(&self, gateway: &str, authorization: &HeaderValue, body: &str) -> Attempt {
        let sent = self
            .http
            .post(format!("{gateway}/v1/messages"))
            .header(AUTHORIZATION, authorization.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(body.to_owned())
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(error) => return Attempt::failed(&error),
        };
        let status = response.status();
        let retry_after = retry_after(response.headers().get(RETRY_AFTER));
        let answer = match response.bytes().await {
            Ok(answer) => answer,
            Err(error) => return Attempt::failed(&error),
        };
        match status {
            StatusCode::ACCEPTED => match message_id(&answer) {
                Some(id) => Attempt::Accepted(id),
                None => Attempt::Retry {
                    class: "202-without-message-id".to_owned(),
                    after: None,
                },
            },
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS => Attempt::Retry {
                class: status.as_str().to_owned(),
                after: Some(retry_after.unwrap_or(Duration::from_secs(1))),
            },
            status if status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT => {
                Attempt::Retry {
                    class: status.as_str().to_owned(),
                    after: None,
                }
            }
            status => Attempt::Refused(status),
        }
    }
}

/// How one attempt ended.
enum Attempt {
    Accepted(Uuid),
    /// A 4xx that a retry cannot change.
    Refused(StatusCode),
    Retry {
        class: String,
        after: Option<Duration>,
    },
}

impl Attempt {
    fn failed(error: &reqwest::Error) -> Attempt {
        let class = if error.is_timeout() {
            "timeout"
        } else if error.is_connect() {
            "connect-error"
        } else {
            "transport-error"
        };
        Attempt::Retry {
            class: class.to_owned(),
            after: None,
        }
    }
}

/// `Retry-After` in seconds, capped at [`MAX_RETRY_AFTER`].
fn retry_after(value: Option<&HeaderValue>) -> Option<Duration> {
    let secs: u64 = value?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER))
}

fn message_id(answer: &[u8]) -> Option<Uuid> {
    let answer: serde_json::Value = serde_json::from_slice(answer).ok()?;
    Uuid::parse_str(answer.get("messageId")?.as_str()?).ok()
}

/// How a message ended.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    Accepted(Uuid),
    Refused(u16),
    GaveUp,
}

/// One message's story.
#[derive(Debug, Clone)]
pub struct SendRecord {
    pub first_sent_at: DateTime<Utc>,
    pub answered_at: DateTime<Utc>,
    pub attempts: u32,
    pub outcome: Outcome,
}

impl SendRecord {
    fn new(first_sent_at: DateTime<Utc>, attempts: u32, outcome: Outcome) -> SendRecord {
        SendRecord {
            first_sent_at,
            answered_at: Utc::now(),
            attempts,
            outcome,
        }
    }
}

/// Every message the load offered.
pub struct Sends {
    pub records: Vec<SendRecord>,
    pub scheduled: u64,
    pub dropped: u64,
}

/// What the clients went through, in figures.
#[derive(Debug, Clone, Serialize)]
pub struct SendSummary {
    pub scheduled: u64,
    /// Messages a gateway answered 202 for (after any number of attempts).
    pub accepted: u64,
    /// Accepted only after one or more retries.
    pub accepted_after_retry: u64,
    pub retries: u64,
    pub max_attempts: u32,
    /// Messages refused for good (a 4xx), by status.
    pub refused: BTreeMap<u16, u64>,
    pub gave_up: u64,
    /// Due while too many were in flight, never sent.
    pub dropped: u64,
    /// From a message's first attempt to its 202, the slowest.
    pub max_ms_to_accept: f64,
}

impl Sends {
    pub fn summary(&self) -> SendSummary {
        let mut summary = SendSummary {
            scheduled: self.scheduled,
            accepted: 0,
            accepted_after_retry: 0,
            retries: 0,
            max_attempts: 0,
            refused: BTreeMap::new(),
            gave_up: 0,
            dropped: self.dropped,
            max_ms_to_accept: 0.0,
        };
        for record in &self.records {
            summary.retries += u64::from(record.attempts.saturating_sub(1));
            summary.max_attempts = summary.max_attempts.max(record.attempts);
            match record.outcome {
                Outcome::Accepted(_) => {
                    summary.accepted += 1;
                    summary.accepted_after_retry += u64::from(record.attempts > 1);
                    let ms = (record.answered_at - record.first_sent_at).as_seconds_f64() * 1e3;
                    summary.max_ms_to_accept = summary.max_ms_to_accept.max(ms);
                }
                Outcome::Refused(status) => *summary.refused.entry(status).or_default() += 1,
                Outcome::GaveUp => summary.gave_up += 1,
            }
        }
        summary
    }

    /// The accepted messages: id and first attempt.
    pub fn accepted(&self) -> impl Iterator<Item = (Uuid, DateTime<Utc>)> + '_ {
        self.records
            .iter()
            .filter_map(|record| match record.outcome {
                Outcome::Accepted(id) => Some((id, record.first_sent_at)),
                _ => None,
            })
    }
}

/// The open-loop load, running on a task of its own.
pub struct Load {
    task: tokio::task::JoinHandle<Sends>,
    started: Instant,
}

impl Load {
    /// Starts offering `rate` messages per second for `duration`.
    pub fn start(clients: Arc<Clients>, rate: u32, duration: Duration) -> Load {
        let started = Instant::now();
        let total = u64::from(rate) * duration.as_secs();
        let task = tokio::spawn(offer(clients, rate, total, started));
        Load { task, started }
    }

    /// When the first message was due: the schedule's time zero.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Waits for the last message to be answered or given up on.
    pub async fn finish(self) -> anyhow::Result<Sends> {
        self.task.await.context("the load task panicked")
    }
}

async fn offer(clients: Arc<Clients>, rate: u32, total: u64, started: Instant) -> Sends {
    let mut sends = JoinSet::new();
    let mut records = Vec::with_capacity(total as usize);
    let mut dropped = 0;
    for seq in 0..total {
        let due = started + Duration::from_nanos(seq * 1_000_000_000 / u64::from(rate));
        tokio::time::sleep_until(due).await;
        while let Some(done) = sends.try_join_next() {
            records.extend(done.ok());
        }
        if clients.in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT {
            dropped += 1;
            continue;
        }
        clients.in_flight.fetch_add(1, Ordering::Relaxed);
        let clients = clients.clone();
        sends.spawn(async move {
            let record = clients.deliver(seq).await;
            clients.in_flight.fetch_sub(1, Ordering::Relaxed);
            record
        });
    }
    while let Some(done) = sends.join_next().await {
        records.extend(done.ok());
    }
    Sends {
        records,
        scheduled: total,
        dropped,
    }
}
