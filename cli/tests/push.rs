//! Offline push, end to end against real NATS and Postgres: the delivery consumer schedules a
//! task per offline recipient in the `PUSH` stream, the push workers send it through the real
//! FCM client (reqwest + gcp_auth) to a local server speaking FCM HTTP v1's wire protocol, and
//! act on what it answers: retries with backoff, deleted tokens, the DLQ, replay. APNS (whose
//! endpoint is Apple's alone) runs the same pipeline through a recording sender.

use hotpath_testkit as support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hotpath_consumers::push::{Platform, PushOutcome, Senders};
use hotpath_core::config::Backoff;
use hotpath_core::domain::DlqSource;
use serde_json::json;
use support::fcm::{FakeFcm, FcmAnswer, FcmRequest};
use support::push::RecordingSender;
use support::ws::{PATIENCE, connect, next_of};
use support::{System, metric_sum, text};
use uuid::Uuid;

const PROJECT: &str = "hotpath-demo";

/// Starts Hotpath with its FCM sender pointed at `fake`.
async fn system_with_fcm(
    fake: &FakeFcm,
    tweak: impl FnOnce(&mut hotpath_core::config::Config),
) -> System {
    let credentials = fake.service_account_json(PROJECT);
    let base_url = fake.base_url();
    let mut system = System::start_with(move |config| {
        config.fcm_credentials = Some(credentials);
        config.fcm_base_url = base_url;
        tweak(config);
    })
    .await;
    system.start_push(None).await;
    system
}

async fn register(system: &System, user: &str, platform: &str, token: &str, sandbox: bool) {
    let response = system
        .post(
            user,
            "/v1/devices",
            json!({"platform": platform, "token": token, "appId": "com.example.chat", "sandbox": sandbox}),
        )
        .await;
    let status = response.status();
    assert!(
        status == 201 || status == 200,
        "device registered: {status}"
    );
}

async fn send_text(system: &System, sender: &str, conversation: Uuid, content: &str) -> String {
    let (status, ack) = system.send(sender, text(conversation, content)).await;
    assert_eq!(status, 202, "{ack}");
    ack["messageId"].as_str().expect("messageId").to_string()
}

fn for_message<'a>(requests: &'a [FcmRequest], message_id: &str) -> Vec<&'a FcmRequest> {
    requests
        .iter()
        .filter(|r| r.body["message"]["data"]["messageId"] == message_id)
        .collect()
}

/// Waits until `predicate` holds for the fake's requests, or panics after `within`.
async fn wait_until(
    fake: &FakeFcm,
    within: Duration,
    what: &str,
    predicate: impl Fn(&[FcmRequest]) -> bool,
) -> Vec<FcmRequest> {
    let deadline = Instant::now() + within;
    loop {
        let requests = fake.requests();
        if predicate(&requests) {
            return requests;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn device_exists(system: &System, token: &str) -> bool {
    let (count,): (i64,) = sqlx::query_as("SELECT count(*) FROM devices WHERE token = $1")
        .bind(token)
        .fetch_one(&system.pool)
        .await
        .expect("count");
    count == 1
}

async fn dlq_entries(system: &System) -> Vec<hotpath::dlq::Entry> {
    let client = async_nats::connect(system.config.nats_url.as_str())
        .await
        .expect("nats");
    hotpath::dlq::list(
        &async_nats::jetstream::new(client),
        Some(DlqSource::Push),
        1000,
    )
    .await
    .expect("DLQ readable")
}

/// Runs the real `hotpath dlq …` command against the test's NATS.
async fn hotpath_dlq(system: &System, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_hotpath"))
        .arg("dlq")
        .args(args)
        .args(["--nats-url", &system.config.nats_url])
        .output()
        .await
        .expect("hotpath runs")
}

#[tokio::test(flavor = "multi_thread")]
async fn an_offline_recipient_gets_one_fcm_push_retried_on_503_and_dead_tokens_are_removed() {
    let fake = FakeFcm::start().await;
    let system = system_with_fcm(&fake, |_| {}).await;
    register(&system, "bob", "fcm", "fcm-token-bob", false).await;
    let conversation = system.conversation("alice", "direct", &["bob"]).await;

    // One message, one push, with the right payload and the token the OAuth endpoint issued.
    let first = send_text(&system, "alice", conversation, "hello bob").await;
    let requests = fake.wait_for_requests(1, PATIENCE).await;
    let push = &requests[0];
    assert_eq!(push.project, PROJECT);
    assert_eq!(push.device_token.as_deref(), Some("fcm-token-bob"));
    let issued = fake.issued_tokens();
    assert!(
        push.bearer.is_some() && issued.contains(push.bearer.as_ref().unwrap()),
        "bearer {:?} was issued by the token endpoint ({issued:?})",
        push.bearer
    );
    let message = &push.body["message"];
    assert_eq!(message["notification"]["title"], "alice");
    assert_eq!(message["notification"]["body"], "hello bob");
    assert_eq!(message["data"]["messageId"], first.as_str());
    assert_eq!(message["data"]["conversationId"], conversation.to_string());
    assert_eq!(message["data"]["seq"], "1");
    assert_eq!(message["android"]["collapse_key"], first.as_str());
    // Nothing more comes for it: a handled task is gone from the work queue.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        for_message(&fake.requests(), &first).len(),
        1,
        "exactly one push"
    );
    let (recorded,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM push_deliveries WHERE message_id = $1::uuid")
            .bind(&first)
            .fetch_one(&system.pool)
            .await
            .expect("count");
    assert_eq!(recorded, 1);

    // 503, 503, 200: delivered on the third try, 1 s and then 5 s apart.
    fake.script(vec![FcmAnswer::unavailable(), FcmAnswer::unavailable()]);
    let second = send_text(&system, "alice", conversation, "are you there?").await;
    let requests = wait_until(&fake, Duration::from_secs(30), "three tries", |requests| {
        for_message(requests, &second).len() >= 3
    })
    .await;
    let tries = for_message(&requests, &second);
    let statuses: Vec<u16> = tries.iter().map(|r| r.answered_status).collect();
    assert_eq!(statuses, vec![503, 503, 200]);
    let gaps = [tries[1].at - tries[0].at, tries[2].at - tries[1].at];
    println!("retry spacing: {gaps:?}");
    assert!(
        gaps[0] >= Duration::from_millis(950) && gaps[0] < Duration::from_secs(4),
        "first retry after about 1 s: {:?}",
        gaps[0]
    );
    assert!(
        gaps[1] >= Duration::from_millis(4950) && gaps[1] < Duration::from_secs(12),
        "second retry after about 5 s: {:?}",
        gaps[1]
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        for_message(&fake.requests(), &second).len(),
        3,
        "no try after the 200"
    );

    // 404 UNREGISTERED: the device is deleted and the push is not retried.
    register(&system, "carol", "fcm", "fcm-token-carol", false).await;
    let with_carol = system.conversation("alice", "direct", &["carol"]).await;
    fake.script_for("fcm-token-carol", vec![FcmAnswer::unregistered()]);
    let third = send_text(&system, "alice", with_carol, "hi carol").await;
    fake.wait_for_requests(5, PATIENCE).await;
    let deadline = Instant::now() + PATIENCE;
    while device_exists(&system, "fcm-token-carol").await {
        assert!(
            Instant::now() < deadline,
            "the unregistered device is deleted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let tries = fake.requests();
    let tries = for_message(&tries, &third);
    assert_eq!(tries.len(), 1, "an unregistered token is not retried");
    assert_eq!(tries[0].answered_status, 404);
    assert!(
        device_exists(&system, "fcm-token-bob").await,
        "other devices stay"
    );
    assert!(
        dlq_entries(&system).await.is_empty(),
        "nothing was dead-lettered"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provider_that_stays_down_blocks_nothing_and_its_pushes_replay_from_the_dlq_once() {
    let fake = FakeFcm::start().await;
    fake.answer_always(FcmAnswer::internal());
    let system = system_with_fcm(&fake, |config| {
        config.push_backoff_ms = Backoff(vec![Duration::from_millis(300); 3]);
        // Keep trying: this test wants every task to use up its retries.
        config.push_breaker_failures = 1_000_000;
    })
    .await;
    register(&system, "bob", "fcm", "fcm-token-bob", false).await;
    let group = system
        .conversation("alice", "group", &["bob", "dave"])
        .await;
    let mut dave = connect(&system, &system.base, "dave").await;

    // Pushes are failing...
    let mut ids = vec![send_text(&system, "alice", group, "update 0").await];
    fake.wait_for_requests(1, PATIENCE).await;
    next_of(&mut dave, "message.new").await;

    // ...and meanwhile messages are still persisted and fanned out at once.
    let mut sent_at: HashMap<String, Instant> = HashMap::new();
    for i in 1..=20 {
        let id = send_text(&system, "alice", group, &format!("update {i}")).await;
        sent_at.insert(id.clone(), Instant::now());
        ids.push(id);
    }
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let frame = next_of(&mut dave, "message.new").await;
        let id = frame["message"]["messageId"]
            .as_str()
            .expect("id")
            .to_string();
        slowest = slowest.max(sent_at[&id].elapsed());
    }
    let failing_meanwhile = fake.requests().len();
    println!(
        "slowest accept→WebSocket while FCM fails: {slowest:?} ({failing_meanwhile} failed pushes so far)"
    );
    assert!(failing_meanwhile > 0, "pushes were failing meanwhile");
    assert!(
        slowest < Duration::from_secs(3),
        "fanout is not held up by failing pushes (slowest {slowest:?})"
    );
    assert_eq!(system.wait_for_messages(21, PATIENCE).await, 21);

    // Each task is tried four times (1 + 3 retries), then lands in the DLQ with the reason.
    let deadline = Instant::now() + Duration::from_secs(60);
    let entries = loop {
        let entries = dlq_entries(&system).await;
        if entries.len() >= ids.len() {
            break entries;
        }
        assert!(
            Instant::now() < deadline,
            "every task reaches the DLQ ({} so far)",
            entries.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(entries.len(), ids.len());
    let entry = &entries[0];
    assert_eq!(entry.source_stream.as_deref(), Some("PUSH"));
    assert_eq!(entry.source_subject.as_deref(), Some("push.fcm"));
    assert_eq!(entry.deliveries.as_deref(), Some("4"));
    let reason = entry.reason.as_deref().unwrap_or_default();
    assert!(
        reason.contains("500") && reason.contains("INTERNAL"),
        "reason: {reason}"
    );
    let requests = fake.requests();
    for id in &ids {
        assert_eq!(for_message(&requests, id).len(), 4, "four tries of {id}");
    }
    assert!(
        device_exists(&system, "fcm-token-bob").await,
        "a failing provider deletes nothing"
    );

    // The provider is back: `hotpath dlq replay --all` delivers each push once.
    fake.answer_always(FcmAnswer::Ok);
    let listed = hotpath_dlq(&system, &["list", "--source", "push"]).await;
    assert!(listed.status.success());
    assert!(String::from_utf8_lossy(&listed.stdout).contains("INTERNAL"));
    let replayed = hotpath_dlq(&system, &["replay", "--all", "--source", "push"]).await;
    assert!(
        replayed.status.success(),
        "{}",
        String::from_utf8_lossy(&replayed.stderr)
    );
    let requests = wait_until(&fake, PATIENCE, "the replayed pushes", |requests| {
        ids.iter().all(|id| {
            for_message(requests, id)
                .iter()
                .any(|r| r.answered_status == 200)
        })
    })
    .await;
    assert!(
        dlq_entries(&system).await.is_empty(),
        "replayed entries leave the DLQ"
    );
    // Replaying the same entries again finds nothing; no push is sent twice.
    let again = hotpath_dlq(&system, &["replay", &entry.seq.to_string()]).await;
    assert!(!again.status.success(), "an entry already replayed is gone");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let requests_after = fake.requests();
    for id in &ids {
        let ok = |requests: &[FcmRequest]| {
            for_message(requests, id)
                .iter()
                .filter(|r| r.answered_status == 200)
                .count()
        };
        assert_eq!(ok(&requests), 1, "{id} delivered once");
        assert_eq!(ok(&requests_after), 1, "{id} still delivered once");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn apns_pushes_go_only_to_offline_devices_without_content_when_the_conversation_says_so() {
    let recorder = Arc::new(RecordingSender::new());
    let mut system = System::start_with(|config| {
        config.push_backoff_ms = Backoff(vec![Duration::from_millis(200); 3]);
    })
    .await;
    let mut senders: Senders = HashMap::new();
    senders.insert(Platform::Apns, recorder.clone());
    system.start_push(Some(senders)).await;

    let apns_token = "a1".repeat(32);
    let conversation = system.conversation("alice", "direct", &["bob"]).await;
    // Before bob has a device there is nothing to push (and the consumers remember that)...
    send_text(&system, "alice", conversation, "before any device").await;
    assert_eq!(system.wait_for_messages(1, PATIENCE).await, 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(recorder.sent().is_empty());
    // ...until he registers one: the registration is announced and pushes start at once.
    register(&system, "bob", "apns", &apns_token, true).await;
    let response = system
        .http
        .put(system.url(&format!("/v1/conversations/{conversation}/settings")))
        .bearer_auth(system.token("alice"))
        .json(&json!({"pushPreview": false}))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);

    // Offline: one push, to the sandbox, without the content.
    let first = send_text(&system, "alice", conversation, "the secret plan").await;
    let sent = recorder.wait_for(1, PATIENCE).await;
    let (device, notification) = &sent[0];
    assert_eq!(device.platform, Platform::Apns);
    assert_eq!(device.token, apns_token);
    assert!(device.sandbox);
    assert_eq!(device.app_id, "com.example.chat");
    assert_eq!(notification.message_id.to_string(), first);
    assert_eq!(notification.conversation_id, conversation);
    assert_eq!(notification.title, "alice");
    assert!(!notification.preview);
    assert!(
        !notification.body.contains("secret"),
        "{}",
        notification.body
    );
    assert_eq!(
        notification.badge,
        Some(2),
        "two unread: the first and this one"
    );

    // Online: the WebSocket gets it, no push is scheduled.
    let mut bob = connect(&system, &system.base, "bob").await;
    // Presence answers are cached for a second by the consumers.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let second = send_text(&system, "alice", conversation, "you there?").await;
    let frame = next_of(&mut bob, "message.new").await;
    assert_eq!(frame["message"]["messageId"], second.as_str());
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(recorder.sent().len(), 1, "no push to a user who is online");
    drop(bob);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Unavailable once: retried, then sent, and sent once.
    recorder.script(vec![PushOutcome::Retry {
        reason: "apns 503 ServiceUnavailable".into(),
        retry_after: None,
    }]);
    let third = send_text(&system, "alice", conversation, "hello?").await;
    recorder.wait_for(3, PATIENCE).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let sends = recorder.sends();
    let tries: Vec<&PushOutcome> = sends
        .iter()
        .filter(|s| s.notification.message_id.to_string() == third)
        .map(|s| &s.outcome)
        .collect();
    assert_eq!(tries.len(), 2, "{tries:?}");
    assert_eq!(tries[1], &PushOutcome::Sent);

    // Unregistered: the device is deleted, nothing retried.
    recorder.script(vec![PushOutcome::InvalidToken {
        reason: "apns 410 Unregistered".into(),
    }]);
    send_text(&system, "alice", conversation, "bye").await;
    recorder.wait_for(4, PATIENCE).await;
    let deadline = Instant::now() + PATIENCE;
    while device_exists(&system, &apns_token).await {
        assert!(
            Instant::now() < deadline,
            "the unregistered device is deleted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(recorder.sent().len(), 4, "no retry after Unregistered");

    let metrics: String = system.metrics().await;
    // Counted, not only present: every reason is exported at 0 from the start.
    for (name, label) in [
        ("delivery_push_enqueued_total", "reason=\"offline\""),
        ("delivery_push_sent_total", "platform=\"apns\""),
        ("delivery_push_failed_total", "reason=\"invalid_token\""),
        ("delivery_push_failed_total", "reason=\"unavailable\""),
    ] {
        assert!(
            metric_sum(&metrics, name, label) >= 1.0,
            "metrics count {name}{{{label}}}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provider_that_is_down_trips_the_breaker_and_its_tasks_wait_in_the_stream() {
    let fake = FakeFcm::start().await;
    fake.answer_always(FcmAnswer::unavailable());
    let system = system_with_fcm(&fake, |config| {
        config.push_breaker_failures = 3;
        config.push_breaker_open_secs = 2;
    })
    .await;
    register(&system, "bob", "fcm", "fcm-token-bob", false).await;
    let conversation = system.conversation("alice", "direct", &["bob"]).await;
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(send_text(&system, "alice", conversation, &format!("ping {i}")).await);
    }
    fake.wait_for_requests(3, PATIENCE).await;

    // Without a breaker the ten tasks would each have been tried again after 1 s (and the
    // provider hit 20 times by now); with it, the worker stops pulling and one trial goes out
    // when the open period ends.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let tried = fake.requests().len();
    println!("requests to a provider that is down, 4 s after the first failures: {tried}");
    assert!(
        tried <= 13,
        "the breaker holds the tasks back ({tried} requests)"
    );
    let client = async_nats::connect(system.config.nats_url.as_str())
        .await
        .expect("nats");
    let mut stream = async_nats::jetstream::new(client)
        .get_stream("PUSH")
        .await
        .expect("PUSH");
    let waiting = stream.info().await.expect("info").state.messages;
    assert_eq!(waiting, 10, "the tasks wait in the stream");
    let metrics = system.metrics().await;
    assert!(
        metrics.contains("delivery_push_breaker_open{platform=\"fcm\""),
        "the breaker is visible in the metrics"
    );

    // The provider is back: the next trial closes the breaker and every task is delivered,
    // once, without any of them having been used up by the wait.
    fake.answer_always(FcmAnswer::Ok);
    let requests = wait_until(
        &fake,
        Duration::from_secs(40),
        "every push delivered",
        |r| {
            ids.iter()
                .all(|id| for_message(r, id).iter().any(|r| r.answered_status == 200))
        },
    )
    .await;
    for id in &ids {
        let delivered = for_message(&requests, id)
            .iter()
            .filter(|r| r.answered_status == 200)
            .count();
        assert_eq!(delivered, 1, "{id} delivered once");
    }
    assert!(
        dlq_entries(&system).await.is_empty(),
        "no task ran out of tries while waiting"
    );
    let deadline = Instant::now() + PATIENCE;
    while stream.info().await.expect("info").state.messages > 0 {
        assert!(Instant::now() < deadline, "the work queue empties");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends every entry of the replay window through `MESSAGES` again, each to its partition's
/// subject under a new `Nats-Msg-Id`: what the delivery consumers see when a batch is
/// delivered again. Returns how many were sent.
async fn process_window_again(js: &async_nats::jetstream::Context) -> u64 {
    use async_nats::jetstream::{consumer::DeliverPolicy, message::PublishMessage};
    use hotpath_core::names;
    use hotpath_core::stream_copy::{Pipeline, StreamReader, stream_sequence};

    let mut reader = StreamReader::open(js, names::REPLAY_STREAM, "", DeliverPolicy::All)
        .await
        .expect("reading REPLAY");
    let mut pipeline = Pipeline::new(js);
    let mut sent = 0;
    while let Some(message) = reader.next().await.expect("a window entry") {
        let seq = stream_sequence(&message).expect("its sequence");
        let partition =
            names::partition_of_replay_subject(&message.subject).expect("its partition");
        let again = PublishMessage::build()
            .payload(message.payload.clone())
            .message_id(format!("again:{seq}"));
        pipeline
            .publish(names::message_subject(partition), again)
            .await
            .expect("published");
        sent += 1;
    }
    pipeline.finish().await.expect("stored in MESSAGES");
    sent
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delivery_batch_processed_again_schedules_no_second_push() {
    let mut system = System::start().await;
    register(&system, "bob", "apns", &"b2".repeat(32), false).await;
    let conversation = system.conversation("alice", "direct", &["bob"]).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(send_text(&system, "alice", conversation, &format!("note {i}")).await);
    }
    assert_eq!(system.wait_for_messages(3, PATIENCE).await, 3);
    let client = async_nats::connect(system.config.nats_url.as_str())
        .await
        .expect("nats");
    let js = async_nats::jetstream::new(client);
    let mut push_stream = js.get_stream("PUSH").await.expect("PUSH");
    let deadline = Instant::now() + PATIENCE;
    while push_stream.info().await.expect("info").state.messages < 3 {
        assert!(Instant::now() < deadline, "three push tasks are scheduled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Every message is processed again, as after a consumer that died before its acks: the
    // whole replay window goes through MESSAGES once more, every message is found stored and
    // its push scheduled again, and JetStream drops the copies by their message ids.
    let mut window = js.get_stream("REPLAY").await.expect("REPLAY");
    let deadline = Instant::now() + PATIENCE;
    while window.info().await.expect("info").state.messages < 3 {
        assert!(
            Instant::now() < deadline,
            "the replay window holds the three messages"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        process_window_again(&js).await,
        3,
        "the whole window is sent again"
    );
    let partition =
        hotpath_core::names::partition_of(&conversation.to_string(), system.config.partitions);
    let mut messages = js.get_stream("MESSAGES").await.expect("MESSAGES");
    let last = messages.info().await.expect("info").state.last_sequence;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let info = messages
            .consumer_info(hotpath_core::names::delivery_consumer(partition))
            .await
            .expect("consumer info");
        if info.ack_floor.stream_sequence >= last && info.num_ack_pending == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the replayed batch is settled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        push_stream.info().await.expect("info").state.messages,
        3,
        "no task was scheduled twice"
    );

    // And the devices hear of each message once.
    let recorder = Arc::new(RecordingSender::new());
    let mut senders: Senders = HashMap::new();
    senders.insert(Platform::Apns, recorder.clone());
    system.start_push(Some(senders)).await;
    recorder.wait_for(3, PATIENCE).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mut pushed: Vec<String> = recorder
        .sent()
        .iter()
        .map(|(_, n)| n.message_id.to_string())
        .collect();
    pushed.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(pushed, expected, "one push per message");
}
