//! The dashboard and the alert rules against Prometheus's own tools.
//!
//! * `promtool check rules` and `promtool test rules` on `ops/prometheus/`: the rules are
//!   valid and every alert fires, and stays quiet, where its unit tests say.
//! * A real `prometheus` (Debian's package; `scripts/setup.sh` installs it) scrapes a running
//!   Hotpath, with the rules loaded, after traffic that makes the metrics exist (a refused
//!   send included). Every metric name that a dashboard panel, a dashboard variable or an alert
//!   queries must then be one Prometheus knows (`/api/v1/label/__name__/values`): a renamed
//!   metric, or a query of one nobody exports, fails here. The alert expressions are taken from
//!   Prometheus's own `/api/v1/rules`, as it parsed the file. Only the panels marked as needing
//!   `prometheus-nats-exporter` are exempt, and only for the exporter's names.
//!
//! Metric names are found in PromQL by [`metric_names`], a small lexer (promtool 2.42 has no
//! command that parses an expression): string literals, label matchers `{…}` and ranges `[…]`
//! are skipped, the label lists after `by`, `without`, `on`, `ignoring`, `group_left` and
//! `group_right` too; an identifier followed by `(` is a function or an aggregation, the
//! operators and keywords (`and`, `sum`, `offset`, …) are not names; every other identifier is
//! a metric name.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hotpath_consumers::push::{Platform, Senders};
use hotpath_testkit::push::RecordingSender;
use hotpath_testkit::ws::connect;
use hotpath_testkit::{System, text};
use serde_json::{Value, json};

const PATIENCE: Duration = Duration::from_secs(30);
/// What the dashboard says of the panels that need the NATS exporter (their description).
const EXPORTER_MARK: &str = "Needs prometheus-nats-exporter";
/// The exporter's names (its default namespaces, and the one `-prefix nats` gives).
const EXPORTER_PREFIXES: [&str; 3] = ["gnatsd_", "jetstream_", "nats_"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn promtool(args: &[&str]) {
    let output = Command::new("promtool")
        .args(args)
        .current_dir(repo())
        .output()
        .expect("promtool runs (scripts/setup.sh installs Debian's prometheus package)");
    assert!(
        output.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_alert_rules_are_valid_and_their_unit_tests_pass() {
    promtool(&["check", "rules", "ops/prometheus/alerts.yml"]);
    promtool(&["test", "rules", "ops/prometheus/alerts_test.yml"]);
}

// --- metric names in PromQL --------------------------------------------------------------

/// Words that are PromQL's own, never metric names.
const KEYWORDS: [&str; 25] = [
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
/// Keywords followed by a parenthesised list of label names.
const LABEL_LISTS: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// Every metric name `expr` selects.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(&chars, i);
        } else if c == '{' {
            i = skip_group(&chars, i, '{', '}');
        } else if c == '[' {
            i = skip_group(&chars, i, '[', ']');
        } else if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c.is_ascii_digit() || c == '.' || c == '$' {
            // A number or duration (`0.99`, `5m`, `1e3`), or a dashboard variable.
            i += 1;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_.".contains(chars[i])) {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_:".contains(chars[i])) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let called = chars.get(next) == Some(&'(');
            if LABEL_LISTS.contains(&word.as_str()) && called {
                i = skip_group(&chars, next, '(', ')');
            } else if !called && !KEYWORDS.contains(&word.as_str()) {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// The index after the string literal that starts at `start`.
fn skip_string(chars: &[char], start: usize) -> usize {
    let quote = chars[start];
    let mut i = start + 1;
    while i < chars.len() && chars[i] != quote {
        if chars[i] == '\\' && quote != '`' {
            i += 1;
        }
        i += 1;
    }
    i + 1
}

/// The index after the group that opens at `start`, strings inside it skipped whole.
fn skip_group(chars: &[char], start: usize, open: char, close: char) -> usize {
    let mut depth = 0;
    let mut i = start;
    while i < chars.len() {
        match chars[i] {
            '"' | '\'' | '`' => {
                i = skip_string(chars, i);
                continue;
            }
            c if c == open => depth += 1,
            c if c == close => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    i
}

// --- what the dashboard and the rules query ----------------------------------------------

/// One query of the dashboard or the rules, and where it is.
#[derive(Debug)]
struct Query {
    place: String,
    expr: String,
    /// Marked as needing the NATS exporter.
    needs_exporter: bool,
}

/// The expression Prometheus gets once Grafana has put in its interval variables.
fn as_grafana_sends(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h")
}

/// The selector of a `label_values(selector, label)` variable query (none for
/// `label_values(label)`, which selects no metric).
fn variable_selector(query: &str) -> Option<String> {
    let inner = query
        .trim()
        .strip_prefix("label_values(")?
        .strip_suffix(')')?;
    let comma = inner.rfind(',')?;
    Some(inner[..comma].to_string())
}

fn dashboard_queries(dashboard: &Value) -> Vec<Query> {
    let mut queries = Vec::new();
    let mut panels: Vec<&Value> = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        panels.push(panel);
        if let Some(nested) = panel["panels"].as_array() {
            panels.extend(nested);
        }
    }
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("?");
        let needs_exporter = panel["description"]
            .as_str()
            .is_some_and(|d| d.contains(EXPORTER_MARK));
        for target in panel["targets"].as_array().into_iter().flatten() {
            let Some(expr) = target["expr"].as_str() else {
                continue;
            };
            queries.push(Query {
                place: format!("panel {title:?} {}", target["refId"]),
                expr: as_grafana_sends(expr),
                needs_exporter,
            });
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
    {
        let query = variable["query"]["query"]
            .as_str()
            .or(variable["query"].as_str())
            .unwrap_or("");
        if let Some(selector) = variable_selector(query) {
            queries.push(Query {
                place: format!("variable {}", variable["name"]),
                expr: selector,
                needs_exporter: false,
            });
        }
    }
    queries
}

/// Each query's metric names that `known` lacks, by where they are queried. A panel marked as
/// needing the NATS exporter is exempt for the exporter's names only.
fn unknown_metrics(queries: &[Query], known: &BTreeSet<String>) -> BTreeMap<String, String> {
    let mut unknown = BTreeMap::new();
    for query in queries {
        for name in metric_names(&query.expr) {
            let exporters = EXPORTER_PREFIXES.iter().any(|p| name.starts_with(p));
            if known.contains(&name) || (query.needs_exporter && exporters) {
                continue;
            }
            unknown.entry(name).or_insert_with(|| query.place.clone());
        }
    }
    unknown
}

fn dashboard() -> Value {
    let path = repo().join("ops/grafana/hotpath.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard")).expect("JSON")
}

#[test]
fn the_dashboard_asks_for_its_data_source_and_is_templated_by_instance_and_partition() {
    let dashboard = dashboard();
    assert_eq!(dashboard["__inputs"][0]["name"], "DS_PROMETHEUS");
    assert_eq!(dashboard["__inputs"][0]["pluginId"], "prometheus");
    assert_eq!(
        dashboard["id"],
        Value::Null,
        "no id of one Grafana's database"
    );
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(variables, ["instance", "partition"]);
    for panel in dashboard["panels"].as_array().expect("panels") {
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"], "${DS_PROMETHEUS}",
            "panel {} uses the input",
            panel["title"]
        );
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            let hotpath = metric_names(expr)
                .iter()
                .any(|n| !EXPORTER_PREFIXES.iter().any(|p| n.starts_with(p)));
            assert!(
                !hotpath || expr.contains("$instance"),
                "panel {} selects by instance: {expr}",
                panel["title"]
            );
        }
    }
}

#[test]
fn metric_names_are_the_selected_series_not_functions_labels_or_keywords() {
    let expr = r#"histogram_quantile(0.99, sum by (le, step) (rate(delivery_pipeline_step_duration_ms_bucket{instance=~"$instance", step!="persist"}[5m] offset 1m)))
        / on (instance) group_left (partition) max without (job) (delivery_consumer_pending)
        and ignoring (code) up{job=~"hotpath.*"} > bool 0.5 or vector(1) unless count(topk(3, producer_enqueued_total)) # done"#;
    let names: Vec<String> = metric_names(expr).into_iter().collect();
    assert_eq!(
        names,
        [
            "delivery_consumer_pending",
            "delivery_pipeline_step_duration_ms_bucket",
            "producer_enqueued_total",
            "up"
        ]
    );
    assert_eq!(
        variable_selector(r#"label_values(up{job=~"hotpath.*"}, instance)"#).as_deref(),
        Some(r#"up{job=~"hotpath.*"}"#)
    );
    assert_eq!(variable_selector("label_values(partition)"), None);
}

#[test]
fn a_dashboard_query_of_a_renamed_metric_is_reported() {
    let original = dashboard();
    let queries = dashboard_queries(&original);
    let known: BTreeSet<String> = queries
        .iter()
        .filter(|q| !q.needs_exporter)
        .flat_map(|q| metric_names(&q.expr))
        .collect();
    assert!(
        known.contains("delivery_consumer_pending"),
        "the dashboard queries the lag"
    );
    assert_eq!(unknown_metrics(&queries, &known), BTreeMap::new());

    // The lag renamed in one panel: that panel is named as querying a metric nobody exports.
    let renamed = serde_json::to_string(&original).expect("JSON").replacen(
        "max by (partition) (delivery_consumer_pending{",
        "max by (partition) (delivery_consumer_lag{",
        1,
    );
    let renamed: Value = serde_json::from_str(&renamed).expect("JSON");
    let unknown = unknown_metrics(&dashboard_queries(&renamed), &known);
    assert_eq!(
        unknown.keys().collect::<Vec<_>>(),
        ["delivery_consumer_lag"],
        "{unknown:?}"
    );
    assert!(
        unknown["delivery_consumer_lag"].contains("Consumer lag per partition"),
        "{unknown:?}"
    );

    // The exporter's row is exempt for the exporter's names only: a Hotpath metric there counts.
    let mut smuggled = original.clone();
    let exporter_panel = smuggled["panels"]
        .as_array_mut()
        .expect("panels")
        .iter_mut()
        .find(|p| {
            p["type"] != "row"
                && p["description"]
                    .as_str()
                    .is_some_and(|d| d.contains(EXPORTER_MARK))
        })
        .expect("a panel marked as needing the exporter");
    exporter_panel["targets"][0]["expr"] = json!("rate(delivery_persisted_messages_total[1m])");
    let unknown = unknown_metrics(&dashboard_queries(&smuggled), &known);
    assert_eq!(
        unknown.keys().collect::<Vec<_>>(),
        ["delivery_persisted_messages_total"]
    );
}

// --- a real Prometheus scraping Hotpath --------------------------------------------------

/// A `prometheus` of the test's own, stopped when dropped.
struct Prometheus {
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus on a free loopback port, scraping `targets` (job name → address)
    /// every second, with the alert rules loaded.
    fn start(targets: &[(&str, String)]) -> Prometheus {
        let dir = tempfile::tempdir().expect("temp dir");
        let rules = repo().join("ops/prometheus/alerts.yml");
        let mut config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n",
            rules.display()
        );
        for (job, address) in targets {
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: ['{address}']\n"
            ));
        }
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("config written");
        let port = hotpath_localstack::free_port().expect("free port");
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus runs (scripts/setup.sh installs Debian's prometheus package)");
        Prometheus {
            child,
            base: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        }
    }

    /// `GET` of an API path's `data`, or `None` while Prometheus is not answering yet.
    async fn api(&self, http: &reqwest::Client, path: &str) -> Option<Value> {
        let response = http.get(format!("{}{path}", self.base)).send().await.ok()?;
        let body: Value = response.json().await.ok()?;
        (body["status"] == "success").then(|| body["data"].clone())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Traffic that makes every series the dashboard and the rules query exist: a send to an
/// online member (fanout), to an offline one with a device (a push), and a refused send.
async fn traffic(system: &System, recorder: &RecordingSender) {
    let conversation = system
        .conversation("alice", "group", &["bob", "carol"])
        .await;
    let status = system
        .post(
            "bob",
            "/v1/devices",
            json!({"platform": "apns", "token": "b0".repeat(32), "appId": "com.example.chat", "sandbox": true}),
        )
        .await
        .status();
    assert!(
        status == 201 || status == 200,
        "device registered: {status}"
    );
    let _carol = connect(system, &system.base, "carol").await;
    for n in 0..3 {
        let (status, ack) = system
            .send("alice", text(conversation, &format!("hello {n}")))
            .await;
        assert_eq!(status, 202, "{ack}");
    }
    let (status, refused) = system
        .send("alice", text(uuid::Uuid::new_v4(), "nobody is there"))
        .await;
    assert_eq!(status, 404, "{refused}");
    assert_eq!(system.wait_for_messages(3, PATIENCE).await, 3);
    recorder.wait_for(3, PATIENCE).await;
}

/// Waits until Prometheus has scraped every target successfully and knows every name in
/// `wanted` (or `PATIENCE` passed); returns the names it knows.
async fn scraped(prometheus: &Prometheus, wanted: &BTreeSet<String>) -> BTreeSet<String> {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let targets = prometheus.api(&http, "/api/v1/targets").await;
        let all_up = targets.as_ref().is_some_and(|t| {
            let active = t["activeTargets"].as_array().cloned().unwrap_or_default();
            !active.is_empty() && active.iter().all(|t| t["health"] == "up")
        });
        let names: BTreeSet<String> = prometheus
            .api(&http, "/api/v1/label/__name__/values")
            .await
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default();
        if (all_up && wanted.is_subset(&names)) || Instant::now() > deadline {
            assert!(
                all_up,
                "every target scraped: {targets:?}\n{}",
                prometheus.log()
            );
            return names;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The alerting rules as Prometheus loaded them: (name, query, runbook); `None` while it does
/// not answer yet.
async fn loaded_alerts(
    prometheus: &Prometheus,
    http: &reqwest::Client,
) -> Option<Vec<(String, String, String)>> {
    let rules = prometheus.api(http, "/api/v1/rules?type=alert").await?;
    let field = |v: &Value| v.as_str().unwrap_or("").to_string();
    let alerts = rules["groups"]
        .as_array()?
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .map(|r| {
            (
                field(&r["name"]),
                field(&r["query"]),
                field(&r["annotations"]["runbook"]),
            )
        })
        .collect();
    Some(alerts)
}

/// GitHub's anchor of a Markdown heading: lower case, spaces to `-`, punctuation dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scraping_hotpath_knows_every_metric_the_dashboard_and_the_alerts_query() {
    let recorder = Arc::new(RecordingSender::new());
    let mut system = System::start().await;
    let mut senders: Senders = std::collections::HashMap::new();
    senders.insert(Platform::Apns, recorder.clone());
    system.start_push(Some(senders)).await;
    // Every role of this process serves its metrics from one registry, on the gateway's port.
    let gateway = system.base.trim_start_matches("http://").to_string();
    let prometheus = Prometheus::start(&[("hotpath", gateway)]);
    traffic(&system, &recorder).await;

    let mut queries = dashboard_queries(&dashboard());
    let http = reqwest::Client::new();
    let deadline = Instant::now() + PATIENCE;
    let alerts = loop {
        let alerts = loaded_alerts(&prometheus, &http).await;
        if alerts.is_some() || Instant::now() > deadline {
            break alerts.unwrap_or_else(|| panic!("Prometheus answers\n{}", prometheus.log()));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let rules = std::fs::read_to_string(repo().join("ops/prometheus/alerts.yml")).expect("rules");
    let written = rules
        .lines()
        .filter(|l| l.trim_start().starts_with("- alert:"))
        .count();
    assert_eq!(
        alerts.len(),
        written,
        "every rule of alerts.yml loaded: {alerts:?}"
    );
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README");
    let anchors: BTreeSet<String> = readme
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|l| anchor(l.trim_start_matches('#')))
        .collect();
    for (name, query, runbook) in &alerts {
        let target = runbook.strip_prefix("README.md#").unwrap_or("");
        assert!(
            anchors.contains(target),
            "{name}'s runbook {runbook:?} is a heading in README.md"
        );
        queries.push(Query {
            place: format!("alert {name}"),
            expr: query.clone(),
            needs_exporter: false,
        });
    }

    let wanted: BTreeSet<String> = queries
        .iter()
        .flat_map(|q| metric_names(&q.expr))
        .filter(|n| !EXPORTER_PREFIXES.iter().any(|p| n.starts_with(p)))
        .collect();
    let known = scraped(&prometheus, &wanted).await;
    let unknown = unknown_metrics(&queries, &known);
    assert!(
        unknown.is_empty(),
        "queried, but not exported by Hotpath (metric → where): {unknown:#?}"
    );
    system.stop_push().await;
}
