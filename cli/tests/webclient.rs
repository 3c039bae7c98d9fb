//! The web client and the JavaScript library against `hotpath up`, as their users run them: the
//! gateway serves the app's files at `/` (with their types and caching headers, shadowing no API
//! route), the library's own tests (`node --test clients/js/test/`) pass against the running
//! stack, its types (`hotpath.d.ts`) check against an app's use of it with `tsc --strict`, and
//! the end-to-end test (`tests/e2e/webclient.mjs`: two users in Debian's Chromium,
//! driven by playwright-core) passes, leaving its screenshots in `target/e2e/`.
//!
//! Node, Chromium, playwright-core and typescript are installed by `scripts/setup.sh`
//! (`ensure_browser_tools`, which `scripts/test.sh` runs). One stack serves all three parts, one
//! after the other; every child process has a time limit.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::header::{CACHE_CONTROL, CONTENT_TYPE, ETAG, IF_NONE_MATCH};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_hotpath");
const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// A `hotpath up`, stopped with Ctrl-C when dropped (also when an assertion fails).
struct Up {
    child: Child,
    base: String,
    data_dir: PathBuf,
}

impl Up {
    fn start(data_dir: &Path) -> Up {
        let port = hotpath_localstack::free_port().expect("free port");
        let log = std::fs::File::create(data_dir.with_extension("log")).expect("log file");
        let mut child = Command::new(BIN)
            .args(["up", "--data-dir"])
            .arg(data_dir)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("HOTPATH_POLICY_DIR", format!("{ROOT}/policies/dist"))
            // Low enough that the tests reach the limit with a handful of sends.
            .env("HOTPATH_RATE_PER_USER", "20")
            .env("HOTPATH_RATE_BURST", "10")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("hotpath up starts");
        hotpath_testkit::await_up_banner(&mut child, Duration::from_secs(60));
        Up {
            child,
            base: format!("http://127.0.0.1:{port}"),
            data_dir: data_dir.to_path_buf(),
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(40);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `command` in a process group of its own, killed whole after `limit`; its exit status
/// and everything it printed.
fn run_bounded(mut command: Command, limit: Duration) -> (bool, String) {
    let mut child = command
        .current_dir(ROOT)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("node starts (scripts/setup.sh's ensure_browser_tools installs Node.js)");
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if Instant::now() > deadline {
            // SAFETY: kill(2) on the process group we created for this child.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = format!(
        "{}\n{}",
        stdout.join().unwrap_or_default(),
        stderr.join().unwrap_or_default()
    );
    match status {
        Some(status) => (status.success(), output),
        None => (false, format!("killed after {limit:?}\n{output}")),
    }
}

/// A Node.js command with the stack's whereabouts in its environment.
fn node(up: &Up, args: &[&str]) -> Command {
    let mut command = Command::new("node");
    command
        .args(args)
        .env("HOTPATH_URL", &up.base)
        .env("HOTPATH_BIN", BIN)
        .env("HOTPATH_DATA_DIR", &up.data_dir)
        .env("HOTPATH_E2E_ARTIFACTS", format!("{ROOT}/target/e2e"));
    command
}

/// `tsc --noEmit --strict` over `clients/js/support/usage.ts`, an app's use of the library, so
/// that `hotpath.d.ts` is checked against how it is meant to be used.
fn types_check() -> Command {
    let mut command = Command::new("node");
    command
        .arg(format!(
            "{ROOT}/.tools/node/node_modules/typescript/bin/tsc"
        ))
        .args([
            "--noEmit",
            "--strict",
            "--target",
            "es2022",
            "--module",
            "nodenext",
            "--moduleResolution",
            "nodenext",
            "--lib",
            "es2022,dom",
            "clients/js/support/usage.ts",
        ]);
    command
}

async fn get(http: &reqwest::Client, url: &str) -> reqwest::Response {
    http.get(url).send().await.expect("GET")
}

/// `/` and `/app/*` are the app's files, each with its type and a revalidating cache; the API,
/// health, metrics and the live page are still what they were.
async fn the_app_is_served_beside_the_api(up: &Up) {
    hotpath_core::tls::install_crypto_provider();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let page = get(&http, &format!("{}/", up.base)).await;
    assert_eq!(page.status(), StatusCode::OK);
    assert_eq!(page.headers()[CONTENT_TYPE], "text/html; charset=utf-8");
    assert_eq!(page.headers()[CACHE_CONTROL], "no-cache");
    assert!(page.headers().contains_key("content-security-policy"));
    let etag = page.headers()[ETAG].clone();
    assert!(page.text().await.expect("body").contains("/app/app.js"));

    let again = http
        .get(format!("{}/", up.base))
        .header(IF_NONE_MATCH, etag.clone())
        .send()
        .await
        .expect("revalidate");
    assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(again.headers()[ETAG], etag);
    assert!(again.bytes().await.expect("body").is_empty());

    for (file, content_type) in [
        ("app.js", "text/javascript; charset=utf-8"),
        ("style.css", "text/css; charset=utf-8"),
        ("hotpath.js", "text/javascript; charset=utf-8"),
    ] {
        let asset = get(&http, &format!("{}/app/{file}", up.base)).await;
        assert_eq!(asset.status(), StatusCode::OK, "{file}");
        assert_eq!(asset.headers()[CONTENT_TYPE], content_type, "{file}");
        assert_eq!(asset.headers()["x-content-type-options"], "nosniff");
        assert_ne!(asset.headers()[ETAG], etag, "{file} has its own ETag");
    }
    let library = get(&http, &format!("{}/app/hotpath.js", up.base)).await;
    let on_disk = std::fs::read_to_string(format!("{ROOT}/clients/js/hotpath.js")).expect("read");
    assert_eq!(library.text().await.expect("body"), on_disk);

    let missing = get(&http, &format!("{}/app/secrets.txt", up.base)).await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    let body: Value = missing.json().await.expect("json");
    assert_eq!(body["error"]["code"], "NOT_FOUND");

    let health: Value = get(&http, &format!("{}/healthz", up.base))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(health["status"], "ok");
    let metrics = get(&http, &format!("{}/metrics", up.base)).await;
    assert!(
        metrics.headers()[CONTENT_TYPE]
            .to_str()
            .unwrap_or("")
            .starts_with("text/plain")
    );
    let unknown = get(&http, &format!("{}/v1/nothing-here", up.base)).await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    let live = get(&http, &format!("{}/live", up.base)).await;
    assert!(live.text().await.expect("body").contains("Hotpath live"));
    let anonymous = get(&http, &format!("{}/v1/conversations", up.base)).await;
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_client_and_the_javascript_library_work_against_hotpath_up() {
    let dir = tempfile::Builder::new()
        .prefix("hotpath-webclient-")
        .tempdir()
        .expect("temp dir");
    let up = Up::start(&dir.path().join("data"));

    the_app_is_served_beside_the_api(&up).await;

    let tests = node(
        &up,
        &[
            "--experimental-websocket",
            "--test",
            "--test-reporter=spec",
            "clients/js/test/",
        ],
    );
    let (passed, output) = run_bounded(tests, Duration::from_secs(180));
    assert!(passed, "the library's tests pass:\n{output}");
    println!("{output}");

    let (passed, output) = run_bounded(types_check(), Duration::from_secs(120));
    assert!(
        passed,
        "clients/js/hotpath.d.ts describes the library:\n{output}"
    );

    let e2e = node(&up, &["tests/e2e/webclient.mjs"]);
    let (passed, output) = run_bounded(e2e, Duration::from_secs(180));
    assert!(
        passed,
        "the end-to-end test passes in Chromium (scripts/setup.sh installs what it needs):\n{output}"
    );
    println!("{output}");
}
