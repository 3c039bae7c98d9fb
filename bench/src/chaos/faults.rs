//! The faults: what is broken, when, how, and when it counts as healed.
//!
//! | fault | how | healed when |
//! | --- | --- | --- |
//! | a NATS node (the last) | `kill -9`; the supervisor of `hotpath up` restarts it | a new pid is recorded and the node is current (its monitoring `/healthz`; a node without one: it greets with `INFO`) |
//! | a consumer replica (`consumers-0`) | `kill -9`; restarted by the supervisor | a new pid is recorded and its `/readyz` says `holding` (it took its partition leases back, once the dead process's expired) |
//! | a gateway (the last) | `kill -9`; restarted by the supervisor | a new pid is recorded and its `/readyz` answers 200 |
//! | Postgres | its hold file is created (the supervisor then leaves it down), the postmaster gets SIGINT (`pg_ctl stop -m fast`), and after `--postgres-down-secs` the hold file is removed | the supervisor restarted it (a new pid) and a fresh connection runs `SELECT 1` |
//!
//! The faults are spread evenly over the run, Postgres last so that the run goes on after
//! it returns. Each fault is injected at its time or, if the previous one has not healed by
//! then, as soon as it has: one fault at a time, so every error the clients see belongs to
//! one fault.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use hotpath_localstack::{Member, Ports};
use serde::Serialize;
use sqlx::Connection as _;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::ChaosArgs;
use super::client::Clients;

/// How often healing is checked.
const POLL: Duration = Duration::from_millis(100);
/// The shortest time between two faults the schedule accepts.
const MIN_GAP: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    NatsNode,
    ConsumerReplica,
    Gateway,
    Postgres,
}

impl FaultKind {
    fn describe(self, target: &str, postgres_down: Duration) -> String {
        match self {
            FaultKind::NatsNode => format!("kill -9 {target} (a NATS node)"),
            FaultKind::ConsumerReplica => format!("kill -9 {target} (a consumer replica)"),
            FaultKind::Gateway => format!("kill -9 {target} (a gateway)"),
            FaultKind::Postgres => format!("stop {target} for {} s", postgres_down.as_secs()),
        }
    }

    /// What the process's command line must contain: a pid read from `ports.json` is only
    /// killed if it still is what the file says.
    fn program(self) -> &'static str {
        match self {
            FaultKind::NatsNode => "nats-server",
            FaultKind::ConsumerReplica | FaultKind::Gateway => "hotpath",
            FaultKind::Postgres => "postgres",
        }
    }
}

/// One planned fault.
#[derive(Debug, Clone)]
pub struct Fault {
    pub kind: FaultKind,
    /// The member's name in `ports.json`.
    pub target: String,
    /// From the start of the load.
    pub at: Duration,
}

/// What happened to one fault.
#[derive(Debug, Clone, Serialize)]
pub struct FaultReport {
    pub kind: FaultKind,
    pub target: String,
    pub planned_at_secs: f64,
    pub injected_at_secs: Option<f64>,
    /// From injection until healed; `None` if it did not heal within `--heal-limit-secs`.
    pub heal_secs: Option<f64>,
    pub pid_before: Option<u32>,
    pub pid_after: Option<u32>,
    /// The clients' failed attempts by class between injection and healing.
    pub errors: BTreeMap<String, u64>,
    /// What went wrong injecting or healing, if anything.
    pub problem: Option<String>,
}

pub struct Schedule {
    pub faults: Vec<Fault>,
    postgres_down: Duration,
}

impl Schedule {
    /// The four faults spread over the run: the first at a tenth of it (at least 5 s), the
    /// last (Postgres) so that it returns a tenth before the end.
    pub fn plan(args: &ChaosArgs, ports: &Ports) -> anyhow::Result<Schedule> {
        let duration = Duration::from_secs(args.duration_secs);
        let postgres_down = Duration::from_secs(args.postgres_down_secs);
        let first = (duration / 10).max(MIN_GAP);
        let last = duration
            .checked_sub(postgres_down + first)
            .filter(|last| *last >= first + MIN_GAP * 3)
            .with_context(|| {
                format!(
                    "a {} s run is too short for four faults {} s apart with Postgres down for \
                     {} s: raise --duration-secs",
                    args.duration_secs,
                    MIN_GAP.as_secs(),
                    args.postgres_down_secs
                )
            })?;
        let gap = (last - first) / 3;
        let name = |member: Option<&Member>, what: &str| {
            member
                .map(|m| m.name.clone())
                .with_context(|| format!("ports.json records no {what}"))
        };
        let faults = vec![
            Fault {
                kind: FaultKind::NatsNode,
                target: name(ports.nats_nodes.last(), "NATS node")?,
                at: first,
            },
            Fault {
                kind: FaultKind::ConsumerReplica,
                target: name(ports.consumers.first(), "consumer replica")?,
                at: first + gap,
            },
            Fault {
                kind: FaultKind::Gateway,
                target: name(ports.gateways.last(), "gateway")?,
                at: first + gap * 2,
            },
            Fault {
                kind: FaultKind::Postgres,
                target: name(ports.postgres_server.as_ref(), "Postgres")?,
                at: last,
            },
        ];
        Ok(Schedule {
            faults,
            postgres_down,
        })
    }

    /// The schedule, printed before the run starts.
    pub fn describe(&self, args: &ChaosArgs, gateways: &[String]) -> String {
        let mut text = format!(
            "\nchaos: {} msg/s for {} s through {} gateway(s) ({}), faults one at a time:\n",
            args.rate,
            args.duration_secs,
            gateways.len(),
            gateways.join(", ")
        );
        for fault in &self.faults {
            text.push_str(&format!(
                "  t+{:>5.1} s  {}\n",
                fault.at.as_secs_f64(),
                fault.kind.describe(&fault.target, self.postgres_down)
            ));
        }
        text
    }

    /// Injects each fault at its time (or once the previous one healed) and waits for it to
    /// heal. `start` is the load's time zero.
    pub async fn run(
        &self,
        data_dir: &Path,
        database_url: &str,
        clients: &Clients,
        args: &ChaosArgs,
        start: Instant,
    ) -> Vec<FaultReport> {
        let drill = Drill {
            data_dir,
            database_url,
            postgres_down: self.postgres_down,
            heal_limit: Duration::from_secs(args.heal_limit_secs),
        };
        let mut reports = Vec::new();
        for (i, fault) in self.faults.iter().enumerate() {
            tokio::time::sleep_until(start + fault.at).await;
            let injected_at = start.elapsed().as_secs_f64();
            println!(
                "t+{injected_at:>5.1} s  {}",
                fault.kind.describe(&fault.target, self.postgres_down)
            );
            clients.set_phase(Some(i));
            let outcome = drill.inject_and_heal(fault).await;
            clients.set_phase(None);
            let mut report = FaultReport {
                kind: fault.kind,
                target: fault.target.clone(),
                planned_at_secs: fault.at.as_secs_f64(),
                injected_at_secs: Some(injected_at),
                heal_secs: None,
                pid_before: None,
                pid_after: None,
                errors: clients.errors_during(i),
                problem: None,
            };
            match outcome {
                Ok(healed) => {
                    println!("           healed in {:.1} s", healed.secs);
                    report.heal_secs = Some(healed.secs);
                    report.pid_before = Some(healed.pid_before);
                    report.pid_after = healed.pid_after;
                }
                Err(error) => {
                    println!("           did not heal: {error:#}");
                    report.problem = Some(format!("{error:#}"));
                }
            }
            reports.push(report);
        }
        reports
    }
}

/// How a fault healed.
struct Healed {
    secs: f64,
    pid_before: u32,
    pid_after: Option<u32>,
}

/// Where and how the faults are injected.
struct Drill<'a> {
    data_dir: &'a Path,
    database_url: &'a str,
    postgres_down: Duration,
    heal_limit: Duration,
}

impl Drill<'_> {
    async fn inject_and_heal(&self, fault: &Fault) -> anyhow::Result<Healed> {
        let member = self.member(&fault.target)?;
        let pid = member
            .pid
            .with_context(|| format!("{} is not running", fault.target))?;
        anyhow::ensure!(
            runs(pid, fault.kind.program()),
            "pid {pid} recorded for {} is not a running {}",
            fault.target,
            fault.kind.program()
        );
        let injected = Instant::now();
        if fault.kind == FaultKind::Postgres {
            self.stop_postgres_for_a_while(&fault.target, pid).await?;
        } else {
            signal(pid, libc::SIGKILL)?;
        }
        let pid_after = self.until_healed(fault, pid, injected).await?;
        Ok(Healed {
            secs: injected.elapsed().as_secs_f64(),
            pid_before: pid,
            pid_after,
        })
    }

    /// Holds Postgres (so the supervisor does not restart it), stops it, waits, releases it.
    async fn stop_postgres_for_a_while(&self, name: &str, pid: u32) -> anyhow::Result<()> {
        let hold = Ports::hold_file(self.data_dir, name);
        if let Some(dir) = hold.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&hold, "held by hotpath-bench chaos\n")
            .with_context(|| format!("creating {}", hold.display()))?;
        let stopped = async {
            let until = Instant::now() + self.postgres_down;
            // Fast shutdown, as `pg_ctl stop -m fast` sends it.
            signal(pid, libc::SIGINT)?;
            while runs(pid, "postgres") {
                anyhow::ensure!(Instant::now() < until, "postgres (pid {pid}) did not stop");
                tokio::time::sleep(POLL).await;
            }
            tokio::time::sleep_until(until).await;
            anyhow::Ok(())
        }
        .await;
        std::fs::remove_file(&hold).with_context(|| format!("removing {}", hold.display()))?;
        stopped
    }

    /// Waits until `fault`'s member runs again under a new pid and is ready; returns the pid.
    async fn until_healed(
        &self,
        fault: &Fault,
        old_pid: u32,
        injected: Instant,
    ) -> anyhow::Result<Option<u32>> {
        let deadline = injected + self.heal_limit;
        loop {
            let member = self.member(&fault.target)?;
            if let Some(pid) = member.pid.filter(|pid| *pid != old_pid)
                && self.ready(fault.kind, &member).await
            {
                return Ok(Some(pid));
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} not back within {:?}",
                fault.target,
                self.heal_limit
            );
            tokio::time::sleep(POLL).await;
        }
    }

    async fn ready(&self, kind: FaultKind, member: &Member) -> bool {
        match kind {
            FaultKind::NatsNode => nats_ready(member).await,
            FaultKind::Gateway => readyz(member).await.is_some(),
            FaultKind::ConsumerReplica => readyz(member)
                .await
                .is_some_and(|body| body["status"] == "holding"),
            FaultKind::Postgres => postgres_answers(self.database_url).await,
        }
    }

    fn member(&self, name: &str) -> anyhow::Result<Member> {
        Ports::read(self.data_dir)?
            .members()
            .find(|member| member.name == name)
            .cloned()
            .with_context(|| format!("{name} is no longer in ports.json"))
    }
}

/// Whether `pid` is a live (not zombie) process whose command line contains `program`.
fn runs(pid: u32, program: &str) -> bool {
    let alive = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
    });
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    alive && String::from_utf8_lossy(&cmdline).contains(program)
}

fn signal(pid: u32, signal: libc::c_int) -> anyhow::Result<()> {
    let pid = libc::pid_t::try_from(pid).context("pid out of range")?;
    // SAFETY: kill(2) on a pid just checked to be the member ports.json names.
    if unsafe { libc::kill(pid, signal) } != 0 {
        return Err(std::io::Error::last_os_error()).context("kill");
    }
    Ok(())
}

/// A NATS node is back when its monitoring endpoint says it is current (`/healthz`: JetStream
/// enabled, a meta leader known, caught up with every stream it holds), or, for a node
/// without one, when it greets a new connection with its `INFO` line.
async fn nats_ready(member: &Member) -> bool {
    if let Some(monitor) = member.monitor_listen {
        let url = format!("http://{monitor}/healthz");
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build();
        return match client {
            Ok(client) => client
                .get(url)
                .send()
                .await
                .is_ok_and(|response| response.status().is_success()),
            Err(_) => false,
        };
    }
    nats_greets(member).await
}

async fn nats_greets(member: &Member) -> bool {
    let greeting = async {
        let stream = TcpStream::connect(member.listen).await?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).await?;
        std::io::Result::Ok(line)
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), greeting).await,
        Ok(Ok(line)) if line.starts_with("INFO ")
    )
}

/// The body of a 200 from the member's `/readyz`, `None` for anything else.
async fn readyz(member: &Member) -> Option<serde_json::Value> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .ok()?;
    let response = client
        .get(format!("{}/readyz", member.url))
        .send()
        .await
        .ok()?;
    if !response.status().is_success() {
        return None;
    }
    Some(response.json().await.unwrap_or(serde_json::Value::Null))
}

/// Whether a fresh connection to Postgres runs a query.
async fn postgres_answers(url: &str) -> bool {
    let check = async {
        let mut connection = sqlx::PgConnection::connect(url).await?;
        sqlx::query("SELECT 1").execute(&mut connection).await?;
        connection.close().await
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(3), check).await,
        Ok(Ok(()))
    )
}
