//! `hotpath up` used the way a newcomer uses it: start, get a token, create a conversation,
//! send, see `sent`; Ctrl-C; start again and find the history; `kill -9`; start again and
//! carry on without manual cleanup.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_hotpath");

struct Up {
    child: Child,
    base: String,
}

impl Up {
    /// Starts `hotpath up` and waits for its welcome banner.
    fn start(data_dir: &Path, port: u16) -> Up {
        let mut child = Command::new(BIN)
            .args(["up", "--data-dir"])
            .arg(data_dir)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env(
                "HOTPATH_POLICY_DIR",
                concat!(env!("CARGO_MANIFEST_DIR"), "/../policies/dist"),
            )
            // The durable setting a careful single-node user picks; checked below.
            .env("HOTPATH_NATS_SYNC", "always")
            .stdout(Stdio::piped())
            // The logs go next to the data, for reading when this test fails.
            .stderr(log_file(data_dir))
            .spawn()
            .expect("hotpath up starts");
        hotpath_testkit::await_up_banner(&mut child, Duration::from_secs(60));
        Up {
            child,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(rc, 0, "signal delivered");
    }

    /// Ctrl-C, then waits for a clean exit.
    fn interrupt(mut self) {
        self.signal(libc::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(
                    status.success(),
                    "hotpath up exits cleanly on Ctrl-C: {status}"
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "hotpath up did not stop within 40 s of Ctrl-C"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kill9(mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }
}

fn log_file(data_dir: &Path) -> std::fs::File {
    let path = data_dir.with_extension("log");
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("log file")
}

fn token(data_dir: &Path, user: &str) -> String {
    hotpath_testkit::hotpath_token(BIN, data_dir, user)
}

fn free_port() -> u16 {
    hotpath_localstack::free_port().expect("free port")
}

async fn history(http: &reqwest::Client, up: &Up, token: &str, conversation: &str) -> Vec<String> {
    let page: Value = http
        .get(format!(
            "{}/v1/conversations/{conversation}/messages",
            up.base
        ))
        .bearer_auth(token)
        .send()
        .await
        .expect("history")
        .json()
        .await
        .expect("json");
    page["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["content"].as_str().unwrap_or("").to_string())
        .collect()
}

async fn send(
    http: &reqwest::Client,
    up: &Up,
    token: &str,
    conversation: &str,
    content: &str,
) -> Value {
    let response = http
        .post(format!("{}/v1/messages", up.base))
        .bearer_auth(token)
        .json(&json!({"conversationId": conversation, "content": content, "contentType": "text", "clientMessageId": content}))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 202);
    response.json().await.expect("json")
}

async fn wait_until_sent(http: &reqwest::Client, up: &Up, token: &str, message_id: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status: Value = http
            .get(format!("{}/v1/messages/{message_id}/status", up.base))
            .bearer_auth(token)
            .send()
            .await
            .expect("status")
            .json()
            .await
            .expect("json");
        if status["state"] == "sent" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "message not sent within 20 s: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hotpath_up_survives_ctrl_c_and_kill_9_with_its_data() {
    let dir = tempfile::Builder::new()
        .prefix("hotpath-up-")
        .tempdir()
        .expect("temp dir");
    let data_dir = dir.path().join("data");
    let port = free_port();
    hotpath_core::tls::install_crypto_provider();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");

    // First start: the newcomer's walkthrough.
    let up = Up::start(&data_dir, port);
    let nats_config =
        std::fs::read_to_string(data_dir.join("nats/nats.conf")).expect("nats-server config");
    assert!(
        nats_config.contains("sync_interval: \"always\""),
        "HOTPATH_NATS_SYNC reaches nats-server: {nats_config}"
    );
    let alice = token(&data_dir, "alice");
    let created: Value = http
        .post(format!("{}/v1/conversations", up.base))
        .bearer_auth(&alice)
        .json(&json!({"type": "group", "members": ["bob"]}))
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("json");
    let conversation = created["conversationId"].as_str().expect("id").to_string();
    let ack = send(&http, &up, &alice, &conversation, "first").await;
    wait_until_sent(&http, &up, &alice, ack["messageId"].as_str().expect("id")).await;
    up.interrupt();

    // Second start after Ctrl-C: same data, same token secret.
    let up = Up::start(&data_dir, port);
    assert_eq!(
        history(&http, &up, &alice, &conversation).await,
        vec!["first"]
    );
    let ack = send(&http, &up, &alice, &conversation, "second").await;
    wait_until_sent(&http, &up, &alice, ack["messageId"].as_str().expect("id")).await;
    up.kill9();

    // Third start after kill -9: it cleans up after itself and everything is still there.
    let up = Up::start(&data_dir, port);
    let ready = http
        .get(format!("{}/readyz", up.base))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200);
    assert_eq!(
        history(&http, &up, &alice, &conversation).await,
        vec!["first", "second"]
    );
    let ack = send(&http, &up, &alice, &conversation, "third").await;
    wait_until_sent(&http, &up, &alice, ack["messageId"].as_str().expect("id")).await;
    assert_eq!(
        history(&http, &up, &alice, &conversation).await,
        vec!["first", "second", "third"]
    );
    up.interrupt();
}
