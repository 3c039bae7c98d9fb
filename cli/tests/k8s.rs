//! The Kubernetes manifests of `k8s/`, checked without a cluster.
//!
//! 1. Every overlay renders (`kubectl kustomize`, the official kubectl with kustomize built
//!    in) and validates against the Kubernetes API's own schemas with
//!    `kubernetes-validate --strict` (a misspelled or unknown field is an error). The tool has
//!    no schemas for custom resources: it warns and skips them. Only the two operators'
//!    kinds (`Cluster` of CloudNativePG, `PodMonitor` of the Prometheus operator) may be
//!    skipped so; any other skipped kind (a built-in kind at a wrong `apiVersion`, say) fails.
//! 2. The manifests agree with the binary: every subcommand, flag and `HOTPATH_*` variable a
//!    container of the `hotpath` image is given exists in that subcommand's definition, as
//!    `hotpath <subcommand> --help` (clap, from the definition itself) prints it, and each
//!    role is given the NATS credentials of its own user, which `k8s/nats/values.yaml` hands
//!    to the servers as the public key `nats/cluster/accounts.conf` gives that role's
//!    permissions. A renamed setting fails here, not in production.
//! 3. What the deployment promises: every pod under the "restricted" Pod Security Standard
//!    with a read-only root and an emptyDir on /tmp, requests and limits, a monitor for every
//!    role, the consumer replica count equal to `HOTPATH_CONSUMER_REPLICAS`.
//!
//! The tools come from `scripts/setup.sh` (`ensure_k8s_tools`, into `.tools/venv`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock, PoisonError};

use serde_json::Value;

const OVERLAYS: [&str; 2] = ["dev", "production"];

/// The custom resources the validator has no schema for, as `kind apiVersion`.
const OPERATOR_KINDS: [&str; 2] = [
    "Cluster postgresql.cnpg.io/v1",
    "PodMonitor monitoring.coreos.com/v1",
];

/// The NATS user (`nats/cluster/accounts.conf`) each subcommand run in the manifests connects
/// as: the roles as themselves, set-up as the operator (docs/adr/0009-nats-accounts.md).
const NATS_USER_OF: [(&str, &str); 4] = [
    ("gateway", "gateway"),
    ("consumers", "consumers"),
    ("push", "push"),
    ("migrate", "operator"),
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A tool `scripts/setup.sh` installs: from `.tools/venv/bin`, else from `PATH`.
fn tool(name: &str) -> PathBuf {
    let installed = repo().join(".tools/venv/bin").join(name);
    if installed.is_file() {
        return installed;
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
        .unwrap_or_else(|| panic!("{name} is not installed: run `. scripts/setup.sh`"))
}

/// `kubectl kustomize k8s/overlays/<overlay>`, once per test run.
fn render(overlay: &str) -> String {
    static RENDERED: OnceLock<Mutex<BTreeMap<String, String>>> = OnceLock::new();
    let rendered = RENDERED.get_or_init(Mutex::default);
    let mut rendered = rendered.lock().unwrap_or_else(PoisonError::into_inner);
    rendered
        .entry(overlay.to_string())
        .or_insert_with(|| kustomize(overlay))
        .clone()
}

fn kustomize(overlay: &str) -> String {
    let output = Command::new(tool("kubectl"))
        .arg("kustomize")
        .arg(repo().join("k8s/overlays").join(overlay))
        .output()
        .expect("running kubectl");
    assert!(
        output.status.success(),
        "kubectl kustomize k8s/overlays/{overlay} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("kubectl prints UTF-8")
}

/// The documents of a rendered manifest (kubectl separates them with `---` lines).
fn documents(rendered: &str) -> Vec<Value> {
    rendered
        .split("\n---\n")
        .filter(|doc| !doc.trim().is_empty())
        .map(|doc| serde_yaml_ng::from_str(doc).expect("kubectl renders YAML"))
        .collect()
}

/// `kubernetes-validate --strict` on a rendered manifest: its errors, and every kind it
/// skipped for want of a schema that is not one of [`OPERATOR_KINDS`].
fn validate(rendered: &str) -> Vec<String> {
    let mut child = Command::new(tool("kubernetes-validate"))
        .args(["--strict", "--quiet", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running kubernetes-validate");
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin
        .write_all(rendered.as_bytes())
        .expect("writing the manifest");
    drop(stdin);
    let output = child.wait_with_output().expect("kubernetes-validate ends");
    let printed = String::from_utf8_lossy(&output.stdout);
    let mut findings: Vec<String> = printed
        .lines()
        .filter(|line| !line.starts_with("WARN") || !skipped_operator_kind(line))
        .map(str::to_string)
        .collect();
    if !output.status.success() && findings.is_empty() {
        findings.push(format!(
            "kubernetes-validate failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    findings
}

/// Whether a warning is "Couldn't find schema for kind K with api version V" for one of
/// [`OPERATOR_KINDS`].
fn skipped_operator_kind(warning: &str) -> bool {
    let Some((_, rest)) = warning.split_once("Couldn't find schema for kind ") else {
        return false;
    };
    let Some((kind, rest)) = rest.split_once(" with api version ") else {
        return false;
    };
    let api_version = rest.split(' ').next().unwrap_or_default();
    OPERATOR_KINDS.contains(&format!("{kind} {api_version}").as_str())
}

#[test]
fn every_overlay_renders_and_validates_strictly_against_the_kubernetes_schemas() {
    for overlay in OVERLAYS {
        let findings = validate(&render(overlay));
        assert!(findings.is_empty(), "k8s/overlays/{overlay}: {findings:#?}");
    }
}

#[test]
fn the_validation_refuses_an_unknown_field_and_a_kind_it_cannot_check() {
    let rendered = render("dev");
    let misspelled = rendered.replacen("readinessProbe:", "readinesProbe:", 1);
    let findings = validate(&misspelled);
    assert!(
        findings
            .iter()
            .any(|f| f.starts_with("ERROR") && f.contains("readinesProbe")),
        "{findings:#?}"
    );
    let wrong_api = rendered.replacen("apiVersion: policy/v1", "apiVersion: policy/v2", 1);
    let findings = validate(&wrong_api);
    assert!(
        findings
            .iter()
            .any(|f| f.contains("PodDisruptionBudget with api version policy/v2")),
        "{findings:#?}"
    );
}

// ---------------------------------------------------------------------------------------------
// The manifests against the binary.

/// What `hotpath <subcommand> --help` says the subcommand takes.
#[derive(Debug, Default)]
struct Subcommand {
    flags: BTreeSet<String>,
    env: BTreeSet<String>,
}

/// The subcommand's flags and variables from its help, or `None` if the binary has no such
/// subcommand. The environment is emptied so that clap prints no values.
fn subcommand(name: &str) -> Option<Subcommand> {
    let output = Command::new(env!("CARGO_BIN_EXE_hotpath"))
        .args([name, "--help"])
        .env_clear()
        .output()
        .expect("running hotpath --help");
    if !output.status.success() {
        return None;
    }
    let help = String::from_utf8(output.stdout).expect("clap prints UTF-8");
    let mut found = Subcommand::default();
    for line in help.lines() {
        let line = line.trim_start();
        if line.starts_with('-') {
            let flags = line.split([',', ' ']).filter(|t| t.starts_with("--"));
            found.flags.extend(flags.map(str::to_string));
        }
        for (_, rest) in line
            .match_indices("[env: ")
            .map(|(i, _)| line.split_at(i + 6))
        {
            let name: String = rest
                .chars()
                .take_while(|c| *c != '=' && *c != ']')
                .collect();
            found.env.insert(name);
        }
    }
    Some(found)
}

/// A container of the `hotpath` image, with the pod it runs in.
struct Role<'a> {
    /// `Kind/name` of the workload.
    workload: String,
    pod: &'a Value,
    container: &'a Value,
}

impl Role<'_> {
    fn args(&self) -> Vec<&str> {
        let args = self.container["args"].as_array().into_iter().flatten();
        args.filter_map(Value::as_str).collect()
    }

    fn env_value(&self, name: &str) -> Option<&Value> {
        let env = self.container["env"].as_array().into_iter().flatten();
        env.into_iter().find(|e| e["name"] == name)
    }

    /// Every variable the container gets: `env`, and the keys of the ConfigMaps of `envFrom`.
    fn env_names(&self, manifests: &[Value]) -> Vec<String> {
        let env = self.container["env"].as_array().into_iter().flatten();
        let mut names: Vec<String> = env
            .filter_map(|e| e["name"].as_str())
            .map(str::to_string)
            .collect();
        let from = self.container["envFrom"].as_array().into_iter().flatten();
        for config_map in from.filter_map(|f| f["configMapRef"]["name"].as_str()) {
            let data = find(manifests, "ConfigMap", config_map).map(|c| &c["data"]);
            let keys = data.and_then(Value::as_object).into_iter().flatten();
            names.extend(keys.map(|(key, _)| key.clone()));
        }
        names
    }
}

fn find<'a>(manifests: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    manifests
        .iter()
        .find(|m| m["kind"] == kind && m["metadata"]["name"] == name)
}

fn is_hotpath_image(image: &str) -> bool {
    let name = image.split([':', '@']).next().unwrap_or_default();
    name == "hotpath" || name.ends_with("/hotpath")
}

/// Every container of the `hotpath` image in the workloads of `manifests`.
fn roles(manifests: &[Value]) -> Vec<Role<'_>> {
    let workloads = manifests.iter().filter(|m| {
        let kind = m["kind"].as_str().unwrap_or_default();
        ["Deployment", "StatefulSet", "Job", "CronJob", "DaemonSet"].contains(&kind)
    });
    let mut roles = Vec::new();
    for workload in workloads {
        let pod = match workload["kind"].as_str() {
            Some("CronJob") => &workload["spec"]["jobTemplate"]["spec"]["template"]["spec"],
            _ => &workload["spec"]["template"]["spec"],
        };
        let containers = ["initContainers", "containers"]
            .iter()
            .flat_map(|list| pod[*list].as_array().into_iter().flatten());
        for container in containers {
            if container["image"].as_str().is_some_and(is_hotpath_image) {
                let workload = format!("{}/{}", workload["kind"], workload["metadata"]["name"]);
                roles.push(Role {
                    workload: workload.replace('"', ""),
                    pod,
                    container,
                });
            }
        }
    }
    roles
}

/// What in `manifests` the binary does not know: subcommands, flags, `HOTPATH_*` variables.
fn unknown_to_the_binary(manifests: &[Value]) -> Vec<String> {
    let mut findings = Vec::new();
    let mut definitions: BTreeMap<String, Option<Subcommand>> = BTreeMap::new();
    for role in roles(manifests) {
        let args = role.args();
        let Some(name) = args.first() else {
            findings.push(format!("{}: no subcommand in args", role.workload));
            continue;
        };
        let definition = definitions
            .entry(name.to_string())
            .or_insert_with(|| subcommand(name));
        let Some(definition) = definition else {
            findings.push(format!(
                "{}: `hotpath {name}` is no subcommand",
                role.workload
            ));
            continue;
        };
        for flag in args.iter().filter(|a| a.starts_with("--")) {
            let flag = flag.split('=').next().unwrap_or_default();
            if !definition.flags.contains(flag) {
                findings.push(format!(
                    "{}: `hotpath {name}` has no flag {flag}",
                    role.workload
                ));
            }
        }
        for var in role.env_names(manifests) {
            if var.starts_with("HOTPATH_") && !definition.env.contains(&var) {
                findings.push(format!(
                    "{}: `hotpath {name}` reads no {var}",
                    role.workload
                ));
            }
        }
    }
    findings
}

#[test]
fn every_subcommand_flag_and_setting_in_the_manifests_exists_in_the_binary() {
    for overlay in OVERLAYS {
        let manifests = documents(&render(overlay));
        assert!(
            roles(&manifests).len() >= 4,
            "k8s/overlays/{overlay}: no roles found"
        );
        let findings = unknown_to_the_binary(&manifests);
        assert!(findings.is_empty(), "k8s/overlays/{overlay}: {findings:#?}");
    }
}

#[test]
fn a_renamed_setting_subcommand_or_flag_is_found() {
    let rendered = render("dev");
    let renamed = rendered.replace("HOTPATH_PARTITIONS", "HOTPATH_PARTITION_COUNT");
    let findings = unknown_to_the_binary(&documents(&renamed));
    for workload in ["Deployment/gateway", "StatefulSet/consumers", "Job/migrate"] {
        let expected = format!("{workload}: `hotpath ");
        assert!(
            findings.iter().any(
                |f| f.starts_with(&expected) && f.ends_with("reads no HOTPATH_PARTITION_COUNT")
            ),
            "{workload}: {findings:#?}"
        );
    }

    let mut manifests = documents(&rendered);
    let consumers = manifests
        .iter_mut()
        .find(|m| m["kind"] == "StatefulSet" && m["metadata"]["name"] == "consumers")
        .expect("the consumers StatefulSet");
    consumers["spec"]["template"]["spec"]["containers"][0]["args"] =
        serde_json::json!(["consumers", "--metrics-address", "0.0.0.0:9091"]);
    let gateway = manifests
        .iter_mut()
        .find(|m| m["kind"] == "Deployment" && m["metadata"]["name"] == "gateway")
        .expect("the gateway Deployment");
    gateway["spec"]["template"]["spec"]["containers"][0]["args"] = serde_json::json!(["gateways"]);
    let findings = unknown_to_the_binary(&manifests);
    assert!(
        findings.contains(
            &"StatefulSet/consumers: `hotpath consumers` has no flag --metrics-address".into()
        ),
        "{findings:#?}"
    );
    assert!(
        findings.contains(&"Deployment/gateway: `hotpath gateways` is no subcommand".into()),
        "{findings:#?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Each role is its own NATS user.

/// The Secret a role's seed comes from: `hotpath-nats-<user>`.
fn seed_secret(user: &str) -> String {
    format!("hotpath-nats-{user}")
}

/// The Secret volume mounted where `HOTPATH_NATS_CREDS` points, as its Secret's name.
fn credentials_secret(role: &Role<'_>) -> Option<String> {
    let path = role.env_value("HOTPATH_NATS_CREDS")?["value"].as_str()?;
    let mounts = role.container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten();
    let mount = mounts.into_iter().find(|m| {
        let dir = m["mountPath"]
            .as_str()
            .unwrap_or_default()
            .trim_end_matches('/');
        Path::new(path).parent() == Some(Path::new(dir))
    })?;
    let volumes = role.pod["volumes"].as_array().into_iter().flatten();
    let volume = volumes.into_iter().find(|v| v["name"] == mount["name"])?;
    Some(volume["secret"]["secretName"].as_str()?.to_string())
}

/// Roles given no credentials, or another user's.
fn wrong_nats_users(manifests: &[Value]) -> Vec<String> {
    let mut findings = Vec::new();
    for role in roles(manifests) {
        let subcommand = role.args().first().copied().unwrap_or_default().to_string();
        let Some((_, user)) = NATS_USER_OF.iter().find(|(s, _)| *s == subcommand) else {
            findings.push(format!(
                "{}: no NATS user for `hotpath {subcommand}`",
                role.workload
            ));
            continue;
        };
        let expected = seed_secret(user);
        match credentials_secret(&role) {
            Some(secret) if secret == expected => {}
            Some(secret) => findings.push(format!(
                "{}: `hotpath {subcommand}` is given {secret}, not {expected}",
                role.workload
            )),
            None => findings.push(format!(
                "{}: HOTPATH_NATS_CREDS names no file of a Secret volume",
                role.workload
            )),
        }
    }
    findings
}

/// What `nats/cluster/accounts.conf` lets each public-key variable do: `NATS_GATEWAY_NKEY` →
/// `Some("GATEWAY_PERMISSIONS")`, the operator's → `None` (everything in the account).
fn account_users() -> BTreeMap<String, Option<String>> {
    let accounts = std::fs::read_to_string(repo().join("nats/cluster/accounts.conf"))
        .expect("reading accounts.conf");
    let mut users = BTreeMap::new();
    for line in accounts
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("{nkey: $"))
    {
        let fields = line.trim_matches(['{', '}']).split(',').map(str::trim);
        let mut nkey = None;
        let mut permissions = None;
        for field in fields {
            match field.split_once(": $") {
                Some(("nkey", name)) => nkey = Some(name.to_string()),
                Some(("permissions", name)) => permissions = Some(name.to_string()),
                _ => {}
            }
        }
        users.insert(nkey.expect("a user line names its nkey"), permissions);
    }
    users
}

/// The NATS chart's values: which Secret key each public-key variable of the servers is.
fn nats_server_keys() -> BTreeMap<String, (String, String)> {
    let values = std::fs::read_to_string(repo().join("k8s/nats/values.yaml"))
        .expect("reading k8s/nats/values.yaml");
    let values: Value = serde_yaml_ng::from_str(&values).expect("values.yaml is YAML");
    let env = values["container"]["env"]
        .as_object()
        .expect("container.env");
    env.iter()
        .filter_map(|(name, value)| {
            let key = &value["valueFrom"]["secretKeyRef"];
            let (secret, key) = (key["name"].as_str()?, key["key"].as_str()?);
            Some((name.clone(), (secret.to_string(), key.to_string())))
        })
        .collect()
}

#[test]
fn each_role_connects_as_its_own_nats_user_with_that_users_permissions() {
    for overlay in OVERLAYS {
        let findings = wrong_nats_users(&documents(&render(overlay)));
        assert!(findings.is_empty(), "k8s/overlays/{overlay}: {findings:#?}");
    }
    // The other half of each user: the servers get its public key from the Secret
    // hotpath-nats-nkeys under the user's name, as the variable accounts.conf gives the
    // user's permissions to.
    let accounts = account_users();
    let server_keys = nats_server_keys();
    for (_, user) in NATS_USER_OF {
        let variable = format!("NATS_{}_NKEY", user.to_uppercase());
        let permissions = accounts
            .get(&variable)
            .unwrap_or_else(|| panic!("accounts.conf has no user {variable}: {accounts:?}"));
        let expected = (user != "operator").then(|| format!("{}_PERMISSIONS", user.to_uppercase()));
        assert_eq!(permissions, &expected, "{variable} in accounts.conf");
        assert_eq!(
            server_keys.get(&variable),
            Some(&("hotpath-nats-nkeys".to_string(), user.to_string())),
            "{variable} in k8s/nats/values.yaml"
        );
    }
    // accounts.conf reaches the servers unchanged: included from the ConfigMap nats-accounts,
    // mounted where the include points (relative to the chart's /etc/nats-config/nats.conf).
    let values: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(repo().join("k8s/nats/values.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        values["config"]["merge"]["$include"],
        "../nats-accounts/accounts.conf"
    );
    let mount = &values["container"]["patch"][0]["value"];
    let volume = &values["podTemplate"]["patch"][0]["value"];
    assert_eq!(
        (&mount["mountPath"], &mount["name"]),
        (&Value::from("/etc/nats-accounts"), &volume["name"])
    );
    assert_eq!(volume["configMap"]["name"], "nats-accounts");
    // Every user accounts.conf knows has its key in the servers' environment (a missing
    // variable stops nats-server at start).
    for variable in accounts.keys() {
        assert!(
            server_keys.contains_key(variable),
            "{variable} missing from values.yaml"
        );
    }
}

#[test]
fn a_role_given_another_users_credentials_is_found() {
    let rendered = render("production");
    let swapped = rendered.replacen(
        "secretName: hotpath-nats-consumers",
        "secretName: hotpath-nats-gateway",
        1,
    );
    let findings = wrong_nats_users(&documents(&swapped));
    assert_eq!(
        findings,
        [
            "StatefulSet/consumers: `hotpath consumers` is given hotpath-nats-gateway, not hotpath-nats-consumers"
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// What the deployment promises.

/// Where a pod falls short of the "restricted" Pod Security Standard, of a read-only root
/// with an emptyDir on /tmp, or of requests and limits.
fn unconfined(role: &Role<'_>) -> Vec<String> {
    let (pod, container) = (role.pod, role.container);
    let checks = [
        (
            pod["securityContext"]["runAsNonRoot"] == true,
            "runAsNonRoot",
        ),
        (
            pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault",
            "seccompProfile RuntimeDefault",
        ),
        (
            container["securityContext"]["allowPrivilegeEscalation"] == false,
            "allowPrivilegeEscalation: false",
        ),
        (
            container["securityContext"]["capabilities"]["drop"] == serde_json::json!(["ALL"]),
            "capabilities.drop [ALL]",
        ),
        (
            container["securityContext"]["readOnlyRootFilesystem"] == true,
            "readOnlyRootFilesystem",
        ),
        (tmp_is_an_empty_dir(role), "an emptyDir on /tmp"),
    ];
    let mut findings: Vec<String> = checks
        .iter()
        .filter(|(ok, _)| !ok)
        .map(|(_, what)| format!("{}: no {what}", role.workload))
        .collect();
    for bound in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            if container["resources"][bound][resource].is_null() {
                findings.push(format!("{}: no {bound}.{resource}", role.workload));
            }
        }
    }
    findings
}

fn tmp_is_an_empty_dir(role: &Role<'_>) -> bool {
    let mounts = role.container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten();
    let Some(mount) = mounts.into_iter().find(|m| m["mountPath"] == "/tmp") else {
        return false;
    };
    let volumes = role.pod["volumes"].as_array().into_iter().flatten();
    volumes
        .into_iter()
        .any(|v| v["name"] == mount["name"] && v["emptyDir"].is_object())
}

/// A role (not the Job) without a PodMonitor that selects its pods on a port it listens on.
fn unmonitored(manifests: &[Value]) -> Vec<String> {
    let monitors: Vec<&Value> = manifests
        .iter()
        .filter(|m| m["kind"] == "PodMonitor")
        .collect();
    let mut findings = Vec::new();
    let workloads = manifests
        .iter()
        .filter(|m| m["kind"] == "Deployment" || m["kind"] == "StatefulSet");
    for workload in workloads {
        let labels = &workload["spec"]["template"]["metadata"]["labels"];
        let ports = workload["spec"]["template"]["spec"]["containers"][0]["ports"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let scraped = monitors.iter().any(|monitor| {
            let selector = monitor["spec"]["selector"]["matchLabels"].as_object();
            let selects = selector.is_some_and(|s| s.iter().all(|(k, v)| &labels[k] == v));
            let endpoints = monitor["spec"]["podMetricsEndpoints"].as_array();
            let on_a_port = endpoints
                .into_iter()
                .flatten()
                .any(|e| e["path"] == "/metrics" && ports.iter().any(|p| p["name"] == e["port"]));
            selects && on_a_port
        });
        if !scraped {
            let name = workload["metadata"]["name"].as_str().unwrap_or_default();
            findings.push(format!("{name}: no PodMonitor scrapes it"));
        }
    }
    findings
}

/// The value of a setting in the ConfigMap the roles read.
fn setting<'a>(manifests: &'a [Value], name: &str) -> Option<&'a str> {
    let settings = manifests.iter().find(|m| {
        m["kind"] == "ConfigMap"
            && m["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("hotpath-settings"))
    })?;
    settings["data"][name].as_str()
}

#[test]
fn every_pod_is_restricted_bounded_and_monitored() {
    for overlay in OVERLAYS {
        let manifests = documents(&render(overlay));
        let mut findings: Vec<String> = roles(&manifests).iter().flat_map(unconfined).collect();
        findings.extend(unmonitored(&manifests));
        assert!(findings.is_empty(), "k8s/overlays/{overlay}: {findings:#?}");
    }
}

#[test]
fn a_pod_allowed_to_escalate_or_unscraped_is_found() {
    let rendered = render("dev");
    let escalating = rendered.replacen(
        "allowPrivilegeEscalation: false",
        "allowPrivilegeEscalation: true",
        1,
    );
    let manifests = documents(&escalating);
    let findings: Vec<String> = roles(&manifests).iter().flat_map(unconfined).collect();
    assert_eq!(findings.len(), 1, "{findings:#?}");
    assert!(
        findings[0].ends_with("no allowPrivilegeEscalation: false"),
        "{findings:#?}"
    );

    let mut manifests = documents(&rendered);
    manifests.retain(|m| !(m["kind"] == "PodMonitor" && m["metadata"]["name"] == "push"));
    assert_eq!(unmonitored(&manifests), ["push: no PodMonitor scrapes it"]);
}

/// The consumers' replica count, and `HOTPATH_CONSUMER_REPLICAS`, `HOTPATH_NATS_REPLICAS` and
/// the gateways' autoscaling bounds, of an overlay.
fn plan(manifests: &[Value]) -> (u64, u64, u64, u64) {
    let consumers = find(manifests, "StatefulSet", "consumers").expect("the consumers");
    let role = roles(manifests)
        .into_iter()
        .find(|r| r.workload == "StatefulSet/consumers")
        .expect("the consumers' container");
    let replica = &role
        .env_value("HOTPATH_CONSUMER_REPLICA")
        .expect("replica k")["valueFrom"];
    assert_eq!(
        replica["fieldRef"]["fieldPath"], "metadata.labels['apps.kubernetes.io/pod-index']",
        "replica k is the pod's ordinal"
    );
    let replicas = role.env_value("HOTPATH_CONSUMER_REPLICAS").expect("n")["value"]
        .as_str()
        .and_then(|n| n.parse::<u64>().ok())
        .expect("HOTPATH_CONSUMER_REPLICAS is a number");
    assert_eq!(
        consumers["spec"]["replicas"], replicas,
        "HOTPATH_CONSUMER_REPLICAS"
    );
    let partitions: u64 = setting(manifests, "HOTPATH_PARTITIONS")
        .expect("partitions")
        .parse()
        .unwrap();
    assert!(
        replicas <= partitions,
        "more consumer replicas than partitions"
    );
    let nats_replicas = setting(manifests, "HOTPATH_NATS_REPLICAS")
        .expect("R")
        .parse()
        .unwrap();
    let hpa = find(manifests, "HorizontalPodAutoscaler", "gateway").expect("the gateways' HPA");
    let min = hpa["spec"]["minReplicas"].as_u64().expect("minReplicas");
    (
        replicas,
        nats_replicas,
        min,
        hpa["spec"]["maxReplicas"].as_u64().expect("maxReplicas"),
    )
}

#[test]
fn dev_runs_one_of_each_and_production_the_partition_plan_at_three_replicas() {
    let dev = documents(&render("dev"));
    assert_eq!(plan(&dev), (1, 1, 1, 1));
    assert_eq!(
        find(&dev, "Deployment", "push").unwrap()["spec"]["replicas"],
        1
    );
    assert_eq!(
        find(&dev, "Cluster", "hotpath-db").unwrap()["spec"]["instances"],
        1
    );

    let production = documents(&render("production"));
    let (consumers, nats_replicas, min_gateways, _) = plan(&production);
    assert_eq!((consumers, nats_replicas), (4, 3));
    assert!(min_gateways >= 3, "{min_gateways} gateways");
    assert_eq!(
        find(&production, "Cluster", "hotpath-db").unwrap()["spec"]["instances"],
        3
    );
}
