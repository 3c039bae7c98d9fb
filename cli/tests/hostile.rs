//! Slow and hostile clients against real gateways on real NATS and Postgres: hundreds of
//! connections trickling headers (slowloris) or bodies, the connection cap, Postgres reads
//! stuck behind a lock, and unknown message ids asked for again and again.
//!
//! The tests that do not stop servers share one system (nats-server, Postgres, consumers) on
//! a runtime of their own; each starts its own gateway with the limits it is about, so their
//! caches and caps are apart. The test that locks a table has a system of its own.

use hotpath_testkit as support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use hotpath_core::config::Config;
use hotpath_core::ids::{Request, idempotency_key, message_id, request_digest};
use serde_json::{Value, json};
use support::{System, message_id_of, metric_sum, text};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How long any one step may take before the test calls it hung: a liveness bound, far above
/// what the behaviour needs.
const PATIENCE: Duration = Duration::from_secs(20);

struct Shared {
    runtime: tokio::runtime::Runtime,
    system: System,
}

static SHARED: OnceLock<Shared> = OnceLock::new();

/// Runs `test` on the shared system's runtime.
fn on_shared<F: Future>(test: impl FnOnce(&'static System) -> F) -> F::Output {
    let shared = SHARED.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("shared runtime");
        let system = runtime.block_on(System::start());
        Shared { runtime, system }
    });
    shared.runtime.block_on(test(&shared.system))
}

/// A gateway of the test's own on the system's servers, with `tweak`ed limits.
struct Gateway {
    addr: SocketAddr,
    stop: CancellationToken,
}

impl Gateway {
    async fn start(system: &System, tweak: impl FnOnce(&mut Config)) -> Gateway {
        let mut config = system.config.clone();
        tweak(&mut config);
        let stop = CancellationToken::new();
        let (addr, _task) = hotpath::roles::spawn_gateway(config, stop.clone())
            .await
            .expect("gateway starts");
        Gateway { addr, stop }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// An HTTP client that gives up after [`PATIENCE`]: a hung answer fails the test.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(PATIENCE)
        .build()
        .expect("http client")
}

/// How a hostile connection ended.
#[derive(Debug)]
struct Ended {
    /// From connecting until the server closed the connection; `None` if it never did.
    closed_after: Option<Duration>,
    /// Whatever the server answered before closing.
    answer: String,
}

/// Connects, writes `opening`, then trickles `trickle` one byte every `interval` until the
/// server closes the connection (or [`PATIENCE`] passes). `started` counts the connection
/// once its opening is written.
async fn trickle(
    addr: SocketAddr,
    opening: String,
    trickle: &'static [u8],
    interval: Duration,
    started: Arc<AtomicUsize>,
) -> Ended {
    let began = Instant::now();
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(opening.as_bytes())
        .await
        .expect("opening written");
    started.fetch_add(1, Ordering::SeqCst);
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let mut next = trickle.iter().cycle();
    let mut writing = true;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            },
            () = tokio::time::sleep(interval), if writing => {
                let byte = [*next.next().expect("cycle")];
                // The server may have closed already: stop writing, keep reading its answer.
                writing = stream.write_all(&byte).await.is_ok();
            }
            () = tokio::time::sleep_until(deadline) => {
                return Ended { closed_after: None, answer: String::from_utf8_lossy(&answer).into() };
            }
        }
    }
    Ended {
        closed_after: Some(began.elapsed()),
        answer: String::from_utf8_lossy(&answer).into(),
    }
}

#[test]
fn slow_headers_and_trickled_bodies_neither_stop_other_sends_nor_stay_open() {
    on_shared(|system| async move {
        const SLOW_HEADS: usize = 300;
        const SLOW_BODIES: usize = 300;
        let header_timeout = Duration::from_secs(3);
        let body_timeout = Duration::from_secs(3);
        // Fewer send slots than trickled bodies: were a slot held while a body trickles in,
        // the trickles would take them all.
        let gateway = Gateway::start(system, |config| {
            config.http_header_timeout_secs = header_timeout.as_secs();
            config.http_body_timeout_secs = body_timeout.as_secs();
            config.max_in_flight_sends = 50;
        })
        .await;
        let conversation = system.conversation("alice", "group", &["bob"]).await;
        let token = system.token("mallory");
        let started = Arc::new(AtomicUsize::new(0));

        // Headers that never end, and bodies that never end after complete headers.
        let slow_head = "POST /v1/messages HTTP/1.1\r\nHost: gateway\r\n".to_string();
        let body = text(conversation, "never finished").to_string();
        let slow_body = format!(
            "POST /v1/messages HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len() + 1000
        );
        let openings = std::iter::repeat_n((slow_head, &b"X-Slow: y\r\n"[..]), SLOW_HEADS)
            .chain(std::iter::repeat_n((slow_body, &b" "[..]), SLOW_BODIES));
        let attackers: Vec<_> = openings
            .map(|(opening, drip)| {
                tokio::spawn(trickle(
                    gateway.addr,
                    opening,
                    drip,
                    Duration::from_millis(250),
                    started.clone(),
                ))
            })
            .collect();
        let all_started = Instant::now() + PATIENCE;
        while started.load(Ordering::SeqCst) < SLOW_HEADS + SLOW_BODIES {
            assert!(Instant::now() < all_started, "the attack did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // Meanwhile another client sends, and is answered.
        let http = client();
        let mut slowest = Duration::ZERO;
        for i in 0..20 {
            let sent = Instant::now();
            let response = http
                .post(gateway.url("/v1/messages"))
                .bearer_auth(system.token("alice"))
                .json(&text(conversation, &format!("through the storm {i}")))
                .send()
                .await
                .expect("a send is answered during the attack");
            slowest = slowest.max(sent.elapsed());
            let status = response.status().as_u16();
            let ack: Value = response.json().await.unwrap_or(Value::Null);
            assert_eq!(status, 202, "send {i} during the attack: {ack}");
        }
        let still_trickling = attackers.iter().filter(|a| !a.is_finished()).count();
        eprintln!(
            "20 sends during the attack: slowest answered in {slowest:?}; \
             {still_trickling} of {} slow connections still open when they were done",
            SLOW_HEADS + SLOW_BODIES
        );

        // Every slow connection is closed by the server, within its timeout (plus slack for
        // a loaded machine), never before it.
        let mut head_closes = Vec::new();
        let mut body_closes = Vec::new();
        for (i, attacker) in attackers.into_iter().enumerate() {
            let ended = attacker.await.expect("attacker task");
            let closed_after = ended
                .closed_after
                .unwrap_or_else(|| panic!("slow connection {i} was never closed: {ended:?}"));
            if i < SLOW_HEADS {
                assert!(
                    closed_after >= header_timeout,
                    "{i} closed early: {ended:?}"
                );
                assert!(ended.answer.is_empty(), "slowloris {i}: {ended:?}");
                head_closes.push(closed_after);
            } else {
                assert!(closed_after >= body_timeout, "{i} closed early: {ended:?}");
                assert!(
                    ended.answer.starts_with("HTTP/1.1 408")
                        && ended.answer.contains("\"code\":\"REQUEST_TIMEOUT\""),
                    "a trickled body is answered 408 REQUEST_TIMEOUT: {ended:?}"
                );
                body_closes.push(closed_after);
            }
        }
        let latest = |closes: &[Duration]| closes.iter().max().copied().unwrap_or_default();
        eprintln!(
            "slow headers closed within {:?} (timeout {header_timeout:?}), \
             trickled bodies within {:?} (timeout {body_timeout:?})",
            latest(&head_closes),
            latest(&body_closes)
        );
        let metrics = system.metrics().await;
        assert!(
            metric_sum(
                &metrics,
                "gateway_http_connections_closed_total",
                "header_timeout"
            ) >= SLOW_HEADS as f64,
            "closes are counted"
        );
    });
}

/// Writes one keep-alive GET and reads its answer's status line, or `None` if the server
/// closed the connection instead of answering.
async fn get_on(stream: &mut TcpStream, path: &str) -> Option<String> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: gateway\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + PATIENCE;
    // The answers read here are small: the whole of one arrives in a read or two.
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let read = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .expect("the server answers or closes");
        match read {
            Ok(0) | Err(_) => return None,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    let answer = String::from_utf8_lossy(&answer).to_string();
    answer.lines().next().map(str::to_string)
}

#[test]
fn connections_beyond_the_cap_are_closed_at_once_and_a_closed_one_frees_its_slot() {
    on_shared(|system| async move {
        const CAP: usize = 4;
        let gateway = Gateway::start(system, |config| config.max_connections = CAP).await;

        let mut held = Vec::new();
        for _ in 0..CAP {
            let mut stream = TcpStream::connect(gateway.addr).await.expect("connect");
            let status = get_on(&mut stream, "/healthz").await;
            assert_eq!(status.as_deref(), Some("HTTP/1.1 200 OK"));
            held.push(stream);
        }

        // One more: accepted by the kernel, closed by the gateway without an answer.
        let mut over = TcpStream::connect(gateway.addr).await.expect("connect");
        assert_eq!(
            get_on(&mut over, "/healthz").await,
            None,
            "a connection over the cap is closed"
        );

        // The held ones still work.
        assert_eq!(
            get_on(&mut held[0], "/healthz").await.as_deref(),
            Some("HTTP/1.1 200 OK")
        );

        // Closing one gives its slot to the next connection.
        drop(held.pop());
        let deadline = Instant::now() + PATIENCE;
        loop {
            let mut stream = TcpStream::connect(gateway.addr).await.expect("connect");
            if get_on(&mut stream, "/healthz").await.as_deref() == Some("HTTP/1.1 200 OK") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the freed slot was never given out"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let metrics = system.metrics().await;
        assert!(metric_sum(&metrics, "gateway_http_connections_refused_total", "") >= 1.0);
    });
}

/// A keep-alive connection outlives the header timeout between requests and is closed at the
/// idle timeout; a WebSocket, once upgraded, outlives both (and the body timeout).
#[test]
fn idle_keep_alives_close_at_the_idle_timeout_and_websockets_outlive_every_http_timeout() {
    on_shared(|system| async move {
        let idle_timeout = Duration::from_secs(4);
        let gateway = Gateway::start(system, |config| {
            config.http_header_timeout_secs = 1;
            config.http_body_timeout_secs = 1;
            config.http_idle_timeout_secs = idle_timeout.as_secs();
        })
        .await;
        let base = format!("http://{}", gateway.addr);
        // A user nobody writes to, so the only frame it gets is the answer to its ping.
        let mut socket = support::ws::connect(system, &base, "quiet-listener").await;

        let mut stream = TcpStream::connect(gateway.addr).await.expect("connect");
        let first = get_on(&mut stream, "/healthz").await;
        assert_eq!(first.as_deref(), Some("HTTP/1.1 200 OK"));
        // Twice the header timeout later, the idle connection still serves.
        tokio::time::sleep(Duration::from_secs(2)).await;
        // The server's idle clock starts once it has written the answer, which is after the
        // request left here: timed from before the request, the close can never look early
        // however late this task is scheduled.
        let idle_since = Instant::now();
        let second = get_on(&mut stream, "/healthz").await;
        assert_eq!(
            second.as_deref(),
            Some("HTTP/1.1 200 OK"),
            "an idle keep-alive is not closed at the header timeout"
        );
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
            .await
            .expect("the idle connection is closed in time");
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "closed, not answered: {read:?}"
        );
        let closed_after = idle_since.elapsed();
        assert!(
            closed_after >= idle_timeout,
            "closed early: {closed_after:?}"
        );
        eprintln!(
            "an idle keep-alive was closed after {closed_after:?} (idle timeout {idle_timeout:?})"
        );

        // The socket opened before all that is still alive and answering.
        support::ws::ping(&mut socket).await;
    });
}

/// An unknown message id costs Postgres one lookup, then is answered from memory: with the
/// messages table locked (any query on it would wait, then time out), further requests for
/// that id still answer 404 at once. A message accepted under that id afterwards is found.
#[test]
fn an_unknown_message_id_is_looked_up_once_and_a_later_message_with_it_is_still_found() {
    on_shared(|system| async move {
        let gateway = Gateway::start(system, |config| config.negative_cache_secs = 60).await;
        let conversation = system.conversation("alice", "group", &["bob"]).await;
        let client_id = format!("later-{}", Uuid::new_v4());
        let key = idempotency_key(
            "alice",
            Some(&client_id),
            &conversation.to_string(),
            "hello",
            0,
        );
        let digest = request_digest(&Request {
            content: "hello",
            content_type: "text",
            metadata: &serde_json::Map::new(),
            recipient_ids: None,
            priority: "normal",
        });
        let id = message_id(&key, &digest);
        let http = &client();
        let gateway = &gateway;
        let status = move || async move {
            let response = http
                .get(gateway.url(&format!("/v1/messages/{id}/status")))
                .bearer_auth(system.token("alice"))
                .send()
                .await
                .expect("status answers");
            let code = response.status().as_u16();
            (code, response.json::<Value>().await.unwrap_or(Value::Null))
        };
        let negative_before = metric_sum(
            &system.metrics().await,
            "gateway_message_lookups_total",
            "negative_cache",
        );

        let (code, body) = status().await;
        assert_eq!(code, 404, "{body}");
        assert_eq!(body["error"]["code"], "MESSAGE_NOT_FOUND");

        let mut locker = system.pool.begin().await.expect("begin");
        sqlx::query("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
            .execute(&mut *locker)
            .await
            .expect("lock");
        const REPEATS: usize = 20;
        for _ in 0..REPEATS {
            let (code, body) = status().await;
            assert_eq!(code, 404, "answered without Postgres: {body}");
        }
        locker.rollback().await.expect("unlock");
        let negative_after = metric_sum(
            &system.metrics().await,
            "gateway_message_lookups_total",
            "negative_cache",
        );
        assert!(negative_after - negative_before >= REPEATS as f64);

        let mut body = text(conversation, "hello");
        body["clientMessageId"] = json!(client_id);
        let response = http
            .post(gateway.url("/v1/messages"))
            .bearer_auth(system.token("alice"))
            .json(&body)
            .send()
            .await
            .expect("send answers");
        assert_eq!(response.status(), 202);
        let ack: Value = response.json().await.expect("json");
        assert_eq!(ack["messageId"], id.to_string());

        let (code, body) = status().await;
        assert_eq!(code, 200, "the accepted message is found: {body}");
        assert!(
            body["state"] == "pending" || body["state"] == "sent",
            "{body}"
        );
    });
}

/// Reads stuck behind a lock answer 503 within the statement timeout instead of hanging, and
/// cannot take the connections sends need: a send whose facts are not cached yet still gets
/// 202 while every query connection is stuck.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_reads_answer_503_and_cannot_starve_sends() {
    let system = System::start_with(|config| {
        config.db_query_connections = 2;
        config.db_facts_connections = 2;
        config.db_statement_timeout_ms = 500;
        config.db_acquire_timeout_ms = 1000;
    })
    .await;
    let conversation = system.conversation("alice", "group", &["bob"]).await;
    let http = client();
    let status_of = |id: Uuid| {
        let request = http
            .get(system.url(&format!("/v1/messages/{id}/status")))
            .bearer_auth(system.token("alice"));
        async move {
            let started = Instant::now();
            let response = request.send().await.expect("a stuck read is answered");
            let code = response.status().as_u16();
            let retry_after = response.headers().get("retry-after").cloned();
            let body = response.json::<Value>().await.unwrap_or(Value::Null);
            (code, retry_after, body, started.elapsed())
        }
    };

    let mut locker = system.pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *locker)
        .await
        .expect("lock");

    // One read: Postgres cancels it at the statement timeout.
    let (code, retry_after, body, took) = status_of(Uuid::new_v4()).await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["error"]["code"], "SERVICE_UNAVAILABLE");
    assert!(retry_after.is_some(), "503 carries Retry-After");
    eprintln!("a read stuck behind the lock was answered 503 after {took:?}");

    // Many at once: more than the query pool has connections.
    let flood: Vec<_> = (0..12)
        .map(|_| tokio::spawn(status_of(Uuid::new_v4())))
        .collect();
    let history = tokio::spawn(
        http.get(system.url(&format!("/v1/conversations/{conversation}/messages")))
            .bearer_auth(system.token("alice"))
            .send(),
    );
    // Every query connection is stuck behind the lock...
    let deadline = Instant::now() + PATIENCE;
    while stuck_behind_locks(&system).await < 2 {
        assert!(
            Instant::now() < deadline,
            "the reads never reached Postgres"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...and a send, with its facts loaded from Postgres on the way, goes through.
    let (sent, ack) = system
        .send("alice", text(conversation, "past the jam"))
        .await;
    assert_eq!(sent, 202, "{ack}");

    let history = history
        .await
        .expect("history task")
        .expect("history answers");
    assert_eq!(history.status(), 503);
    let mut slowest = Duration::ZERO;
    for read in flood {
        let (code, retry_after, body, took) = read.await.expect("read task");
        assert_eq!(code, 503, "{body}");
        assert!(retry_after.is_some());
        slowest = slowest.max(took);
    }
    eprintln!("12 concurrent stuck reads: the slowest answered 503 after {slowest:?}");

    locker.rollback().await.expect("unlock");
    let (code, _, body, _) = status_of(message_id_of(&ack)).await;
    assert_eq!(code, 200, "reads work again once the lock is gone: {body}");
}

/// Postgres backends waiting for a lock.
async fn stuck_behind_locks(system: &System) -> i64 {
    let (waiting,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
            .fetch_one(&system.pool)
            .await
            .expect("pg_stat_activity");
    waiting
}
