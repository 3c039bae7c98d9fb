//! Starts real servers: nats-server (found like `hotpath up` finds it) and Postgres 15.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hotpath_localstack::{
    Health, NatsCluster, NatsOptions, NatsRole, NatsServer, Postgres, find_nats_server, free_port,
    nats_server_version,
};
use tokio::io::AsyncBufReadExt;

const FAST_PG: &[&str] = &[
    "-c",
    "fsync=off",
    "-c",
    "synchronous_commit=off",
    "-c",
    "full_page_writes=off",
];

/// Set by `servers_die_with_their_owner` when it re-runs this binary as the owner process.
const OWNER_DIR_ENV: &str = "HOTPATH_LOCALSTACK_TEST_OWNER_DIR";

async fn read_info(port: u16) -> std::io::Result<String> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let mut line = String::new();
    tokio::io::BufReader::new(stream)
        .read_line(&mut line)
        .await?;
    Ok(line)
}

fn psql(port: u16, database: &str, sql: &str) -> String {
    let output = Command::new("psql")
        .args([
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-tA",
        ])
        .args(["-p", &port.to_string(), "-d", database, "-c", sql])
        .output()
        .expect("psql runs");
    assert!(
        output.status.success(),
        "psql {sql:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// A temporary directory with mode 0700, as some `tempfile` versions and umasks create them.
fn private_tempdir(dir: std::io::Result<tempfile::TempDir>) -> tempfile::TempDir {
    let dir = dir.expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    dir
}

/// Whether `pid` is a live (non-zombie) process.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
    })
}

fn wait_gone(pid: u32, within: Duration) {
    let deadline = Instant::now() + within;
    while alive(pid) {
        assert!(
            Instant::now() < deadline,
            "pid {pid} still alive after {within:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn assert_no_processes(dir: &Path) {
    let output = Command::new("pgrep")
        .arg("-af")
        .arg(dir)
        .output()
        .expect("pgrep runs");
    assert_eq!(
        output.status.code(),
        Some(1),
        "processes left behind in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&output.stdout)
    );
}

#[test]
fn nats_server_is_found_and_checked() {
    let bin = find_nats_server().expect("nats-server is installed");
    let (major, minor, _) = nats_server_version(&bin).expect("version parses");
    assert!((major, minor) >= (2, 10), "{major}.{minor}");

    let tmp = tempfile::tempdir().expect("tempdir");
    let fake = tmp.path().join("nats-server");
    std::fs::write(&fake, "#!/bin/sh\necho 'nats-server: v2.9.25'\n").expect("write script");
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    // Another test thread may fork while we hold the script open for writing; exec then fails
    // with ETXTBSY until that child has exec'd.
    let deadline = Instant::now() + Duration::from_secs(5);
    let version = loop {
        match nats_server_version(&fake) {
            Err(err) if format!("{err:#}").contains("busy") && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            other => break other.expect("fake version parses"),
        }
    };
    assert_eq!(version, (2, 9, 25));
}

#[tokio::test]
async fn nats_starts_survives_kill_and_restarts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let port = free_port().expect("free port");
    let mut nats = NatsServer::start(tmp.path(), port)
        .await
        .expect("nats starts");
    assert_eq!(nats.url(), format!("nats://127.0.0.1:{port}"));
    assert!(nats.pid().is_some());
    let info = read_info(port).await.expect("INFO");
    assert!(info.starts_with("INFO {"), "{info}");
    assert!(info.contains("\"server_name\":\"hotpath-local\""), "{info}");
    assert!(tmp.path().join("nats.conf").exists());

    nats.kill().await;
    assert_eq!(nats.pid(), None);
    assert!(
        read_info(port).await.is_err(),
        "killed server still answers"
    );
    nats.kill().await; // idempotent

    nats.restart().await.expect("restart after kill");
    assert!(
        read_info(port)
            .await
            .expect("INFO after restart")
            .starts_with("INFO {")
    );

    nats.stop().await.expect("stop");
    nats.stop().await.expect("stop is idempotent");
    assert!(
        read_info(port).await.is_err(),
        "stopped server still answers"
    );
    nats.restart().await.expect("restart after stop");
    let pid = nats.pid().expect("running");

    // Dropping the handle kills the server.
    drop(nats);
    assert!(!alive(pid));
    assert!(tmp.path().join("jetstream").is_dir());
    assert_no_processes(tmp.path());
}

#[tokio::test]
async fn one_node_runs_the_production_files_with_fresh_users_and_no_anonymous_access() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut nats = NatsCluster::start(tmp.path(), 1)
        .await
        .expect("one node starts");
    let node = nats.node(0);
    assert_eq!(nats.urls(), node.url());
    let info = read_info(node.ports().client).await.expect("INFO");
    assert!(info.contains("\"server_name\":\"hotpath-0\""), "{info}");
    assert!(info.contains("\"auth_required\":true"), "{info}");
    assert!(info.contains("\"jetstream\":true"), "{info}");

    // The very files of nats/cluster/, unchanged.
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../nats/cluster");
    for file in ["node.conf", "nats-server.conf", "accounts.conf"] {
        let shipped = std::fs::read(repo.join(file)).expect("shipped file");
        let used = std::fs::read(nats.dir().join("conf").join(file)).expect("written file");
        assert_eq!(shipped, used, "{file}");
    }
    // One seed per user, readable by its owner only.
    for role in NatsRole::ALL {
        let creds = nats.creds(role);
        let mode = std::fs::metadata(&creds)
            .expect("seed file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{}", creds.display());
        let seed = std::fs::read_to_string(&creds).expect("seed");
        assert!(seed.starts_with("SU"), "{role:?}'s file holds a user seed");
    }

    let before = nats.node(0).pid().expect("running");
    nats.node_mut(0).kill().await.expect("kill");
    assert!(!alive(before));
    nats.node_mut(0).restart().await.expect("restart");
    nats.node_mut(0)
        .wait_healthy(Health::Current, Duration::from_secs(30))
        .await
        .expect("current again");
    drop(nats);
    assert_no_processes(tmp.path());
}

/// What nats-server's monitoring endpoint says of itself (`GET /varz`), polled until it answers.
fn varz(monitor_port: u16) -> String {
    use std::io::{Read, Write};
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = std::net::TcpStream::connect(("127.0.0.1", monitor_port)).and_then(|mut s| {
            s.write_all(b"GET /varz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            Ok(text)
        });
        match answer {
            Ok(text) if text.contains("\"jetstream\"") => return text,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            other => panic!("no /varz on port {monitor_port}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn nats_can_sync_jetstream_to_disk_on_every_write_or_at_an_interval() {
    let bin = find_nats_server().expect("nats-server is installed");
    for (sync, reported) in [
        ("always", "\"sync_always\": true"),
        ("250ms", "\"sync_interval\": 250000000,"),
    ] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let options = NatsOptions {
            sync_interval: Some(sync.to_owned()),
        };
        let mut nats = NatsServer::start_with(tmp.path(), free_port().expect("port"), options)
            .await
            .expect("nats starts with a sync interval");
        let config = std::fs::read_to_string(tmp.path().join("nats.conf")).expect("config");
        assert!(
            config.contains(&format!("sync_interval: \"{sync}\"")),
            "{config}"
        );
        // A restart writes the same config again.
        nats.restart().await.expect("restart");
        let again = std::fs::read_to_string(tmp.path().join("nats.conf")).expect("config");
        assert_eq!(again, config);

        // The server applies it: run it once more on that config with its monitoring port open.
        nats.stop().await.expect("stop");
        let monitor_port = free_port().expect("port");
        let mut server = Command::new(&bin)
            .arg("-c")
            .arg(tmp.path().join("nats.conf"))
            .args(["-m", &monitor_port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server runs");
        let varz = varz(monitor_port);
        server.kill().expect("kill");
        server.wait().expect("reap");
        assert!(varz.contains(reported), "{sync}: {varz}");
    }
}

#[tokio::test]
async fn postgres_keeps_data_across_stop_kill_and_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let port = free_port().expect("free port");
    let mut pg = Postgres::start(tmp.path(), port, "hotpath_test", FAST_PG)
        .await
        .expect("postgres starts");
    assert_eq!(
        pg.url(),
        format!("postgres://postgres@127.0.0.1:{port}/hotpath_test")
    );
    assert_eq!(psql(port, "hotpath_test", "select 1"), "1");
    psql(
        port,
        "hotpath_test",
        "create table kept (v int); insert into kept values (42)",
    );
    assert_eq!(Postgres::is_running_at(tmp.path()), pg.pid());

    // A second server on the same data directory is refused.
    let err = Postgres::start(
        tmp.path(),
        free_port().expect("port"),
        "hotpath_test",
        FAST_PG,
    )
    .await
    .expect_err("second postmaster on the same pgdata");
    assert!(format!("{err:#}").contains("already running"), "{err:#}");

    pg.stop().await.expect("stop");
    assert_eq!(pg.pid(), None);
    assert_eq!(Postgres::is_running_at(tmp.path()), None);
    pg.stop().await.expect("stop is idempotent");
    pg.restart().await.expect("restart after stop");
    assert_eq!(psql(port, "hotpath_test", "select v from kept"), "42");

    // A connection held open across the kill: its backend must not block the restart.
    let mut idle = Command::new("psql")
        .args([
            "-X",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "hotpath_test",
        ])
        .args(["-p", &port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("psql");
    // synchronous_commit=off may lose the last commits in a crash; not this one.
    psql(
        port,
        "hotpath_test",
        "set synchronous_commit = on; insert into kept values (43)",
    );
    let postmaster = pg.pid().expect("running");
    pg.kill().await;
    assert!(!alive(postmaster));
    pg.kill().await; // idempotent
    pg.restart().await.expect("restart after kill");
    assert_eq!(psql(port, "hotpath_test", "select count(*) from kept"), "2");
    idle.kill().expect("kill idle psql");
    idle.wait().expect("reap idle psql");

    drop(pg);
    assert_eq!(Postgres::is_running_at(tmp.path()), None);
    assert_no_processes(tmp.path());

    // A fresh handle reuses the cluster in the directory.
    let pg = Postgres::start(tmp.path(), port, "hotpath_test", FAST_PG)
        .await
        .expect("start on existing cluster");
    assert_eq!(psql(port, "hotpath_test", "select count(*) from kept"), "2");
    drop(pg);
    assert_no_processes(tmp.path());
}

/// The layout `hotpath up` and the cli test harness use: one subdirectory per server inside
/// a (0700) temporary directory. As root, Postgres runs as `postgres` and must get through it.
#[tokio::test]
async fn servers_start_in_subdirectories_of_a_private_tempdir() {
    let tmp = private_tempdir(tempfile::tempdir());
    let mut nats = NatsServer::start(&tmp.path().join("nats"), free_port().expect("port"))
        .await
        .expect("nats starts");
    let port = free_port().expect("port");
    let mut pg = Postgres::start(&tmp.path().join("deeper/postgres"), port, "sub", FAST_PG)
        .await
        .expect("postgres starts");
    assert_eq!(psql(port, "sub", "select current_database()"), "sub");
    pg.stop().await.expect("stop postgres");
    nats.stop().await.expect("stop nats");
    assert_no_processes(tmp.path());
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        let mode = std::fs::metadata(tmp.path())
            .expect("stat")
            .permissions()
            .mode();
        assert_ne!(mode & 0o001, 0, "made traversable for postgres");
    }
}

/// A private directory that is not ours to open up (outside the temp directory, like a home
/// directory) is reported, not chmod'ed. Only meaningful as root.
#[tokio::test]
async fn postgres_refuses_private_ancestors_outside_tmp() {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    // A checkout inside the temp directory (CI may clone there) has no "outside" to test.
    let outside = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    if outside.starts_with(std::env::temp_dir()) {
        eprintln!("skipped: the target directory is inside the temp directory");
        return;
    }
    let private = private_tempdir(tempfile::tempdir_in(outside));
    let err = Postgres::start(
        &private.path().join("postgres"),
        free_port().expect("port"),
        "x",
        FAST_PG,
    )
    .await
    .expect_err("postgres cannot reach its data directory");
    let message = format!("{err:#}");
    assert!(message.contains("cannot traverse"), "{message}");
    assert!(
        message.contains(&private.path().display().to_string()),
        "{message}"
    );
    let mode = std::fs::metadata(private.path())
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "left unchanged");
}

/// The owner process of `servers_die_with_their_owner`; does nothing in a normal test run.
#[tokio::test]
async fn owner_process() {
    let Some(dir) = std::env::var_os(OWNER_DIR_ENV) else {
        return;
    };
    let dir = Path::new(&dir);
    let nats = NatsServer::start(dir, free_port().expect("port"))
        .await
        .expect("nats starts");
    let pg = Postgres::start(dir, free_port().expect("port"), "owned", FAST_PG)
        .await
        .expect("postgres starts");
    println!(
        "PIDS {} {}",
        nats.pid().expect("running"),
        pg.pid().expect("running")
    );
    // Wait to be SIGKILLed; the handles are never dropped.
    std::future::pending::<()>().await;
}

#[test]
fn servers_die_with_their_owner() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut owner = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "owner_process",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(OWNER_DIR_ENV, tmp.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn owner");
    let stdout = owner.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // libtest's "test owner_process ... " precedes it on the same line.
            if let Some((_, pids)) = line.split_once("PIDS ") {
                let _ = tx.send(pids.to_owned());
            }
        }
    });
    let pids = rx.recv_timeout(Duration::from_secs(60));
    owner.kill().expect("SIGKILL owner");
    owner.wait().expect("reap owner");
    let pids: Vec<u32> = pids
        .expect("owner reports its servers")
        .split_whitespace()
        .map(|pid| pid.parse().expect("pid"))
        .collect();
    assert_eq!(pids.len(), 2);
    for pid in pids {
        wait_gone(pid, Duration::from_secs(10));
    }
    assert_no_processes(tmp.path());

    // What `hotpath up` does after being killed: the same directory starts again (stale
    // postmaster.pid, possibly lingering backends) and shuts down cleanly.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut pg = Postgres::start(tmp.path(), free_port().expect("port"), "owned", FAST_PG)
            .await
            .expect("postgres starts after its owner was killed");
        pg.stop().await.expect("stop");
        let mut nats = NatsServer::start(tmp.path(), free_port().expect("port"))
            .await
            .expect("nats starts after its owner was killed");
        nats.stop().await.expect("stop");
    });
    assert_no_processes(tmp.path());
}
