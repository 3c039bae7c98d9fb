//! Which NATS the operator commands (`hotpath dlq`, `replay`, `policy`) talk to.
//!
//! An operator runs these beside a running system, so the URL is found the way they would look
//! for it: the flag or `HOTPATH_NATS_URL` if given, else the port `hotpath up` recorded in its
//! data directory's `ports.json`, else the same default the roles use
//! ([`DEFAULT_NATS_URL`]). A NATS with accounts (`nats/cluster/accounts.conf`) also needs the
//! operator's credentials: `--nats-creds` or `HOTPATH_NATS_CREDS`.

use std::path::PathBuf;

use clap::Args;
use hotpath_core::config::DEFAULT_NATS_URL;
use hotpath_core::nats_auth::NatsUser;

/// The flags every operator command takes to find NATS.
#[derive(Debug, Clone, Args)]
pub struct NatsTarget {
    /// NATS URL (default: from `hotpath up`'s data directory, else the roles' default,
    /// nats://127.0.0.1:4222).
    #[arg(long, env = "HOTPATH_NATS_URL", global = true)]
    pub nats_url: Option<String>,
    /// Data directory of a `hotpath up` whose NATS to use when no URL is given.
    #[arg(long, default_value = ".hotpath", global = true)]
    pub data_dir: PathBuf,
    /// File with the NATS credentials to use: the operator's nkey user seed or a `.creds`
    /// file (a NATS with accounts lets nobody in without); unset: none. Only the path is
    /// ever printed.
    #[arg(long, env = "HOTPATH_NATS_CREDS", global = true)]
    pub nats_creds: Option<PathBuf>,
}

impl NatsTarget {
    /// The NATS at `url`, with the credentials in `creds` if given.
    pub fn new(url: String, creds: Option<PathBuf>) -> NatsTarget {
        NatsTarget {
            nats_url: Some(url),
            data_dir: PathBuf::from(".hotpath"),
            nats_creds: creds,
        }
    }

    /// Where NATS is: the flag or env, else `hotpath up`'s data directory, else the default.
    pub fn url(&self) -> String {
        self.nats_url
            .clone()
            .or_else(|| {
                hotpath_localstack::Ports::read(&self.data_dir)
                    .ok()
                    .map(|p| format!("nats://127.0.0.1:{}", p.nats))
            })
            .unwrap_or_else(|| DEFAULT_NATS_URL.to_string())
    }

    /// Connects to it as the operator, naming the client `name` (as `nats server report
    /// connections` shows it).
    pub async fn connect(&self, name: &str) -> anyhow::Result<async_nats::Client> {
        hotpath_core::streams::connect(
            &self.url(),
            name,
            NatsUser::Operator,
            self.nats_creds.as_deref(),
        )
        .await
    }
}
