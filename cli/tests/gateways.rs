//! Clients across gateways: the system's gateway (in this process) and a second one in a
//! process of its own (`hotpath gateway` of the built binary), both on the same NATS and
//! Postgres, as two gateway pods behind a load balancer. The second is killed with SIGKILL
//! while clients use it; what is asserted is what those clients see once they turn to the
//! other gateway (answers, message ids, frames) and the rows in Postgres.

use hotpath_testkit as support;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use support::gateway::GatewayProcess;
use support::ws::{self, Socket};
use support::{System, message_id_of, text};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_hotpath");

/// Message `n` of `conversation`, named by its `clientMessageId`: a retry sends it as it is.
fn numbered(conversation: Uuid, n: usize) -> Value {
    let mut body = text(conversation, &format!("message {n}"));
    body["clientMessageId"] = json!(format!("{conversation}-{n}"));
    body
}

/// `POST /v1/messages` on the gateway at `base`: the 202's body, or the error of a request
/// that got no answer (the gateway died under it).
async fn post(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    body: &Value,
) -> Result<Value, reqwest::Error> {
    let response = http
        .post(format!("{base}/v1/messages"))
        .bearer_auth(token)
        .json(body)
        .send()
        .await?;
    let status = response.status();
    let answer: Value = response.json().await?;
    assert_eq!(status, 202, "accepted: {answer}");
    Ok(answer)
}

/// One message as its sender saw it.
struct Outcome {
    /// The id the first gateway answered with, if it answered.
    answered_by_first: Option<Uuid>,
    /// The id the message was accepted with, by whichever gateway.
    message_id: Uuid,
    /// Whether the gateway that answered called it a retry of a message already accepted.
    idempotent_hit: bool,
}

/// A client of one conversation, for the test that kills a gateway under it.
struct FailoverSender {
    http: reqwest::Client,
    first: String,
    second: String,
    token: String,
    conversation: Uuid,
    /// 202s from the first gateway, over every sender.
    answered: Arc<AtomicUsize>,
}

impl FailoverSender {
    /// Sends `count` numbered messages one after another, each as soon as the previous one
    /// is answered: to the first gateway while it answers, and from its first request that
    /// fails on to the second, starting with that same message again.
    async fn send(self, count: usize) -> Vec<Outcome> {
        let mut outcomes = Vec::with_capacity(count);
        let mut on_first = true;
        for n in 0..count {
            let body = numbered(self.conversation, n);
            if on_first {
                match post(&self.http, &self.first, &self.token, &body).await {
                    Ok(answer) => {
                        self.answered.fetch_add(1, Ordering::Relaxed);
                        let id = message_id_of(&answer);
                        outcomes.push(Outcome {
                            answered_by_first: Some(id),
                            message_id: id,
                            idempotent_hit: answer["idempotentHit"] == true,
                        });
                        continue;
                    }
                    Err(_) => on_first = false,
                }
            }
            let answer = post(&self.http, &self.second, &self.token, &body)
                .await
                .expect("the other gateway answers");
            outcomes.push(Outcome {
                answered_by_first: None,
                message_id: message_id_of(&answer),
                idempotent_hit: answer["idempotentHit"] == true,
            });
        }
        outcomes
    }
}

/// Waits (at most `within`) until `count` reaches `at_least`.
async fn wait_for_count(count: &AtomicUsize, at_least: usize, within: Duration) {
    let deadline = Instant::now() + within;
    while count.load(Ordering::Relaxed) < at_least {
        assert!(
            Instant::now() < deadline,
            "only {} of {at_least} within {within:?}",
            count.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// How many of the requests the killed gateway died under it had published: the first message
/// each sender sent to the other gateway is the one whose request died, and a hit says the
/// stream already had it.
fn published_before_dying(sent: &[(String, Uuid, Vec<Outcome>)]) -> usize {
    sent.iter()
        .filter_map(|(_, _, outcomes)| {
            outcomes
                .iter()
                .find(|outcome| outcome.answered_by_first.is_none())
        })
        .filter(|outcome| outcome.idempotent_hit)
        .count()
}

/// A client that did not hear the killed gateway's 202 and sends the same message to the
/// other gateway gets the same message id, and no second row. (A sender that started late may
/// have had nothing answered by the killed gateway; some sender had.)
async fn assert_answered_sends_retried_elsewhere_keep_their_ids(
    system: &System,
    sent: &[(String, Uuid, Vec<Outcome>)],
) {
    let before = system.message_count().await;
    let mut checked = 0;
    for (user, conversation, outcomes) in sent {
        let last_answered = outcomes
            .iter()
            .enumerate()
            .filter_map(|(n, outcome)| Some((n, outcome.answered_by_first?)))
            .next_back();
        let Some((n, accepted)) = last_answered else {
            continue;
        };
        let (status, answer) = system.send(user, numbered(*conversation, n)).await;
        assert_eq!(status, 202, "{answer}");
        assert_eq!(message_id_of(&answer), accepted, "{user}: message {n}");
        assert_eq!(answer["idempotentHit"], true, "{answer}");
        checked += 1;
    }
    assert!(checked > 0, "the killed gateway answered some sends");
    assert_eq!(system.message_count().await, before, "no row added");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_mid_request_loses_nothing_and_retries_elsewhere_keep_their_ids() {
    const SENDERS: usize = 6;
    const COUNT: usize = 300;
    let system = System::start().await;
    let mut doomed = GatewayProcess::start(&system, BIN, "gateway-b").await;

    let answered = Arc::new(AtomicUsize::new(0));
    let mut senders = Vec::new();
    for i in 0..SENDERS {
        let user = format!("sender-{i}");
        let conversation = system.conversation(&user, "group", &["reader"]).await;
        let sender = FailoverSender {
            http: system.http.clone(),
            first: doomed.base.clone(),
            second: system.base.clone(),
            token: system.token(&user),
            conversation,
            answered: answered.clone(),
        };
        senders.push((user, conversation, tokio::spawn(sender.send(COUNT))));
    }
    // Every sender sends back to back, so requests are in flight when it dies.
    wait_for_count(&answered, 100, Duration::from_secs(60)).await;
    doomed.kill();

    let mut sent = Vec::new();
    for (user, conversation, sender) in senders {
        sent.push((user, conversation, sender.await.expect("sender")));
    }
    let by_killed = answered.load(Ordering::Relaxed);
    assert!(
        by_killed < SENDERS * COUNT,
        "the gateway was killed only after every send: {}",
        doomed.log()
    );
    let published_before_dying = published_before_dying(&sent);
    eprintln!(
        "the killed gateway accepted {by_killed} of {} messages; {published_before_dying} of \
         the {SENDERS} requests it died under had been published",
        SENDERS * COUNT
    );

    // Every message (whichever gateway accepted it, and the ones whose request died with the
    // gateway and were sent again) is stored once, in the order its client sent it.
    let total = SENDERS * COUNT;
    let stored = system
        .wait_for_messages(total as i64, Duration::from_secs(90))
        .await;
    assert_eq!(stored, total as i64, "every accepted message stored, once");
    assert_eq!(
        support::assert_gap_free_in_acceptance_order(&system.pool).await,
        total
    );
    for (user, conversation, outcomes) in &sent {
        let ids: Vec<Uuid> = outcomes.iter().map(|outcome| outcome.message_id).collect();
        let by_seq = support::ids_in_seq_order(&system.pool, *conversation).await;
        assert!(
            by_seq == ids,
            "{user}: seq order differs from sending order"
        );
    }

    assert_answered_sends_retried_elsewhere_keep_their_ids(&system, &sent).await;
}

/// How a recipient's client keeps a conversation: messages by seq, the key the protocol says
/// to deduplicate by (catch-up and live delivery may overlap at the seam).
#[derive(Default)]
struct Inbox {
    by_seq: BTreeMap<i64, Uuid>,
    /// How many `message.new` frames each seq came in.
    frames: BTreeMap<i64, usize>,
}

impl Inbox {
    /// Takes a frame in: a `message.new` of the conversation is recorded, others ignored.
    fn take(&mut self, frame: &Value) {
        if frame["type"] != "message.new" {
            return;
        }
        let message = &frame["message"];
        let seq = message["seq"].as_i64().expect("seq");
        let id = message_id_of(message);
        let known = *self.by_seq.entry(seq).or_insert(id);
        assert_eq!(known, id, "seq {seq} came with two message ids");
        *self.frames.entry(seq).or_default() += 1;
    }

    /// `reader` has every one of `ids` once by seq. What it had before the kill (`1..=before`)
    /// never came again; after it, a message came at most twice (by `sync` and live, at the
    /// seam).
    fn assert_complete(&self, reader: &str, ids: &[Uuid], before: i64) {
        let received: Vec<Uuid> = self.by_seq.values().copied().collect();
        assert!(
            received == ids,
            "{reader} has every message once, by seq (it had 1..={before} before the kill)"
        );
        for (&seq, &frames) in &self.frames {
            let at_most = if seq <= before { 1 } else { 2 };
            assert!(
                frames <= at_most,
                "{reader}: seq {seq} came in {frames} frames (had 1..={before} before the kill)"
            );
        }
        let twice = self.frames.values().filter(|&&frames| frames > 1).count();
        eprintln!(
            "{reader}: had 1..={before} before the kill; {twice} seqs came both by sync and live"
        );
    }

    /// The highest seq with nothing missing below it: what a reconnecting client syncs after.
    fn complete_up_to(&self) -> i64 {
        let mut last = 0;
        while self.by_seq.contains_key(&(last + 1)) {
            last += 1;
        }
        last
    }
}

/// Reads frames into `inbox` until it holds `count` messages.
async fn read_until(socket: &mut Socket, inbox: &mut Inbox, count: usize) {
    while inbox.by_seq.len() < count {
        let frame = ws::next_frame(socket).await;
        inbox.take(&frame);
    }
}

/// Opens a socket for `token` on the gateway at `base`, waits for it to be served (keeping
/// the live frames that come first), and asks for every message of `conversation` after
/// `after_seq`, taking in frames until `sync.done`.
async fn reconnect_and_sync(
    base: &str,
    token: &str,
    conversation: Uuid,
    after_seq: i64,
    inbox: &mut Inbox,
) -> Socket {
    let mut socket = ws::open(base, token).await;
    ws::send_frame(&mut socket, json!({"type": "ping", "reqId": "ready"})).await;
    loop {
        let frame = ws::next_frame(&mut socket).await;
        if frame["type"] == "pong" {
            break;
        }
        inbox.take(&frame);
    }
    let sync = json!({"type": "sync", "reqId": "catch-up", "conversationId": conversation,
                      "afterSeq": after_seq});
    ws::send_frame(&mut socket, sync).await;
    loop {
        let frame = ws::next_frame(&mut socket).await;
        if frame["type"] == "sync.done" {
            return socket;
        }
        assert_ne!(frame["type"], "error", "sync refused: {frame}");
        inbox.take(&frame);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_clients_of_a_killed_gateway_catch_up_on_the_other_with_sync() {
    const COUNT: usize = 600;
    let system = System::start().await;
    let mut doomed = GatewayProcess::start(&system, BIN, "gateway-b").await;
    let readers = ["reader-0", "reader-1", "reader-2"];
    let conversation = system.conversation("alice", "group", &readers).await;
    let mut sockets = Vec::new();
    for reader in readers {
        sockets.push(ws::connect(&system, &doomed.base, reader).await);
    }

    // Alice sends through the other gateway.
    let sending = tokio::spawn(send_paced(
        system.http.clone(),
        system.base.clone(),
        system.token("alice"),
        conversation,
        COUNT,
    ));

    // Live delivery through the gateway that is about to die works...
    let mut inboxes: Vec<Inbox> = readers.iter().map(|_| Inbox::default()).collect();
    for (socket, inbox) in sockets.iter_mut().zip(&mut inboxes) {
        read_until(socket, inbox, 20).await;
    }
    assert!(
        !sending.is_finished(),
        "the sender finished before the kill"
    );
    doomed.kill();
    // ...and what was on its way when it died still counts.
    for (socket, inbox) in sockets.iter_mut().zip(&mut inboxes) {
        let (frames, _) = ws::read_until_closed(socket).await;
        frames.iter().for_each(|frame| inbox.take(frame));
    }
    let before: Vec<i64> = inboxes.iter().map(Inbox::complete_up_to).collect();

    // Each client reconnects to the other gateway and catches up from what it has.
    let mut sockets = Vec::new();
    for (reader, inbox) in readers.iter().zip(&mut inboxes) {
        let after = inbox.complete_up_to();
        let token = system.token(reader);
        sockets.push(reconnect_and_sync(&system.base, &token, conversation, after, inbox).await);
    }
    let ids = sending.await.expect("sender");
    for (socket, inbox) in sockets.iter_mut().zip(&mut inboxes) {
        read_until(socket, inbox, COUNT).await;
    }

    let stored = support::ids_in_seq_order(&system.pool, conversation).await;
    assert_eq!(stored, ids, "every message stored once, in sending order");
    for ((reader, inbox), before) in readers.iter().zip(&inboxes).zip(before) {
        inbox.assert_complete(reader, &ids, before);
    }
}

/// Sends `count` numbered messages to `conversation` through the gateway at `base`, one every
/// 5 ms, each after the previous one's 202; their ids in sending order.
async fn send_paced(
    http: reqwest::Client,
    base: String,
    token: String,
    conversation: Uuid,
    count: usize,
) -> Vec<Uuid> {
    let mut ids = Vec::with_capacity(count);
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    for n in 0..count {
        tick.tick().await;
        let answer = post(&http, &base, &token, &numbered(conversation, n))
            .await
            .expect("the gateway answers");
        ids.push(message_id_of(&answer));
    }
    ids
}

/// The next JSON frame, or `None` once the socket has ended (the gateway died).
async fn next_or_end(socket: &mut Socket) -> Option<Value> {
    tokio::time::timeout(ws::PATIENCE, async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) => {
                    return Some(serde_json::from_str(&text).expect("frames are JSON"));
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                _ => return None,
            }
        }
    })
    .await
    .expect("a frame or the end in time")
}

/// A WebSocket sender that keeps up to [`WINDOW`](PipelinedSender::WINDOW) `send` frames
/// unacknowledged, as a client on a slow link does; each frame's `reqId` is its number.
struct PipelinedSender {
    conversation: Uuid,
    /// Sent on the current socket, not acknowledged yet, in sending order.
    unacknowledged: VecDeque<usize>,
    next: usize,
    /// The id each message was accepted with, and whether as a retry.
    accepted: BTreeMap<usize, (Uuid, bool)>,
}

impl PipelinedSender {
    const WINDOW: usize = 16;

    async fn send(&mut self, socket: &mut Socket, n: usize) {
        let mut frame = numbered(self.conversation, n);
        frame["type"] = json!("send");
        frame["reqId"] = json!(n.to_string());
        ws::send_frame(socket, frame).await;
        self.unacknowledged.push_back(n);
    }

    /// Keeps the window full (up to message `count`) and takes in the next frame; false once
    /// the socket has ended.
    async fn step(&mut self, socket: &mut Socket, count: usize, refill: bool) -> bool {
        while refill && self.next < count && self.unacknowledged.len() < Self::WINDOW {
            self.send(socket, self.next).await;
            self.next += 1;
        }
        let Some(frame) = next_or_end(socket).await else {
            return false;
        };
        assert_ne!(frame["type"], "error", "send refused: {frame}");
        if frame["type"] == "send.ack" {
            let n: usize = frame["reqId"]
                .as_str()
                .and_then(|id| id.parse().ok())
                .expect("reqId");
            assert_eq!(
                self.unacknowledged.pop_front(),
                Some(n),
                "acknowledged in sending order"
            );
            let retry = frame["idempotentHit"] == true;
            self.accepted.insert(n, (message_id_of(&frame), retry));
        }
        true
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_sender_whose_gateway_dies_resends_what_was_not_acknowledged_on_the_other() {
    const COUNT: usize = 400;
    let system = System::start().await;
    let mut doomed = GatewayProcess::start(&system, BIN, "gateway-b").await;
    let conversation = system.conversation("alice", "direct", &["bob"]).await;
    let mut sender = PipelinedSender {
        conversation,
        unacknowledged: VecDeque::new(),
        next: 0,
        accepted: BTreeMap::new(),
    };

    let mut socket = ws::connect(&system, &doomed.base, "alice").await;
    while sender.accepted.len() < 100 {
        assert!(
            sender.step(&mut socket, COUNT, true).await,
            "{}",
            doomed.log()
        );
    }
    doomed.kill();
    // The acknowledgements that left before it died still count; then the socket ends.
    while sender.step(&mut socket, COUNT, false).await {}
    let lost = sender.unacknowledged.len();
    let by_killed = sender.accepted.len();

    // On the other gateway: what was not acknowledged again, in order, then the rest.
    let mut socket = ws::connect(&system, &system.base, "alice").await;
    let resend: Vec<usize> = sender.unacknowledged.drain(..).collect();
    for n in resend {
        sender.send(&mut socket, n).await;
    }
    while sender.accepted.len() < COUNT {
        assert!(
            sender.step(&mut socket, COUNT, true).await,
            "the gateway answers"
        );
    }
    let retries = sender.accepted.values().filter(|(_, retry)| *retry).count();
    eprintln!(
        "the killed gateway acknowledged {by_killed} sends, left {lost} unacknowledged; {retries} \
         of those had been published before it died"
    );
    assert!(retries <= lost, "only resent messages are retries");

    let ids: Vec<Uuid> = sender.accepted.values().map(|(id, _)| *id).collect();
    let stored = system
        .wait_for_messages(COUNT as i64, Duration::from_secs(60))
        .await;
    assert_eq!(stored, COUNT as i64, "every message stored once");
    let by_seq = support::ids_in_seq_order(&system.pool, conversation).await;
    assert!(by_seq == ids, "seq order differs from sending order");
}
