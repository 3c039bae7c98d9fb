//! What a role started with a least-privilege NATS user checks before it starts.
//!
//! Such a user may not create streams or buckets (docs/adr/0009-nats-accounts.md): `hotpath
//! migrate`, run with the operator's credentials, makes them, along with the schema and the
//! shipped policies. A role that started anyway would fail later, at its first publish or
//! lookup, with a permission error far from the cause; so it looks first, with its own user
//! (every look here is one its permissions allow), and refuses to start with one message that
//! says what is missing and what to run.

use anyhow::Context as _;
use async_nats::jetstream;
use hotpath_core::config::Config;
use hotpath_core::names::{
    DLQ_STREAM, MESSAGES_STREAM, PARTITION_LEASES_BUCKET, PRESENCE_BUCKET, PUSH_STREAM,
    RECEIPTS_STREAM, REPLAY_STREAM,
};
use hotpath_core::nats_auth::NatsUser;
use hotpath_core::policy_store::{CHAIN_BUCKET, MODULES_BUCKET, STATUS_BUCKET};
use hotpath_core::{db, streams};

/// What one role needs to exist in NATS.
struct Needs {
    streams: &'static [&'static str],
    buckets: &'static [&'static str],
    object_stores: &'static [&'static str],
}

fn needs(user: NatsUser) -> Needs {
    match user {
        NatsUser::Gateway => Needs {
            streams: &[MESSAGES_STREAM, RECEIPTS_STREAM],
            buckets: &[PRESENCE_BUCKET, CHAIN_BUCKET, STATUS_BUCKET],
            object_stores: &[MODULES_BUCKET],
        },
        NatsUser::Consumers => Needs {
            streams: &[
                MESSAGES_STREAM,
                REPLAY_STREAM,
                RECEIPTS_STREAM,
                PUSH_STREAM,
                DLQ_STREAM,
            ],
            buckets: &[PRESENCE_BUCKET, PARTITION_LEASES_BUCKET],
            object_stores: &[],
        },
        NatsUser::Push => Needs {
            streams: &[PUSH_STREAM, DLQ_STREAM],
            buckets: &[],
            object_stores: &[],
        },
        NatsUser::Operator => Needs {
            streams: &[],
            buckets: &[],
            object_stores: &[],
        },
    }
}

/// Checks, as `user`, that the streams and buckets its role uses exist (`MESSAGES` with the
/// configured partition count) and that the schema is migrated.
pub async fn check(config: &Config, user: NatsUser) -> anyhow::Result<()> {
    let nats = streams::connect(
        &config.nats_url,
        "hotpath-check",
        user,
        config.nats_creds.as_deref(),
    )
    .await?;
    let js = jetstream::new(nats);
    let needs = needs(user);
    let mut missing = Vec::new();
    for &name in needs.streams {
        match js.get_stream(name).await {
            Ok(stream) if name == MESSAGES_STREAM => check_partitions(&stream, config)?,
            Ok(_) => {}
            Err(_) => missing.push(format!("stream {name}")),
        }
    }
    for &bucket in needs.buckets {
        if js.get_key_value(bucket).await.is_err() {
            missing.push(format!("KV bucket {bucket}"));
        }
    }
    for &bucket in needs.object_stores {
        if js.get_object_store(bucket).await.is_err() {
            missing.push(format!("object store {bucket}"));
        }
    }
    anyhow::ensure!(
        missing.is_empty(),
        "NATS has no {} (or this process's NATS user may not see it): run `hotpath migrate` \
         with the operator's credentials first (HOTPATH_NATS_CREDS)",
        missing.join(", ")
    );
    let pool = db::connect(&config.database_url, 1).await?;
    let migrated = db::check_migrated(&pool).await;
    pool.close().await;
    migrated
}

/// The partition count is fixed when `MESSAGES` is created: a role configured for another
/// would route conversations to the wrong partitions.
fn check_partitions(stream: &jetstream::stream::Stream, config: &Config) -> anyhow::Result<()> {
    let recorded = streams::recorded_partitions(&stream.cached_info().config)
        .context("the MESSAGES stream records no partition count: run `hotpath migrate`")?;
    anyhow::ensure!(
        recorded == config.partitions,
        "the MESSAGES stream was created with {recorded} partitions but this process is \
         configured for {} (HOTPATH_PARTITIONS); the partition count is fixed at stream creation",
        config.partitions
    );
    Ok(())
}
