//! The OpenAPI document checked by an independent fuzzer: schemathesis (PyPI, installed into
//! `.tools/venv` by `scripts/setup.sh`) reads `/v1/openapi.json` from a running `hotpath up`,
//! generates requests for every operation from the document (valid ones and, for each
//! parameter and body field, invalid ones), sends them with a bearer token, and checks every
//! answer: no 5xx, the status is one the operation documents, the content type and the body
//! match its schema, invalid data is refused and valid data is not, a missing or wrong token
//! is refused, an undocumented method gets 405.
//!
//! The run is bounded: at most [`MAX_EXAMPLES`] generated cases per operation with a fixed seed
//! (the same cases every run), and the whole run within [`RUN_LIMIT`].
//!
//! What the fuzzer is told besides the document, and why, is in
//! `cli/tests/fixtures/schemathesis.toml`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_hotpath");

/// Generated cases per operation and phase.
const MAX_EXAMPLES: &str = "100";

/// The seed of the generated cases: a failure seen once is seen again.
const SEED: &str = "20261202";

/// The longest the fuzzer may take before the test fails.
const RUN_LIMIT: Duration = Duration::from_secs(300);

/// `hotpath up` on a free port in a temporary directory, stopped when dropped.
struct Up {
    child: Child,
    base: String,
}

impl Up {
    fn start(data_dir: &Path) -> Up {
        let port = hotpath_localstack::free_port().expect("free port");
        let mut child = Command::new(BIN)
            .args(["up", "--data-dir"])
            .arg(data_dir)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env(
                "HOTPATH_POLICY_DIR",
                concat!(env!("CARGO_MANIFEST_DIR"), "/../policies/dist"),
            )
            // The fuzzer sends hundreds of requests as one user in a few seconds. Past the
            // per-user rates every answer would be a (documented) 429 and the handlers behind
            // them would go unchecked; the limits themselves are tested in api.rs.
            .env("HOTPATH_RATE_PER_USER", "100000")
            .env("HOTPATH_RATE_BURST", "100000")
            .env("HOTPATH_MEMBERSHIP_RATE_PER_MIN", "100000")
            .stdout(Stdio::piped())
            .stderr(log_file(data_dir))
            .spawn()
            .expect("hotpath up starts");
        hotpath_testkit::await_up_banner(&mut child, Duration::from_secs(60));
        Up {
            child,
            base: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
    }
}

/// The server's log, next to its data, for reading when this test fails.
fn log_file(data_dir: &Path) -> std::fs::File {
    std::fs::File::create(data_dir.with_extension("log")).expect("log file")
}

fn token(data_dir: &Path, user: &str) -> String {
    hotpath_testkit::hotpath_token(BIN, data_dir, user)
}

/// The schemathesis that `scripts/setup.sh` installs, or else one on PATH.
fn schemathesis() -> PathBuf {
    let installed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/venv/bin/schemathesis");
    if installed.exists() {
        return installed;
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join("schemathesis"))
        .find(|candidate| candidate.exists());
    on_path.unwrap_or_else(|| {
        panic!("schemathesis is not installed: run `. scripts/setup.sh` (it installs it into .tools/venv)")
    })
}

/// Runs the fuzzer to its end or the run limit, answering its exit status and its output.
fn fuzz(base: &str, token: &str, report_dir: &Path) -> (Option<i32>, String) {
    let output_path = report_dir.join("schemathesis.out");
    let output = std::fs::File::create(&output_path).expect("output file");
    let mut child = Command::new(schemathesis())
        .arg("--config-file")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/schemathesis.toml"
        ))
        .arg("run")
        .arg(format!("{base}/v1/openapi.json"))
        .args(["--header", &format!("Authorization: Bearer {token}")])
        .args(["--checks", "all"])
        .args(["--max-examples", MAX_EXAMPLES, "--seed", SEED])
        // One worker: on Python 3.11 (Debian's) two can trip a thread-safety bug of its `ast`
        // module, which schemathesis reports as a runtime error of its own.
        .args(["--workers", "1", "--request-timeout", "10"])
        .args(["--generation-database", "none", "--no-color"])
        .arg("--report-junit-path")
        .arg(report_dir.join("junit.xml"))
        // Its cache (`.schemathesis/`) goes to the temporary directory, not the work tree.
        .current_dir(report_dir)
        .stdin(Stdio::null())
        .stdout(output.try_clone().expect("output file"))
        .stderr(output)
        .spawn()
        .expect("schemathesis starts");
    let deadline = Instant::now() + RUN_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for schemathesis") {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let text = std::fs::read_to_string(&output_path).unwrap_or_default();
    (status, text)
}

#[test]
fn schemathesis_finds_every_answer_of_every_operation_as_the_openapi_document_says() {
    let dir = tempfile::Builder::new()
        .prefix("hotpath-schemathesis-")
        .tempdir()
        .expect("temp dir");
    let data_dir = dir.path().join("data");
    let report_dir = dir.path().join("report");
    std::fs::create_dir_all(&report_dir).expect("report dir");
    let up = Up::start(&data_dir);
    let token = token(&data_dir, "fuzzer");

    let (status, output) = fuzz(&up.base, &token, &report_dir);

    assert_eq!(
        status,
        Some(0),
        "schemathesis found faults (or ran past {RUN_LIMIT:?}):\n{output}"
    );
    // A run that tested nothing also exits 0: the junit report names every operation tested.
    let junit = std::fs::read_to_string(report_dir.join("junit.xml")).expect("junit report");
    for operation in documented_operations() {
        assert!(
            junit.contains(&operation),
            "{operation} was not tested:\n{output}"
        );
    }
}

/// Every operation of the document, as schemathesis names them, but the document's own route
/// (schemathesis does not test the schema it reads).
fn documented_operations() -> Vec<String> {
    let document: serde_json::Value =
        serde_json::from_str(include_str!("../../gateway/openapi.json")).expect("openapi.json");
    let mut operations = Vec::new();
    for (path, item) in document["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            if method != "parameters" && path != "/v1/openapi.json" {
                operations.push(format!("{} {path}", method.to_uppercase()));
            }
        }
    }
    operations
}
