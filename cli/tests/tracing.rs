//! Tracing across the queue: one message is one trace, from the client's `traceparent` through
//! the gateway's span, the JetStream headers and the consumer's spans to the socket that
//! delivers it, exported over OTLP/HTTP to a receiver of the test's own.
//!
//! The roles run as the built `hotpath gateway` and `hotpath consumers` processes on a real
//! nats-server and Postgres, configured for tracing by the standard variables only
//! (`OTEL_EXPORTER_OTLP_ENDPOINT`, and `OTEL_BSP_SCHEDULE_DELAY` so batches leave quickly).

use hotpath_testkit as support;

use std::fs::File;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use hotpath_core::config::Config;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message as _;
use serde_json::{Value, json};
use support::ws::{self, PATIENCE};
use support::{SECRET, Servers, message_id_of, text};
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_hotpath");

/// A span as the receiver got it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attributes: Vec<(String, String)>,
}

impl Received {
    fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

type Spans = Arc<Mutex<Vec<Received>>>;

/// An OTLP/HTTP receiver on loopback: `POST /v1/traces` with a protobuf
/// `ExportTraceServiceRequest`, as the OpenTelemetry Collector accepts it. Returns its base
/// URL (what `OTEL_EXPORTER_OTLP_ENDPOINT` names) and what it has received.
async fn otlp_receiver() -> (String, Spans) {
    let spans = Spans::default();
    let router = axum::Router::new()
        .route("/v1/traces", post(receive))
        .with_state(spans.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("receiver binds");
    let addr = listener.local_addr().expect("receiver address");
    tokio::spawn(async move { axum::serve(listener, router).await });
    (format!("http://{addr}"), spans)
}

async fn receive(
    State(spans): State<Spans>,
    body: Bytes,
) -> (StatusCode, [(&'static str, &'static str); 1], Vec<u8>) {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return (
            StatusCode::BAD_REQUEST,
            [("content-type", "text/plain")],
            b"not OTLP".to_vec(),
        );
    };
    let mut received = spans.lock().expect("spans");
    for resource_spans in request.resource_spans {
        let resource = resource_spans.resource.unwrap_or_default();
        let service = string_attribute(&resource.attributes, "service.name").unwrap_or_default();
        for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
            received.push(Received {
                service: service.clone(),
                name: span.name,
                trace_id: hex::encode(span.trace_id),
                span_id: hex::encode(span.span_id),
                parent_span_id: hex::encode(span.parent_span_id),
                attributes: span
                    .attributes
                    .iter()
                    .map(|kv| (kv.key.clone(), value_text(kv.value.as_ref())))
                    .collect(),
            });
        }
    }
    // An empty ExportTraceServiceResponse: full success.
    (
        StatusCode::OK,
        [("content-type", "application/x-protobuf")],
        Vec::new(),
    )
}

fn string_attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .map(|kv| value_text(kv.value.as_ref()))
}

fn value_text(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

/// Waits (bounded) until the receiver holds a span that `matches`, and returns it.
async fn wait_for(spans: &Spans, what: &str, matches: impl Fn(&Received) -> bool) -> Received {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let found = spans
            .lock()
            .expect("spans")
            .iter()
            .find(|s| matches(s))
            .cloned();
        if let Some(span) = found {
            return span;
        }
        assert!(
            Instant::now() < deadline,
            "no span {what} within {PATIENCE:?}; received: {:#?}",
            spans.lock().expect("spans")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The span of `service` named `name` in `trace_id`, once it has arrived.
async fn span_of(spans: &Spans, service: &str, name: &str, trace_id: &str) -> Received {
    let what = format!("{name} of {service} in trace {trace_id}");
    wait_for(spans, &what, |s| {
        s.service == service && s.name == name && s.trace_id == trace_id
    })
    .await
}

/// A role process (`hotpath gateway` or `hotpath consumers`) of the built binary on the test's
/// servers, killed when dropped.
struct Role {
    child: Child,
    log: std::path::PathBuf,
}

impl Role {
    /// Starts `hotpath <role>` with `config`'s servers, serving on `listen` (the gateway's API,
    /// the consumers' metrics), with `otlp` as its OTLP endpoint if given, and waits (bounded)
    /// until its `/readyz` answers 200.
    async fn start(
        servers: &Servers,
        config: &Config,
        role: &str,
        listen: &str,
        otlp: Option<&str>,
    ) -> Role {
        let log = servers
            .dir
            .path()
            .join(format!("{role}-{}.log", listen.replace(':', "-")));
        let output = File::create(&log).expect("log file");
        let mut command = Command::new(BIN);
        command
            .arg(role)
            .env("HOTPATH_LISTEN", listen)
            .env("HOTPATH_METRICS_LISTEN", listen)
            .env("HOTPATH_NATS_URL", &config.nats_url)
            .env("HOTPATH_DATABASE_URL", &config.database_url)
            .env("HOTPATH_JWT_SECRET", SECRET)
            .env("HOTPATH_RATE_PER_USER", "0")
            .env("HOTPATH_PARTITIONS", config.partitions.to_string())
            .env("HOTPATH_LEASE_TTL_SECS", config.lease_ttl_secs.to_string())
            .env("HOTPATH_DB_MAX_CONNECTIONS", "5")
            .env("HOTPATH_POLICY_DIR", &config.policy_dir)
            .env("RUST_LOG", "info,sqlx=warn,async_nats=warn")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .env_remove("OTEL_SERVICE_NAME")
            .stdout(output.try_clone().expect("log file"))
            .stderr(output);
        if let Some(endpoint) = otlp {
            command
                .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
                .env("OTEL_BSP_SCHEDULE_DELAY", "100");
        }
        let role = Role {
            child: command.spawn().expect("hotpath starts"),
            log,
        };
        role.wait_until_ready(&format!("http://{listen}/readyz"))
            .await;
        role
    }

    async fn wait_until_ready(&self, url: &str) {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let ready = http.get(url).send().await;
            if ready.is_ok_and(|response| response.status() == 200) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{url} was not ready within 60 s; log:\n{}", self.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The test's servers with the streams, schema and shipped policies in place.
async fn prepared() -> (Servers, Config) {
    hotpath_core::tls::install_crypto_provider();
    hotpath_core::telemetry::init_tracing();
    let servers = Servers::start().await;
    let config = support::test_config(&servers);
    hotpath::roles::prepare(&config)
        .await
        .expect("streams and schema");
    (servers, config)
}

fn loopback() -> String {
    format!(
        "127.0.0.1:{}",
        hotpath_localstack::free_port().expect("free port")
    )
}

/// A client's W3C trace context: (traceparent, trace id, span id).
fn client_trace_context() -> (String, String, String) {
    let trace_id = Uuid::new_v4().simple().to_string();
    let span_id = Uuid::new_v4().simple().to_string()[..16].to_string();
    (format!("00-{trace_id}-{span_id}-01"), trace_id, span_id)
}

/// Creates a group of alice (whose token is `alice`) with bob through the gateway at `base`.
async fn conversation(http: &reqwest::Client, base: &str, alice: &str) -> Uuid {
    let response = http
        .post(format!("{base}/v1/conversations"))
        .bearer_auth(alice)
        .json(&json!({"type": "group", "members": ["bob"]}))
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), 201, "conversation created");
    let body: Value = response.json().await.expect("json");
    body["conversationId"]
        .as_str()
        .and_then(|id| Uuid::parse_str(id).ok())
        .expect("conversation id")
}

/// Sends as alice (`alice`: her token) with the client's `traceparent`; returns the 202's
/// message id.
async fn send_traced(
    http: &reqwest::Client,
    (base, alice): (&str, &str),
    conversation: Uuid,
    traceparent: &str,
) -> Uuid {
    let response = http
        .post(format!("{base}/v1/messages"))
        .bearer_auth(alice)
        .header("traceparent", traceparent)
        .header("tracestate", "client=test")
        .json(&text(conversation, "traced"))
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), 202, "accepted");
    message_id_of(&response.json().await.expect("json"))
}

fn token(user: &str) -> String {
    hotpath_core::auth::mint_hs256_token(SECRET.as_bytes(), user, 3600).expect("token")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_send_is_one_trace_from_the_clients_traceparent_to_the_socket() {
    let (servers, config) = prepared().await;
    let (otlp, spans) = otlp_receiver().await;
    let api = loopback();
    let _consumers = Role::start(&servers, &config, "consumers", &loopback(), Some(&otlp)).await;
    let _gateway = Role::start(&servers, &config, "gateway", &api, Some(&otlp)).await;
    let base = format!("http://{api}");
    let http = reqwest::Client::new();
    let conversation = conversation(&http, &base, &token("alice")).await;
    let mut bob = ws::open(&base, &token("bob")).await;
    ws::ping(&mut bob).await;

    let (traceparent, trace_id, client_span) = client_trace_context();
    let message_id = send_traced(&http, (&base, &token("alice")), conversation, &traceparent).await;
    let delivered = ws::next_of(&mut bob, "message.new").await;
    assert_eq!(message_id_of(&delivered["message"]), message_id);

    // The gateway: the send continues the client's span, the publish is its child.
    let send = span_of(&spans, "hotpath-gateway", "send", &trace_id).await;
    assert_eq!(
        send.parent_span_id, client_span,
        "send is the client's child"
    );
    assert_eq!(send.attribute("http.response.status_code"), Some("202"));
    let publish = span_of(&spans, "hotpath-gateway", "publish", &trace_id).await;
    assert_eq!(publish.parent_span_id, send.span_id);
    assert_eq!(
        publish.attribute("message_id"),
        Some(&*message_id.to_string())
    );

    // The consumer, in another process: persist continues the context the publish put in the
    // message's headers; fanout follows; the socket node's delivery continues the fanout's.
    let persist = span_of(&spans, "hotpath-consumers", "persist", &trace_id).await;
    assert_eq!(
        persist.parent_span_id, publish.span_id,
        "persist is the publish's child"
    );
    assert_eq!(persist.attribute("outcome"), Some("stored"));
    assert_eq!(
        persist.attribute("message_id"),
        Some(&*message_id.to_string())
    );
    let fanout = span_of(&spans, "hotpath-consumers", "fanout", &trace_id).await;
    assert_eq!(fanout.parent_span_id, persist.span_id);
    let deliver = span_of(&spans, "hotpath-gateway", "deliver", &trace_id).await;
    assert_eq!(deliver.parent_span_id, fanout.span_id);

    // Bob's read receipt is a trace of its own, from the gateway to the receipts consumer.
    ws::acknowledge(&mut bob, message_id, "read").await;
    let id = message_id.to_string();
    let recorded = wait_for(&spans, "receipt of the consumers", |s| {
        s.service == "hotpath-consumers"
            && s.name == "receipt"
            && s.attribute("message_id") == Some(&id)
    })
    .await;
    assert_eq!(recorded.attribute("state"), Some("read"));
    let taken = wait_for(&spans, "receipt of the gateway", |s| {
        s.service == "hotpath-gateway"
            && s.name == "receipt"
            && s.span_id == recorded.parent_span_id
    })
    .await;
    assert_eq!(taken.trace_id, recorded.trace_id);
    assert_ne!(taken.trace_id, trace_id, "a receipt is a trace of its own");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_without_tracing_passes_the_clients_context_on_to_the_consumers() {
    let (servers, config) = prepared().await;
    let (otlp, spans) = otlp_receiver().await;
    let api = loopback();
    let _consumers = Role::start(&servers, &config, "consumers", &loopback(), Some(&otlp)).await;
    let _gateway = Role::start(&servers, &config, "gateway", &api, None).await;
    let base = format!("http://{api}");
    let http = reqwest::Client::new();
    let conversation = conversation(&http, &base, &token("alice")).await;

    let (traceparent, trace_id, client_span) = client_trace_context();
    send_traced(&http, (&base, &token("alice")), conversation, &traceparent).await;

    let persist = span_of(&spans, "hotpath-consumers", "persist", &trace_id).await;
    assert_eq!(
        persist.parent_span_id, client_span,
        "persist is the client's child"
    );
    let from_gateway = spans
        .lock()
        .expect("spans")
        .iter()
        .any(|s| s.service == "hotpath-gateway");
    assert!(
        !from_gateway,
        "a gateway without an endpoint exports nothing"
    );
}

/// `hotpath up`, everything in one process, killed when dropped (its servers go with it).
struct Up {
    child: Child,
    log: std::path::PathBuf,
}

impl Up {
    /// Starts `hotpath up` in `dir` on `port`, exporting to `otlp`, with fanout's debug lines
    /// in its log, and waits (bounded) for its banner.
    fn start(dir: &std::path::Path, port: u16, otlp: &str) -> Up {
        let log = dir.join("up.log");
        let mut child = Command::new(BIN)
            .args(["up", "--data-dir"])
            .arg(dir.join("data"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env(
                "HOTPATH_POLICY_DIR",
                concat!(env!("CARGO_MANIFEST_DIR"), "/../policies/dist"),
            )
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", otlp)
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .env_remove("OTEL_SERVICE_NAME")
            .env(
                "RUST_LOG",
                "info,sqlx=warn,async_nats=warn,hotpath_consumers::fanout=debug",
            )
            .stdout(std::process::Stdio::piped())
            .stderr(File::create(&log).expect("log file"))
            .spawn()
            .expect("hotpath up starts");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("Hotpath is up") {
                    let _ = tx.send(());
                }
            }
        });
        let up = Up { child, log };
        if rx.recv_timeout(Duration::from_secs(60)).is_err() {
            panic!(
                "hotpath up printed no banner within 60 s; log:\n{}",
                up.log()
            );
        }
        up
    }

    /// The log, without the terminal's colours.
    fn log(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut plain = String::with_capacity(log.len());
        let mut chars = log.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                // An SGR sequence: ESC [ … m.
                chars.by_ref().find(|&c| c == 'm');
            } else {
                plain.push(c);
            }
        }
        plain
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_one_hotpath_up_process_the_consumers_continue_the_gateways_trace_and_logs_name_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (otlp, spans) = otlp_receiver().await;
    let port = hotpath_localstack::free_port().expect("free port");
    let up = Up::start(dir.path(), port, &otlp);
    let secret = hotpath_core::auth::read_secret_file(&dir.path().join("data/jwt-secret"))
        .expect("the secret hotpath up generated");
    let alice = hotpath_core::auth::mint_hs256_token(&secret, "alice", 3600).expect("token");
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let conversation = conversation(&http, &base, &alice).await;

    let (traceparent, trace_id, client_span) = client_trace_context();
    let message_id = send_traced(&http, (&base, &alice), conversation, &traceparent).await;

    let send = span_of(&spans, "hotpath", "send", &trace_id).await;
    assert_eq!(send.parent_span_id, client_span);
    let publish = span_of(&spans, "hotpath", "publish", &trace_id).await;
    assert_eq!(publish.parent_span_id, send.span_id);
    let persist = span_of(&spans, "hotpath", "persist", &trace_id).await;
    assert_eq!(
        persist.parent_span_id, publish.span_id,
        "persist is the publish's child"
    );
    span_of(&spans, "hotpath", "fanout", &trace_id).await;

    // Bob is offline: fanout's line about it is written in the message's span, and names its
    // trace.
    let deadline = Instant::now() + PATIENCE;
    let line = loop {
        let log = up.log();
        let found = log
            .lines()
            .find(|line| {
                line.contains("recipient offline") && line.contains(&*message_id.to_string())
            })
            .map(str::to_owned);
        if let Some(line) = found {
            break line;
        }
        assert!(
            Instant::now() < deadline,
            "no fanout line within {PATIENCE:?}:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        line.contains(&format!("trace_id={trace_id}")),
        "the log line names the trace: {line}"
    );
}
