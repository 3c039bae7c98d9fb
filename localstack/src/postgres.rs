//! A local Postgres cluster.
//!
//! Running as root: Postgres refuses to run as root, and CI runs as root. In that case
//! `initdb` and `postgres` run as the `postgres` system user. The switch happens in the forked
//! child (`setgid`/`setuid` in `pre_exec`, see module `spawner`) rather than through
//! `runuser`/`su`: those would stand between us and the server, so the parent-death signal
//! would kill the wrapper instead of the server, and our signals would reach the wrapper. For
//! that user to work in our directories, the data and socket directories are chowned to it,
//! and the directories leading to them get the execute bits it needs to traverse them, if
//! they are ours to change (see `make_traversable`); other ancestors are checked and
//! reported, never changed.
//!
//! Crashes: a SIGKILLed postmaster leaves `postmaster.pid`, children that exit a moment later
//! (each child `setsid`s, so they are not in the postmaster's process group), and a SysV
//! shared-memory segment. Postgres refuses to start while old children are still attached to
//! that segment, so [`Postgres::kill`] also kills the cluster's remaining processes (found
//! through `/proc`: a `postgres` whose working directory is our data directory) and removes
//! the segment, and start-up clears leftovers of a cluster whose postmaster is dead.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::time::{Instant, sleep, timeout};

use crate::process::{self, create_dir, ensure_port_free, find_in_path, is_executable, log_tail};
use crate::spawner::{self, Credentials};

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_GRACE: Duration = Duration::from_secs(15);
const INITDB_TIMEOUT: Duration = Duration::from_secs(120);
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// `sun_path` is 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// A Postgres server (postmaster) child process listening on 127.0.0.1 only, with trust
/// authentication for the `postgres` superuser.
///
/// Dropping it SIGKILLs the postmaster and the rest of the cluster.
#[derive(Debug)]
pub struct Postgres {
    dir: PathBuf,
    pgdata: PathBuf,
    port: u16,
    database: String,
    extra_args: Vec<String>,
    bindir: PathBuf,
    psql: PathBuf,
    /// `Some` when we are root and the server runs as the `postgres` user.
    owner: Option<Credentials>,
    child: Option<Child>,
}

impl Postgres {
    /// Starts Postgres with its cluster in `<dir>/pgdata` (created with `initdb` on first
    /// use), log in `<dir>/postgres.log`, waits (up to 30 s) until it accepts connections and
    /// creates `database` if it does not exist.
    ///
    /// Fails if a postmaster is already running on this data directory (see
    /// [`Postgres::is_running_at`]).
    pub async fn start(
        dir: &Path,
        port: u16,
        database: &str,
        extra_args: &[&str],
    ) -> Result<Postgres> {
        if database.is_empty() || database.contains('\0') {
            bail!("invalid database name {database:?}");
        }
        let bindir = find_bindir().await?;
        let psql = find_psql(&bindir)?;
        let owner = server_owner()?;
        let (dir, created) = create_dir(dir)?;
        if let Some(owner) = owner {
            make_traversable(&dir, &created, owner)?;
        }
        let mut pg = Postgres {
            pgdata: dir.join("pgdata"),
            dir,
            port,
            database: database.to_owned(),
            extra_args: extra_args.iter().map(|&arg| arg.to_owned()).collect(),
            bindir,
            psql,
            owner,
            child: None,
        };
        pg.init_cluster().await?;
        pg.launch().await?;
        pg.create_database().await?;
        Ok(pg)
    }

    /// The pid of a postmaster that is running on `<dir>/pgdata`, if any. Lets a caller
    /// decide to reuse a server left running instead of failing in [`Postgres::start`].
    pub fn is_running_at(dir: &Path) -> Option<u32> {
        let pgdata = dir.join("pgdata").canonicalize().ok()?;
        let pid = PidFile::read(&pgdata)?.pid;
        (is_cluster_process(pid, &pgdata) == Some(true)).then_some(pid)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{}",
            self.port,
            percent_encode(&self.database)
        )
    }

    /// The postmaster's pid while it runs (`None` after `stop`/`kill`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The cluster's data directory (`<dir>/pgdata`): what `pg_ctl -D` takes.
    pub fn data_dir(&self) -> &Path {
        &self.pgdata
    }

    /// The exit status of a postmaster that ended by itself (stopped or killed from outside);
    /// `None` while it runs, and after [`Postgres::stop`] or [`Postgres::kill`]. A supervisor
    /// polls this and calls [`Postgres::restart`], which clears what a killed cluster left.
    pub fn try_exit(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(child) => Ok(child.try_wait()?),
            None => Ok(None),
        }
    }

    /// Fast shutdown (SIGINT: abort transactions, checkpoint, exit), waiting up to 15 s,
    /// then SIGKILL. Does nothing if the server is not running.
    pub async fn stop(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        let (status, graceful) = process::terminate(child, libc::SIGINT, STOP_GRACE).await?;
        self.child = None;
        if graceful {
            tracing::info!(port = self.port, %status, "postgres stopped");
        } else {
            tracing::warn!(
                port = self.port,
                "postgres did not shut down within {STOP_GRACE:?}; killed it"
            );
        }
        self.reap_cluster().await
    }

    /// SIGKILL the postmaster and the rest of the cluster, and reap the postmaster.
    /// Does nothing if the server is not running.
    pub async fn kill(&mut self) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        match process::kill(child).await {
            Ok(status) => {
                tracing::info!(port = self.port, %status, "postgres killed");
                self.child = None;
            }
            Err(err) => {
                // Keep the handle so that Drop tries again.
                tracing::warn!(port = self.port, "killing postgres: {err:#}");
                return;
            }
        }
        if let Err(err) = self.reap_cluster().await {
            tracing::warn!(port = self.port, "{err:#}");
        }
    }

    /// Starts the server again with the same port, directory and arguments (stopping it
    /// first if it still runs) and waits until it accepts connections.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await?;
        self.launch().await
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    /// Runs initdb unless the cluster exists. initdb works in a scratch directory that is
    /// renamed into place, so an interrupted initdb never leaves a half-made cluster behind.
    async fn init_cluster(&mut self) -> Result<()> {
        if self.pgdata.join("PG_VERSION").exists() {
            self.pgdata = self
                .pgdata
                .canonicalize()
                .with_context(|| format!("resolving {}", self.pgdata.display()))?;
            if let Some(owner) = self.owner {
                take_ownership(&self.pgdata, owner)?;
            }
            return Ok(());
        }
        if self.pgdata.exists() {
            let empty = std::fs::read_dir(&self.pgdata)
                .with_context(|| format!("reading {}", self.pgdata.display()))?
                .next()
                .is_none();
            if !empty {
                bail!(
                    "{} exists but is not a PostgreSQL data directory (no PG_VERSION); \
                     remove it or use another directory",
                    self.pgdata.display()
                );
            }
            std::fs::remove_dir(&self.pgdata)
                .with_context(|| format!("removing empty {}", self.pgdata.display()))?;
        }
        let scratch = self.dir.join("pgdata.initdb-tmp");
        if scratch.exists() {
            std::fs::remove_dir_all(&scratch)
                .with_context(|| format!("removing leftover {}", scratch.display()))?;
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&scratch)
            .with_context(|| format!("creating {}", scratch.display()))?;
        if let Some(owner) = self.owner {
            chown(&scratch, owner)?;
        }

        let log = self.log_path();
        let (stdout, stderr) = process::log_stdio(&log)?;
        let mut cmd = Command::new(self.bindir.join("initdb"));
        cmd.arg("-D")
            .arg(&scratch)
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C"])
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        if self.durability_disabled() {
            // The caller runs with fsync=off; syncing the fresh cluster would be wasted time.
            cmd.arg("--no-sync");
        }
        tracing::info!(pgdata = %self.pgdata.display(), "running initdb");
        let mut child = spawner::spawn(cmd, self.owner)
            .await
            .with_context(|| format!("spawning {}/initdb", self.bindir.display()))?;
        let Some(status) = process::wait_exit(&mut child, INITDB_TIMEOUT).await? else {
            process::kill(&mut child).await?;
            bail!(
                "initdb did not finish within {INITDB_TIMEOUT:?}; {}",
                log_tail(&log)
            );
        };
        if !status.success() {
            bail!("initdb failed ({status}); {}", log_tail(&log));
        }
        std::fs::rename(&scratch, &self.pgdata).with_context(|| {
            format!(
                "renaming {} to {}",
                scratch.display(),
                self.pgdata.display()
            )
        })?;
        Ok(())
    }

    fn durability_disabled(&self) -> bool {
        self.extra_args
            .iter()
            .any(|arg| arg.trim_start_matches("-c").trim_start_matches("--").trim() == "fsync=off")
    }

    async fn launch(&mut self) -> Result<()> {
        self.clear_stale_cluster().await?;
        let socket_setting = self.socket_dir_setting()?;
        ensure_port_free(self.port).context("cannot start postgres")?;
        let log = self.log_path();
        let (stdout, stderr) = process::log_stdio(&log)?;
        let mut cmd = Command::new(self.bindir.join("postgres"));
        cmd.arg("-D")
            .arg(&self.pgdata)
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-c", "listen_addresses=127.0.0.1", "-c"])
            .arg(socket_setting)
            .args(["-c", "max_connections=200"])
            .args(&self.extra_args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let child = spawner::spawn(cmd, self.owner)
            .await
            .with_context(|| format!("spawning {}/postgres", self.bindir.display()))?;
        tracing::info!(pid = child.id(), port = self.port, pgdata = %self.pgdata.display(), "postgres started");
        self.child = Some(child);
        if let Err(err) = self.wait_ready().await {
            self.kill().await;
            return Err(err.context(log_tail(&log)));
        }
        Ok(())
    }

    /// `unix_socket_directories=<dir>/pgsock`, or no Unix socket at all when that path cannot
    /// be used (too long for `sun_path`, or characters that would need GUC list quoting).
    /// We only ever connect over TCP, so the socket is a convenience for humans.
    fn socket_dir_setting(&self) -> Result<String> {
        let sock = self.dir.join("pgsock");
        let usable = sock.to_str().filter(|s| {
            format!("{s}/.s.PGSQL.{}", self.port).len() <= MAX_SOCKET_PATH
                && !s.contains(|c: char| c == ',' || c == '"' || c == '\\' || c.is_whitespace())
        });
        let Some(sock_str) = usable else {
            tracing::warn!(path = %sock.display(), "cannot use this path for postgres' Unix socket; TCP only");
            return Ok("unix_socket_directories=".to_owned());
        };
        if !sock.exists() {
            std::fs::DirBuilder::new()
                .mode(0o755)
                .create(&sock)
                .with_context(|| format!("creating {}", sock.display()))?;
        }
        if let Some(owner) = self.owner {
            chown(&sock, owner)?;
        }
        Ok(format!("unix_socket_directories={sock_str}"))
    }

    /// Refuses to start next to a live postmaster, and cleans up after a dead one.
    async fn clear_stale_cluster(&self) -> Result<()> {
        let file = PidFile::read(&self.pgdata);
        let verdict = file
            .as_ref()
            .map(|file| is_cluster_process(file.pid, &self.pgdata));
        if let (Some(file), Some(Some(true))) = (&file, verdict) {
            bail!(
                "a postgres (pid {}) is already running on {}; stop it, or check \
                 Postgres::is_running_at and reuse it",
                file.pid,
                self.pgdata.display()
            );
        }
        self.reap_cluster().await?;
        if let (Some(file), Some(Some(false))) = (&file, verdict)
            && pid_exists(file.pid)
        {
            // The recorded postmaster is dead, but its pid still exists: as a zombie nobody
            // reaps (a container whose init does not reap orphans), or reused by another
            // program after a reboot. Postgres would take the pid for a running postmaster
            // and refuse to start. The cluster's leftovers are gone (reaped just above), so
            // the lock file protects nothing.
            tracing::warn!(pid = file.pid, "removing stale postmaster.pid");
            let path = self.pgdata.join("postmaster.pid");
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            // The socket's lock file names the same dead pid and would stop postgres just
            // the same; the socket itself is stale too.
            self.remove_stale_sockets();
        }
        // Otherwise: no lock file; or a dead pid, which postgres handles itself; or a
        // postgres we may not inspect (another user's), which postgres will judge.
        Ok(())
    }

    /// Removes `.s.PGSQL.<port>` sockets and their `.lock` files left by a dead postmaster.
    fn remove_stale_sockets(&self) {
        let Ok(entries) = std::fs::read_dir(self.dir.join("pgsock")) else {
            return;
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(".s.PGSQL.")
                && let Err(error) = std::fs::remove_file(entry.path())
            {
                tracing::warn!(path = %entry.path().display(), %error, "could not remove a stale socket file");
            }
        }
    }

    /// Kills processes left over from a dead postmaster of this cluster and removes its
    /// shared-memory segment. Only call this when our postmaster is not running.
    async fn reap_cluster(&self) -> Result<()> {
        let deadline = Instant::now() + process::KILL_WAIT;
        while kill_leftovers(&self.pgdata) {
            if Instant::now() >= deadline {
                bail!(
                    "processes of the old cluster in {} survive SIGKILL",
                    self.pgdata.display()
                );
            }
            sleep(Duration::from_millis(20)).await;
        }
        remove_shared_memory(&self.pgdata);
        Ok(())
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let ready = self.pg_isready().await;
            // Checked after the probe, so that a server that died (say, on a port taken in
            // the meantime) is never mistaken for ready.
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!("postgres exited during startup ({status})");
            }
            match ready {
                Ok(()) => return Ok(()),
                Err(err) if Instant::now() >= deadline => bail!(
                    "postgres on 127.0.0.1:{} not ready after {READY_TIMEOUT:?}: {err:#}",
                    self.port
                ),
                Err(_) => sleep(Duration::from_millis(100)).await,
            }
        }
    }

    async fn pg_isready(&self) -> Result<()> {
        let port = self.port.to_string();
        let output = run_client(
            tokio::process::Command::new(self.bindir.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &port])
                .args(["-U", "postgres", "-d", "postgres", "-t", "2"]),
        )
        .await?;
        if !output.status.success() {
            bail!(
                "pg_isready: {} ({})",
                String::from_utf8_lossy(&output.stdout).trim(),
                output.status
            );
        }
        Ok(())
    }

    async fn create_database(&self) -> Result<()> {
        let exists = format!(
            "SELECT 1 FROM pg_database WHERE datname = '{}'",
            self.database.replace('\'', "''")
        );
        if self.psql(&exists).await? == "1" {
            return Ok(());
        }
        let create = format!("CREATE DATABASE \"{}\"", self.database.replace('"', "\"\""));
        match self.psql(&create).await {
            Ok(_) => {
                tracing::info!(database = %self.database, "created database");
                Ok(())
            }
            // Someone else may have created it concurrently.
            Err(_) if self.psql(&exists).await? == "1" => Ok(()),
            Err(err) => Err(err),
        }
    }

    /// Runs one statement as `postgres` in database `postgres`; returns the trimmed
    /// unaligned, tuples-only output.
    async fn psql(&self, sql: &str) -> Result<String> {
        let port = self.port.to_string();
        let output = run_client(
            tokio::process::Command::new(&self.psql)
                .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-tA"])
                .args(["-h", "127.0.0.1", "-p", &port])
                .args(["-U", "postgres", "-d", "postgres"])
                .args(["-c", sql]),
        )
        .await?;
        if !output.status.success() {
            bail!(
                "psql -c {sql:?} failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        process::kill_blocking(child);
        let deadline = std::time::Instant::now() + process::KILL_WAIT;
        while kill_leftovers(&self.pgdata) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        remove_shared_memory(&self.pgdata);
    }
}

/// Runs a short-lived client program (psql, pg_isready) with a timeout.
async fn run_client(cmd: &mut tokio::process::Command) -> Result<std::process::Output> {
    let program = cmd.as_std().get_program().to_string_lossy().into_owned();
    cmd.stdin(Stdio::null())
        .env("PGCONNECT_TIMEOUT", "10")
        .kill_on_drop(true);
    timeout(CLIENT_TIMEOUT, cmd.output())
        .await
        .with_context(|| format!("{program} did not finish within {CLIENT_TIMEOUT:?}"))?
        .with_context(|| format!("running {program}"))
}

/// `pg_config --bindir` if it has initdb and postgres, else the newest
/// `/usr/lib/postgresql/<version>/bin` that has them.
async fn find_bindir() -> Result<PathBuf> {
    let is_server_bindir =
        |dir: &Path| is_executable(&dir.join("initdb")) && is_executable(&dir.join("postgres"));
    let from_pg_config = tokio::process::Command::new("pg_config")
        .arg("--bindir")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    if let Ok(Ok(output)) = timeout(CLIENT_TIMEOUT, from_pg_config).await
        && output.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if is_server_bindir(&dir) {
            return Ok(dir);
        }
    }
    let root = Path::new("/usr/lib/postgresql");
    let newest = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str().and_then(major_version)?;
            let bin = entry.path().join("bin");
            is_server_bindir(&bin).then_some((version, bin))
        })
        .max();
    newest.map(|(_, bin)| bin).context(
        "PostgreSQL server binaries (initdb, postgres) not found: neither `pg_config --bindir` \
         nor /usr/lib/postgresql/*/bin has them (apt-get install postgresql-15)",
    )
}

/// `15` → (15, 0), `9.6` → (9, 6).
fn major_version(name: &str) -> Option<(u32, u32)> {
    match name.split_once('.') {
        Some((major, minor)) => Some((major.parse().ok()?, minor.parse().ok()?)),
        None => Some((name.parse().ok()?, 0)),
    }
}

fn find_psql(bindir: &Path) -> Result<PathBuf> {
    find_in_path("psql")
        .or_else(|| {
            [
                Path::new("/usr/bin/psql").to_path_buf(),
                bindir.join("psql"),
            ]
            .into_iter()
            .find(|p| is_executable(p))
        })
        .context("psql not found on PATH, in /usr/bin or in the PostgreSQL bindir")
}

/// The `postgres` user when we are root (Postgres refuses to run as root), else `None`.
fn server_owner() -> Result<Option<Credentials>> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let user = lookup_user(c"postgres")?.context(
        "running as root, which PostgreSQL refuses, and there is no `postgres` system user to \
         run it as (installing the postgresql-15 package creates one)",
    )?;
    Ok(Some(user))
}

fn lookup_user(name: &std::ffi::CStr) -> Result<Option<Credentials>> {
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    loop {
        // SAFETY: all-zero is a valid passwd (integers and null pointers).
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: pointers to live locals and a buffer of the length we pass; getpwnam_r is
        // the thread-safe variant.
        let rc = unsafe {
            libc::getpwnam_r(
                name.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < 1024 * 1024 {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc))
                .with_context(|| format!("looking up user {name:?}"));
        }
        return Ok((!result.is_null()).then_some(Credentials {
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
        }));
    }
}

/// Lets `owner` reach `dir`. Directories we are responsible for get the execute (search)
/// bits for group and others when `owner` lacks them: `dir` itself, the parents this crate
/// created, and parents of ours inside the system temp directory (test harnesses pass a
/// subdirectory of a 0700 `tempfile` directory). Any other ancestor (a home directory, say)
/// is only checked: changing its permissions is not our call.
fn make_traversable(dir: &Path, created: &[PathBuf], owner: Credentials) -> Result<()> {
    let temp_root = std::env::temp_dir().canonicalize().ok();
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    let ours = |path: &Path, meta: &std::fs::Metadata| {
        path == dir
            || created.iter().any(|c| c == path)
            || (meta.uid() == euid
                && temp_root
                    .as_deref()
                    .is_some_and(|tmp| path != tmp && path.starts_with(tmp)))
    };
    for ancestor in dir.ancestors() {
        let meta = ancestor
            .metadata()
            .with_context(|| format!("inspecting {}", ancestor.display()))?;
        if can_traverse(&meta, owner) {
            continue;
        }
        if !ours(ancestor, &meta) {
            bail!(
                "postgres runs as the `postgres` user (uid {}) because we are root, and that \
                 user cannot traverse {} (mode {:o}, owner uid {}); allow it (chmod o+x) or use \
                 a directory elsewhere",
                owner.uid,
                ancestor.display(),
                meta.permissions().mode() & 0o7777,
                meta.uid()
            );
        }
        let mode = meta.permissions().mode() | 0o011;
        std::fs::set_permissions(ancestor, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {:o} {}", mode & 0o7777, ancestor.display()))?;
    }
    Ok(())
}

fn can_traverse(meta: &std::fs::Metadata, who: Credentials) -> bool {
    let mode = meta.mode();
    if meta.uid() == who.uid {
        mode & 0o100 != 0
    } else if meta.gid() == who.gid {
        mode & 0o010 != 0
    } else {
        mode & 0o001 != 0
    }
}

fn chown(path: &Path, owner: Credentials) -> Result<()> {
    std::os::unix::fs::lchown(path, Some(owner.uid), Some(owner.gid))
        .with_context(|| format!("chown {}:{} {}", owner.uid, owner.gid, path.display()))
}

/// Gives an existing cluster to `owner` if it belongs to someone else (for instance it was
/// created by a non-root run); postgres requires owning its data directory.
fn take_ownership(pgdata: &Path, owner: Credentials) -> Result<()> {
    let meta = pgdata
        .metadata()
        .with_context(|| format!("inspecting {}", pgdata.display()))?;
    if meta.uid() == owner.uid {
        return Ok(());
    }
    tracing::warn!(pgdata = %pgdata.display(), "data directory is owned by uid {}; chowning it to the postgres user", meta.uid());
    chown_recursive(pgdata, owner)
}

fn chown_recursive(path: &Path, owner: Credentials) -> Result<()> {
    chown(path, owner)?;
    let meta = path
        .symlink_metadata()
        .with_context(|| format!("inspecting {}", path.display()))?;
    if meta.is_dir() {
        for entry in
            std::fs::read_dir(path).with_context(|| format!("reading {}", path.display()))?
        {
            let entry = entry.with_context(|| format!("reading {}", path.display()))?;
            chown_recursive(&entry.path(), owner)?;
        }
    }
    Ok(())
}

/// The parts of `postmaster.pid` we use: line 1 is the postmaster pid, line 7 the SysV
/// shared-memory key and id.
struct PidFile {
    pid: u32,
    shm: Option<(libc::key_t, libc::c_int)>,
}

impl PidFile {
    fn read(pgdata: &Path) -> Option<PidFile> {
        let text = std::fs::read_to_string(pgdata.join("postmaster.pid")).ok()?;
        let mut lines = text.lines();
        let pid = lines.next()?.trim().parse().ok()?;
        let shm = lines.nth(5).and_then(|line| {
            let mut fields = line.split_whitespace();
            Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
        });
        Some(PidFile { pid, shm })
    }
}

/// Whether `pid` exists and is not a zombie.
fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // The state follows the parenthesised command name, which may itself contain ')'.
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
    })
}

/// Whether `pid` exists for kill(2), zombies included (that is how postgres checks
/// `postmaster.pid`).
fn pid_exists(pid: u32) -> bool {
    // Pids are at most 2^22 (PID_MAX_LIMIT), so they fit in pid_t.
    // SAFETY: signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// `Some(true)`: `pid` is a live postgres working in `pgdata` (postmasters and their children
/// `chdir` into the data directory). `Some(false)`: it is not. `None`: cannot tell (it is a
/// postgres, but not ours to inspect).
fn is_cluster_process(pid: u32, pgdata: &Path) -> Option<bool> {
    if !pid_alive(pid) {
        return Some(false);
    }
    let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) else {
        // It went away between the two reads.
        return Some(false);
    };
    if comm.trim_end() != "postgres" {
        return Some(false);
    }
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
    Some(cwd == pgdata)
}

/// SIGKILLs every live process of the cluster in `pgdata`; returns whether there were any.
fn kill_leftovers(pgdata: &Path) -> bool {
    let pids: Vec<u32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .filter(|&pid| is_cluster_process(pid, pgdata) == Some(true))
        .collect();
    for &pid in &pids {
        tracing::debug!(pid, "killing leftover postgres process");
        // Pids are at most 2^22 (PID_MAX_LIMIT), so they fit in pid_t.
        // SAFETY: kill(2); the pid was a process of this cluster a moment ago, and the
        // cluster's postmaster is dead, so it cannot have been replaced by a new child.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    !pids.is_empty()
}

/// Removes the cluster's SysV shared-memory segment once nothing is attached to it. A
/// cleanly stopped postgres removes it itself; a killed one leaves it behind, and segments of
/// data directories that are never started again would pile up in the kernel.
fn remove_shared_memory(pgdata: &Path) {
    let Some(PidFile {
        shm: Some((key, id)),
        ..
    }) = PidFile::read(pgdata)
    else {
        return;
    };
    // SAFETY: shmget/shmctl with integers and a pointer to a local shmid_ds.
    unsafe {
        // Only the segment that still has this key and id: ids are reused.
        if libc::shmget(key, 0, 0) != id {
            return;
        }
        let mut ds: libc::shmid_ds = std::mem::zeroed();
        if libc::shmctl(id, libc::IPC_STAT, &mut ds) != 0 || ds.shm_nattch != 0 {
            return;
        }
        if libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) != 0 {
            tracing::debug!(id, err = %std::io::Error::last_os_error(), "could not remove shared memory segment");
        }
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters (for the URL path).
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
