//! Who a process is to NATS: its credentials and the inbox its replies come to.
//!
//! A production NATS (`nats/cluster/accounts.conf`, ADR 0009) lets nobody in anonymously: every
//! role connects as its own nkey user, and each user may publish and subscribe to what its role
//! needs and nothing else. `HOTPATH_NATS_CREDS` names the file with the process's credentials,
//! which comes in one of the two shapes NATS tools hand out:
//!
//! * an **nkey user seed** (`SU…`, one line): the server knows the user by the seed's public
//!   key (`U…`), which `accounts.conf` reads from the environment. The client signs the
//!   server's nonce with the seed, so the seed itself never crosses the network.
//! * a **`.creds` file** (a user JWT and its seed, as `nsc` writes them), for a NATS run in
//!   operator/JWT mode.
//!
//! The file is read at connect time and its content is never logged; the configuration
//! prints its path only.
//!
//! Replies (JetStream API answers, publish acknowledgements, fetched messages) come to the
//! client's inbox. With the default `_INBOX` prefix any user allowed to subscribe to
//! `_INBOX.>` could read every other client's replies, so each role has its own prefix
//! ([`NatsUser::inbox_prefix`]) and `accounts.conf` lets each role subscribe to its own only.

use std::path::Path;

use anyhow::Context as _;

/// The users of `nats/cluster/accounts.conf`, as far as a client needs to know: which inbox
/// prefix its permissions allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatsUser {
    /// `hotpath gateway`: publishes sends and receipts, reads the policy store and presence.
    Gateway,
    /// `hotpath consumers`: its durables on `MESSAGES` and `RECEIPTS`, and what it publishes.
    Consumers,
    /// `hotpath push`: the push durables on `PUSH`, and the DLQ.
    Push,
    /// `hotpath migrate`, `policy`, `dlq`, `replay`, `bench`, the `nats` CLI: everything.
    Operator,
}

impl NatsUser {
    /// The prefix of the client's reply subjects: the only inbox its user may subscribe to.
    /// The operator keeps NATS's default, which the `nats` CLI uses too.
    pub fn inbox_prefix(self) -> &'static str {
        match self {
            NatsUser::Gateway => "_INBOX_gateway",
            NatsUser::Consumers => "_INBOX_consumers",
            NatsUser::Push => "_INBOX_push",
            NatsUser::Operator => "_INBOX",
        }
    }
}

/// The first line of the JWT block of a `.creds` file.
const CREDS_JWT_MARKER: &str = "-----BEGIN NATS USER JWT-----";

/// What a credentials file holds.
#[derive(Debug, PartialEq, Eq)]
enum Credentials {
    /// An nkey user seed.
    Seed(String),
    /// A `.creds` file (JWT and seed); async-nats reads it itself.
    CredsFile,
}

/// Tells the two shapes apart. Errors never quote the content: it is a secret.
fn classify(content: &str) -> anyhow::Result<Credentials> {
    if content.contains(CREDS_JWT_MARKER) {
        return Ok(Credentials::CredsFile);
    }
    let seed = content.trim();
    anyhow::ensure!(
        seed.starts_with("SU") && !seed.contains(char::is_whitespace),
        "it holds neither an nkey user seed (one line starting with SU) nor a NATS .creds file"
    );
    let key_pair = nkeys::KeyPair::from_seed(seed)
        .map_err(|_| anyhow::anyhow!("it starts like an nkey user seed but is not a valid one"))?;
    anyhow::ensure!(
        key_pair.public_key().starts_with('U'),
        "its seed is not a user's"
    );
    Ok(Credentials::Seed(seed.to_string()))
}

/// `options` authenticating with the credentials in `path` (see the module doc).
pub async fn with_credentials(
    options: async_nats::ConnectOptions,
    path: &Path,
) -> anyhow::Result<async_nats::ConnectOptions> {
    let shown = path.display();
    let content = tokio::fs::read_to_string(path)
        .await
        .with_context(|| format!("reading the NATS credentials HOTPATH_NATS_CREDS={shown}"))?;
    let credentials =
        classify(&content).with_context(|| format!("HOTPATH_NATS_CREDS={shown} is unusable"))?;
    match credentials {
        Credentials::Seed(seed) => Ok(options.nkey(seed)),
        Credentials::CredsFile => options
            .credentials_file(path)
            .await
            .with_context(|| format!("reading the NATS .creds file {shown}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_seed_or_a_creds_file_is_accepted_and_nothing_else() {
        let user = nkeys::KeyPair::new_user();
        let seed = user.seed().unwrap();
        assert_eq!(
            classify(&format!("{seed}\n")).unwrap(),
            Credentials::Seed(seed.clone())
        );
        let creds = format!(
            "{CREDS_JWT_MARKER}\neyJ0eXAiOiJKV1QifQ\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        );
        assert_eq!(classify(&creds).unwrap(), Credentials::CredsFile);

        let account_seed = nkeys::KeyPair::new_account().seed().unwrap();
        let public_key = user.public_key();
        let broken = format!("SU{}", &seed[2..seed.len() - 1]);
        for bad in [
            account_seed.as_str(),
            public_key.as_str(),
            "",
            "password",
            broken.as_str(),
        ] {
            let error = classify(bad).unwrap_err().to_string();
            assert!(
                bad.is_empty() || !error.contains(bad),
                "the error quotes the file: {error}"
            );
        }
    }

    #[test]
    fn every_role_has_an_inbox_of_its_own() {
        let roles = [
            NatsUser::Gateway,
            NatsUser::Consumers,
            NatsUser::Push,
            NatsUser::Operator,
        ];
        let prefixes: std::collections::HashSet<_> =
            roles.iter().map(|r| r.inbox_prefix()).collect();
        assert_eq!(prefixes.len(), roles.len());
        // No role's inbox lies under another's (`_INBOX.>` does not cover `_INBOX_push.x`).
        for prefix in &prefixes {
            assert!(!prefix.contains('.'), "{prefix}");
        }
    }
}
