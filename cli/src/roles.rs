//! Starting Hotpath's roles. `hotpath gateway`, `hotpath consumers` and `hotpath push` run one
//! each (that is how Kubernetes runs them); `hotpath up` and the tests run them all in one
//! process.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context as _;
use async_nats::jetstream;
use hotpath_consumers::Holdings;
use hotpath_core::auth::TokenVerifier;
use hotpath_core::config::Config;
use hotpath_core::nats_auth::NatsUser;
use hotpath_core::policy_store::PolicyStore;
use hotpath_core::{db, presence, streams};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Makes sure the streams, the buckets, the schema and a policy chain exist, creating what is
/// missing and bringing the rest to this configuration (limits, replicas): `hotpath migrate`,
/// `hotpath up`, and every role started without NATS credentials. Each step is idempotent
/// and safe to run concurrently.
pub async fn prepare(config: &Config) -> anyhow::Result<()> {
    let creds = config.nats_creds.as_deref();
    let nats =
        streams::connect(&config.nats_url, "hotpath-setup", NatsUser::Operator, creds).await?;
    let js = jetstream::new(nats);
    streams::ensure_streams(&js, config).await?;
    ensure_buckets(&js, config).await?;
    install_shipped_policies(&js, &config.policy_dir).await?;
    let pool = db::connect(&config.database_url, 2).await?;
    db::migrate(&pool).await?;
    pool.close().await;
    Ok(())
}

/// What a role does before it starts. Without NATS credentials (a development nats-server,
/// where anyone may create anything) it sets everything up itself ([`prepare`]). With them it
/// runs as a least-privilege user that may create nothing but its own durable consumers, so it
/// only checks that what it needs is there ([`crate::prepared::check`]); `hotpath migrate`
/// with the operator's credentials makes it (docs/adr/0009-nats-accounts.md).
pub async fn prepare_role(config: &Config, user: NatsUser) -> anyhow::Result<()> {
    match config.nats_creds {
        None => prepare(config).await,
        Some(_) => crate::prepared::check(config, user).await,
    }
}

/// The KV buckets and the object store, with this deployment's replicas and TTLs.
async fn ensure_buckets(js: &jetstream::Context, config: &Config) -> anyhow::Result<()> {
    let replicas = config.nats_replicas;
    presence::ensure_bucket(js, config.presence_ttl(), replicas).await?;
    PolicyStore::ensure_buckets(js, replicas).await?;
    hotpath_consumers::lease::ensure_bucket(js, config.lease_ttl(), replicas).await
}

/// The shipped policies, in chain order.
pub const SHIPPED_POLICIES: [&str; 2] = ["schema", "authz"];

/// Installs the shipped policies as the chain when there is none yet (a new installation).
/// An existing chain is the operators' and is left alone.
async fn install_shipped_policies(js: &jetstream::Context, dir: &Path) -> anyhow::Result<()> {
    let store = PolicyStore::open(js).await?;
    let (chain, _) = store.chain().await?;
    if !chain.policies.is_empty() {
        return Ok(());
    }
    for name in SHIPPED_POLICIES {
        let module = dir.join(format!("{name}.wasm"));
        let Ok(bytes) = std::fs::read(&module) else {
            tracing::warn!(
                module = %module.display(),
                "no policy chain in NATS and no shipped policy here: build them with policies/build.sh \
                 (the gateway refuses sends until a chain is loaded)"
            );
            return Ok(());
        };
        let vectors = std::fs::read(dir.join(format!("{name}.vectors.json"))).ok();
        let digest = store.put_module(&bytes, vectors.as_deref()).await?;
        store.activate(name, &digest, "deny").await?;
        tracing::info!(policy = name, digest = %digest, "installed shipped policy");
    }
    Ok(())
}

/// Binds the gateway's listener and serves on a task until `shutdown`. Returns the bound
/// address (useful with port 0).
pub async fn spawn_gateway(
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, JoinHandle<anyhow::Result<()>>)> {
    let verifier = TokenVerifier::load(&config).await?;
    let nats = streams::connect(
        &config.nats_url,
        "hotpath-gateway",
        NatsUser::Gateway,
        config.nats_creds.as_deref(),
    )
    .await?;
    let databases = hotpath_gateway::Databases::connect(&config).await?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding the gateway to {}", config.listen))?;
    let addr = listener.local_addr()?;
    let limits = hotpath_gateway::ServerLimits::from_config(&config);
    let router =
        hotpath_gateway::router(config, verifier, databases, nats, shutdown.clone()).await?;
    let task = tokio::spawn(hotpath_gateway::serve(listener, router, limits, shutdown));
    Ok((addr, task))
}

/// Starts the delivery consumers on a task until `shutdown`.
pub async fn spawn_consumers(
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<JoinHandle<anyhow::Result<()>>> {
    let holdings = Holdings::for_config(&config);
    spawn_consumers_reporting(config, holdings, shutdown).await
}

/// Starts the delivery consumers on a task until `shutdown`, keeping `holdings` (made from
/// the same `config`) up to date with the partition leases they hold (what `/readyz` reports).
pub async fn spawn_consumers_reporting(
    config: Config,
    holdings: Holdings,
    shutdown: CancellationToken,
) -> anyhow::Result<JoinHandle<anyhow::Result<()>>> {
    let nats = streams::connect(
        &config.nats_url,
        "hotpath-consumers",
        NatsUser::Consumers,
        config.nats_creds.as_deref(),
    )
    .await?;
    let pool = db::connect(&config.database_url, config.db_max_connections).await?;
    Ok(tokio::spawn(async move {
        hotpath_consumers::run(&config, nats, pool, holdings, shutdown).await
    }))
}

/// Starts the push workers on a task until `shutdown`, with the senders the configuration
/// has credentials for (`senders`: tests pass their own).
pub async fn spawn_push(
    config: Config,
    senders: Option<hotpath_consumers::push::Senders>,
    shutdown: CancellationToken,
) -> anyhow::Result<JoinHandle<anyhow::Result<()>>> {
    let senders = match senders {
        Some(senders) => senders,
        None => hotpath_consumers::push::senders_from_config(&config)?,
    };
    let nats = streams::connect(
        &config.nats_url,
        "hotpath-push",
        NatsUser::Push,
        config.nats_creds.as_deref(),
    )
    .await?;
    let pool = db::connect(&config.database_url, config.db_max_connections).await?;
    Ok(tokio::spawn(async move {
        hotpath_consumers::push::worker::run(&config, nats, pool, senders, shutdown).await
    }))
}

/// Serves `/metrics`, `/healthz` for a process that has no gateway (`hotpath consumers`,
/// `hotpath push`), and `/readyz` from `holdings` when given (the consumers': 503 while the
/// process owns nothing by configuration or is still starting; see
/// [`hotpath_consumers::holdings`]).
pub async fn spawn_metrics_endpoint(
    listen: SocketAddr,
    holdings: Option<Holdings>,
    shutdown: CancellationToken,
) -> anyhow::Result<JoinHandle<anyhow::Result<()>>> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let mut router = axum::Router::new()
        .route(
            "/metrics",
            get(|| async { hotpath_core::telemetry::render() }),
        )
        .route("/healthz", get(|| async { "ok" }));
    if let Some(holdings) = holdings {
        router = router.route(
            "/readyz",
            get(move || async move {
                let readiness = holdings.readiness();
                let status = if readiness.ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                (status, axum::Json(readiness.body))
            }),
        );
    }
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding metrics to {listen}"))?;
    Ok(tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await?;
        Ok(())
    }))
}

/// Waits for SIGINT/SIGTERM, then cancels `shutdown` and waits for `role` to drain. A role
/// that ends by itself first is an error: the process exits non-zero instead of lingering
/// half alive (Kubernetes then restarts it).
pub async fn run_until_signal(
    name: &str,
    mut role: JoinHandle<anyhow::Result<()>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    tokio::select! {
        () = termination_signal() => {
            shutdown.cancel();
            role.await.with_context(|| format!("the {name} task died"))?
        }
        ended = &mut role => {
            shutdown.cancel();
            match ended {
                Ok(Ok(())) => anyhow::bail!("the {name} stopped unexpectedly"),
                Ok(Err(error)) => Err(error.context(format!("the {name} failed"))),
                Err(error) => Err(anyhow::Error::from(error).context(format!("the {name} task died"))),
            }
        }
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM (Kubernetes, `kill`).
pub async fn termination_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM; Ctrl-C still works");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
