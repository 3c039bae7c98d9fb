//! `hotpath replay` (ADR 0012), run as the real binary against a real NATS and Postgres, the
//! way an operator uses it: Postgres restored from an older backup (the newest rows of
//! `messages` gone, `last_seq` back to the backup's) gets every lost row back exactly once,
//! with the seq it had, and the summary counts what was restored and what was there already;
//! a range that is all there inserts nothing; bad arguments are refused with a clear error.

use hotpath_testkit as support;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use hotpath_core::announcements::{Announcement as _, HistoryChanged};
use hotpath_core::envelope::Envelope;
use hotpath_core::names;
use serde_json::{Value, json};
use support::{System, message_id_of, text};
use uuid::Uuid;

const PATIENCE: Duration = Duration::from_secs(60);

/// A stored row as a restore must bring it back: (id, conversation, seq, partition,
/// stream_seq, idempotency key, content).
type StoredRow = (Uuid, Uuid, i64, i32, i64, String, String);

async fn stored_rows(system: &System) -> Vec<StoredRow> {
    sqlx::query_as(
        "SELECT id, conversation_id, seq, stream_partition, stream_seq, idempotency_key, content
           FROM messages ORDER BY stream_seq",
    )
    .fetch_all(&system.pool)
    .await
    .expect("rows")
}

/// Each conversation's `last_seq`.
async fn last_seqs(system: &System) -> BTreeMap<Uuid, i64> {
    let rows: Vec<(Uuid, i64)> = sqlx::query_as("SELECT id, last_seq FROM conversations")
        .fetch_all(&system.pool)
        .await
        .expect("conversations");
    rows.into_iter().collect()
}

/// Sends `count` messages round-robin over `conversations`, each with its own
/// `clientMessageId`, and waits until all are stored and copied into the replay window.
async fn persist_messages(system: &System, conversations: &[Uuid], count: usize) -> HashSet<Uuid> {
    let mut accepted = HashSet::new();
    for n in 0..count {
        let conversation = conversations[n % conversations.len()];
        let mut body = text(conversation, &format!("message {n}"));
        body["clientMessageId"] = json!(format!("m-{n}"));
        let (status, ack) = system.send("alice", body).await;
        assert_eq!(status, 202, "{ack}");
        accepted.insert(message_id_of(&ack));
    }
    assert_eq!(
        system.wait_for_messages(count as i64, PATIENCE).await,
        count as i64
    );
    let js = system.jetstream().await;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mut window = js.get_stream(names::REPLAY_STREAM).await.expect("REPLAY");
        let held = window.info().await.expect("REPLAY info").state.messages;
        if held >= count as u64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the window holds {held} of {count}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    accepted
}

/// `count` conversations between alice and bob that cover as many of the test config's
/// partitions as they can (ids are random: made until they do, a bounded number of times).
async fn conversations(system: &System, count: usize) -> Vec<Uuid> {
    let partitions = system.config.partitions;
    let wanted = count.min(partitions as usize);
    let mut all = Vec::new();
    let mut covered: HashSet<u32> = HashSet::new();
    for _ in 0..200 {
        let conversation = system.conversation("alice", "group", &["bob"]).await;
        let partition = names::partition_of(&conversation.to_string(), partitions);
        let new_partition = covered.insert(partition);
        if new_partition || covered.len() == wanted {
            all.push(conversation);
        }
        if all.len() == count && covered.len() == wanted {
            return all;
        }
    }
    panic!("no {count} conversations over {wanted} partitions in 200 tries");
}

/// What a restore from a backup taken after the `kept` oldest messages leaves: the newer rows
/// gone, and each conversation's `last_seq` what it was then.
async fn restore_older_backup(system: &System, kept: usize) {
    let rows = stored_rows(system).await;
    let cutoff = rows[kept - 1].4;
    sqlx::query("DELETE FROM messages WHERE stream_seq > $1")
        .bind(cutoff)
        .execute(&system.pool)
        .await
        .expect("delete the newest rows");
    sqlx::query(
        "UPDATE conversations c
            SET last_seq = COALESCE((SELECT max(seq) FROM messages m WHERE m.conversation_id = c.id), 0)",
    )
    .execute(&system.pool)
    .await
    .expect("last_seq as of the backup");
}

/// The replay window in order: (window sequence, message id).
async fn window_order(system: &System) -> Vec<(u64, Uuid)> {
    use async_nats::jetstream::consumer::DeliverPolicy;
    use hotpath_core::stream_copy::{StreamReader, stream_sequence};

    let js = system.jetstream().await;
    let mut reader = StreamReader::open(&js, names::REPLAY_STREAM, "", DeliverPolicy::All)
        .await
        .expect("reading REPLAY");
    let mut window = Vec::new();
    while let Some(message) = reader.next().await.expect("a window entry") {
        let envelope = Envelope::decode(&message.payload).expect("an envelope");
        window.push((stream_sequence(&message).expect("seq"), envelope.message_id));
    }
    window
}

/// Runs the real `hotpath replay …` against the test's NATS and Postgres.
async fn hotpath_replay(system: &System, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_hotpath"))
        .arg("replay")
        .args(args)
        .arg("--nats-url")
        .arg(system.servers.nats.url())
        .arg("--database-url")
        .arg(&system.config.database_url)
        .output()
        .await
        .expect("hotpath replay runs")
}

/// The summary's counts, by line label ("partition 3", "total"): [read, restored, already
/// present, renumbered, not restored].
fn summary(stdout: &str) -> BTreeMap<String, [u64; 5]> {
    stdout
        .lines()
        .filter_map(|line| {
            let (label, counts) = line.split_once(": ")?;
            let numbers: Vec<u64> = counts
                .split(", ")
                .filter_map(|part| part.rsplit(' ').next()?.parse().ok())
                .collect();
            let counts: [u64; 5] = numbers.try_into().ok()?;
            Some((label.to_string(), counts))
        })
        .collect()
}

fn succeeded(output: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "hotpath replay failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restored_from_an_older_backup_gets_every_lost_row_back_with_its_seq() {
    const SENT: usize = 60;
    const KEPT: usize = 35;
    let mut system = System::start().await;
    let conversations = conversations(&system, 6).await;
    persist_messages(&system, &conversations, SENT).await;
    let before = stored_rows(&system).await;
    let last_seq_before = last_seqs(&system).await;

    // The operator stops the consumers, restores last night's backup, replays, then starts
    // the consumers again (README "Operations").
    system.stop_consumers().await;
    restore_older_backup(&system, KEPT).await;
    assert_eq!(stored_rows(&system).await.len(), KEPT);
    let mut lost_per_partition: BTreeMap<String, u64> = BTreeMap::new();
    for row in &before[KEPT..] {
        *lost_per_partition
            .entry(format!("partition {}", row.3))
            .or_default() += 1;
    }

    // First the second half of what was lost (by window order), as an operator who started
    // too late would: each of those comes back with its own seq, above the holes that the
    // first half leaves, which the whole replay then fills.
    let lost: HashSet<Uuid> = before[KEPT..].iter().map(|row| row.0).collect();
    let window = window_order(&system).await;
    let lost_in_window: Vec<u64> = window
        .iter()
        .filter(|(_, id)| lost.contains(id))
        .map(|(seq, _)| *seq)
        .collect();
    let from = lost_in_window[lost_in_window.len() / 2];
    let later: Vec<&Uuid> = window
        .iter()
        .filter(|(seq, _)| *seq >= from)
        .map(|(_, id)| id)
        .collect();
    let later_lost = later.iter().filter(|id| lost.contains(id)).count() as u64;
    let half = summary(&succeeded(
        &hotpath_replay(&system, &["--from-seq", &from.to_string()]).await,
    ));
    assert_eq!(
        half["total"],
        [
            later.len() as u64,
            later_lost,
            later.len() as u64 - later_lost,
            0,
            0
        ]
    );
    let restored_first: Vec<StoredRow> = stored_rows(&system)
        .await
        .into_iter()
        .filter(|row| lost.contains(&row.0))
        .collect();
    let expected_first: Vec<StoredRow> = before
        .iter()
        .filter(|row| lost.contains(&row.0) && later.contains(&&row.0))
        .cloned()
        .collect();
    assert_eq!(
        restored_first, expected_first,
        "restored out of order, seq unchanged"
    );

    // A client reads a conversation's history while rows are still missing: the gateway
    // caches that page. The replay must announce what it put back, so the page is dropped.
    let restored_now: Vec<&StoredRow> = before[KEPT..]
        .iter()
        .filter(|row| !restored_first.iter().any(|first| first.0 == row.0))
        .collect();
    let mut announced_seqs: BTreeMap<Uuid, i64> = BTreeMap::new();
    for row in &restored_now {
        let seq = announced_seqs.entry(row.1).or_insert(row.2);
        *seq = (*seq).max(row.2);
    }
    let watched = restored_now.first().expect("rows to restore now").1;
    let page_path = format!("/v1/conversations/{watched}/messages?after_seq=0");
    let history_len = |page: &Value| page["messages"].as_array().map_or(0, Vec::len);
    let stale: Value = system.get("alice", &page_path).await.json().await.unwrap();
    let complete = before.iter().filter(|row| row.1 == watched).count();
    assert!(history_len(&stale) < complete, "{stale}");
    let listener = system.jetstream().await.client();
    let mut announcements = listener
        .subscribe(names::HISTORY_INVALIDATE_SUBJECT)
        .await
        .expect("subscribe to the history announcements");
    listener
        .flush()
        .await
        .expect("the subscription reaches the server");

    let output = hotpath_replay(&system, &["--since", "1h"]).await;
    let stdout = succeeded(&output);

    // One announcement per conversation that got rows back, with the highest seq restored.
    let mut heard: BTreeMap<Uuid, i64> = BTreeMap::new();
    let deadline = Instant::now() + PATIENCE;
    while heard != announced_seqs {
        let next = tokio::time::timeout_at(deadline.into(), announcements.next())
            .await
            .unwrap_or_else(|_| panic!("announced {heard:?}, expected {announced_seqs:?}"))
            .expect("the subscription stays open");
        let changed = HistoryChanged::decode(&next.payload).expect("a history announcement");
        heard.insert(
            changed.conversation_id,
            changed.last_seq.expect("restored rows carry their seq"),
        );
    }
    // And the gateway, told the same, serves the page with the restored rows.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let page: Value = system.get("alice", &page_path).await.json().await.unwrap();
        if history_len(&page) == complete {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "history still without the restored rows: {page}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Every row is back exactly once, as it was: same id, conversation, seq, stream position.
    assert_eq!(stored_rows(&system).await, before, "{stdout}");
    assert_eq!(
        last_seqs(&system).await,
        last_seq_before,
        "last_seq covers every row"
    );
    support::assert_gap_free_in_acceptance_order(&system.pool).await;

    // The summary says what happened, per partition and in all.
    let counts = summary(&stdout);
    let rest = (SENT - KEPT) as u64 - later_lost;
    assert_eq!(
        counts["total"],
        [SENT as u64, rest, SENT as u64 - rest, 0, 0],
        "{stdout}"
    );
    let mut restored_first_per_partition: BTreeMap<String, u64> = BTreeMap::new();
    for row in &restored_first {
        *restored_first_per_partition
            .entry(format!("partition {}", row.3))
            .or_default() += 1;
    }
    let mut read_per_partition: BTreeMap<String, u64> = BTreeMap::new();
    for row in &before {
        *read_per_partition
            .entry(format!("partition {}", row.3))
            .or_default() += 1;
    }
    for (label, read) in &read_per_partition {
        let restored = lost_per_partition.get(label).copied().unwrap_or(0);
        let restored = restored
            - restored_first_per_partition
                .get(label)
                .copied()
                .unwrap_or(0);
        assert_eq!(
            counts[label],
            [*read, restored, read - restored, 0, 0],
            "{label}: {stdout}"
        );
    }

    // Running it again finds everything present and inserts nothing.
    let again = summary(&succeeded(
        &hotpath_replay(&system, &["--since", "1h"]).await,
    ));
    assert_eq!(again["total"], [SENT as u64, 0, SENT as u64, 0, 0]);

    // The live path numbers the next message after the restored ones.
    system.start_consumers().await;
    let newest = before.last().expect("rows");
    let (status, ack) = system
        .send("alice", text(newest.1, "after the restore"))
        .await;
    assert_eq!(status, 202, "{ack}");
    let id = message_id_of(&ack);
    assert_eq!(
        system.wait_for_messages(SENT as i64 + 1, PATIENCE).await,
        SENT as i64 + 1
    );
    let (seq,): (i64,) = sqlx::query_as("SELECT seq FROM messages WHERE id = $1")
        .bind(id)
        .fetch_one(&system.pool)
        .await
        .expect("the new message");
    assert_eq!(seq, newest.2 + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_a_range_that_is_all_present_inserts_nothing_and_bad_arguments_are_refused() {
    const SENT: usize = 20;
    let system = System::start().await;
    let conversations = conversations(&system, 4).await;
    persist_messages(&system, &conversations, SENT).await;
    let before = stored_rows(&system).await;

    // Window sequences 3 to 7: five entries read, all already present.
    let stdout = succeeded(&hotpath_replay(&system, &["--from-seq", "3", "--to-seq", "7"]).await);
    assert!(
        stdout.contains("replayed REPLAY sequences 3 to 7"),
        "{stdout}"
    );
    assert_eq!(summary(&stdout)["total"], [5, 0, 5, 0, 0], "{stdout}");

    // One partition's entries only.
    let partition = names::partition_of(&conversations[0].to_string(), system.config.partitions);
    // Every stored message is in the window: the partition's rows are its entries.
    let held = before
        .iter()
        .filter(|row| row.3 == partition as i32)
        .count() as u64;
    let stdout = succeeded(
        &hotpath_replay(
            &system,
            &["--from-seq", "1", "--partition", &partition.to_string()],
        )
        .await,
    );
    let counts = summary(&stdout);
    assert_eq!(counts["total"], [held, 0, held, 0, 0], "{stdout}");
    assert_eq!(counts.len(), 2, "only partition {partition}: {stdout}");
    assert_eq!(stored_rows(&system).await, before, "nothing was written");

    for (args, says) in [
        (
            &["--from-seq", "3", "--since", "1h"][..],
            "cannot be used with",
        ),
        (
            &["--from-seq", "7", "--to-seq", "3"][..],
            "--to-seq 3 is before --from-seq 7",
        ),
        (
            &["--since", "1h", "--partition", "99"][..],
            "there is no partition 99",
        ),
        (
            &["--since", "an hour"][..],
            "invalid value 'an hour' for '--since",
        ),
        (&["--to-seq", "3"][..], "--from-seq"),
    ] {
        let output = hotpath_replay(&system, args).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} is refused");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}

/// README "Operations"'s `nats consumer add` command for a replay through the intake, with
/// its continuation lines joined.
fn readme_replay_consumer_command() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let start = readme
        .find("nats consumer add REPLAY hotpath-restore")
        .expect("README gives the replay consumer's `nats consumer add` command");
    let mut command = String::new();
    for line in readme[start..].lines() {
        match line.strip_suffix('\\') {
            Some(part) => command.push_str(part),
            None => {
                command.push_str(line);
                break;
            }
        }
    }
    command
}

/// Runs `cli/tests/fixtures/nats_consumer_add.py` with nats-py (installed into `.tools/venv`
/// by `scripts/setup.sh`): creates the consumer `command` describes, waits until what it
/// delivered is acknowledged, removes it; returns its configuration and state.
async fn nats_py_consumer_add(system: &System, command: &str) -> Value {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let python = std::path::Path::new(root).join(".tools/venv/bin/python");
    assert!(
        python.exists(),
        "nats-py is not installed: run `. scripts/setup.sh` (it installs it into .tools/venv)"
    );
    let output = tokio::process::Command::new(python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/nats_consumer_add.py"
        ))
        .arg(system.servers.nats.url())
        .arg(command)
        .output()
        .await
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{command}\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).expect("one JSON line")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_nats_consumer_recipe_replays_into_postgres_through_the_intake() {
    const SENT: usize = 40;
    const KEPT: usize = 22;
    let system = System::start().await;
    let conversations = conversations(&system, 6).await;
    persist_messages(&system, &conversations, SENT).await;
    let before = stored_rows(&system).await;
    let last_seq_before = last_seqs(&system).await;
    let js = system.jetstream().await;
    let mut window = js.get_stream(names::REPLAY_STREAM).await.expect("REPLAY");
    let last_window_seq = window
        .info()
        .await
        .expect("REPLAY info")
        .state
        .last_sequence;
    let metrics = system.metrics().await;
    let restored_before = support::metric_sum(
        &metrics,
        "delivery_replay_intake_total",
        "outcome=\"restored\"",
    );

    // The backup is restored (nothing is sent meanwhile, as with the gateways stopped) and
    // the operator creates the README's consumer: the consumers' intake restores what it
    // delivers.
    restore_older_backup(&system, KEPT).await;
    let command = readme_replay_consumer_command();
    let consumer = nats_py_consumer_add(&system, &command).await;

    assert_eq!(
        consumer["deliver_subject"],
        names::REPLAY_INTAKE_SUBJECT,
        "{command}"
    );
    assert_eq!(consumer["deliver_group"], names::REPLAY_INTAKE_GROUP);
    assert_eq!(consumer["deliver_policy"], "by_start_time");
    assert_eq!(consumer["ack_policy"], "explicit");
    assert_eq!(consumer["filter_subject"], "replay.msgs.*");
    assert_eq!(
        consumer["ack_floor_stream_seq"], last_window_seq,
        "{consumer}"
    );

    // Every entry was acknowledged after its batch was restored: every row is back once, as
    // it was.
    assert_eq!(stored_rows(&system).await, before);
    assert_eq!(last_seqs(&system).await, last_seq_before);
    let metrics = system.metrics().await;
    let restored = support::metric_sum(
        &metrics,
        "delivery_replay_intake_total",
        "outcome=\"restored\"",
    ) - restored_before;
    assert_eq!(restored, (SENT - KEPT) as f64, "{metrics}");
    // And the recipe's consumer is gone again.
    assert!(window.consumer_info("hotpath-restore").await.is_err());
}
