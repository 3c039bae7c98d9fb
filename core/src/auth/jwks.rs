//! The identity provider's signing keys, fetched from its JWKS URL and kept in memory.
//!
//! Verifying a token against the cached set is a hash lookup by the token's `kid` and a
//! signature check: no network on the hot path. The set is fetched again:
//!
//! * every [`REFRESH_EVERY`], so a key the provider withdrew stops being accepted;
//! * when a token names a `kid` the set does not have: the provider has rotated to a new key
//!   and published it. Such a fetch happens at most once per [`MIN_REFETCH`], whatever the
//!   tokens say, so a flood of made-up `kid`s cannot make the gateway hammer the provider;
//!   the requests that arrive meanwhile wait for the one fetch under way and then look again.
//!
//! A failed fetch keeps the keys already held (a provider outage does not log everyone out),
//! and is logged. Each key is accepted for one algorithm only: its `alg` when the set names
//! one, else the one its type implies (RSA → RS256, P-256 → ES256, P-384 → ES384,
//! Ed25519 → EdDSA); symmetric (`oct`) keys and keys marked for encryption are ignored, so a
//! token whose header asks for another algorithm than its key's is refused.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use anyhow::Context as _;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::time::Instant;

/// How often the set is fetched again in any case.
pub const REFRESH_EVERY: Duration = Duration::from_secs(300);

/// The least time between two fetches prompted by unknown `kid`s.
pub const MIN_REFETCH: Duration = Duration::from_secs(5);

/// How long one fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// One usable key of the set.
#[derive(Clone)]
pub(super) struct SigningKey {
    pub key: DecodingKey,
    pub algorithm: Algorithm,
}

/// The cached key set of one JWKS URL.
pub(super) struct Jwks {
    url: String,
    http: reqwest::Client,
    keys: RwLock<Arc<HashMap<String, SigningKey>>>,
    /// When the last fetch started; held across a fetch, so concurrent callers wait for it.
    last_fetch: tokio::sync::Mutex<Instant>,
}

impl Jwks {
    /// Fetches the set once (start-up fails if the provider cannot be reached or serves no
    /// usable key) and keeps it fresh on a background task while the set is in use.
    pub async fn load(url: &str) -> anyhow::Result<Arc<Jwks>> {
        let http = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .build()
            .context("building the JWKS client")?;
        let keys = fetch(&http, url)
            .await
            .with_context(|| format!("fetching HOTPATH_JWT_JWKS_URL={url}"))?;
        anyhow::ensure!(
            !keys.is_empty(),
            "HOTPATH_JWT_JWKS_URL={url} serves no RSA, EC or Ed25519 signing key"
        );
        tracing::info!(url, keys = keys.len(), "fetched the JWT signing keys");
        let jwks = Arc::new(Jwks {
            url: url.to_owned(),
            http,
            keys: RwLock::new(Arc::new(keys)),
            last_fetch: tokio::sync::Mutex::new(Instant::now()),
        });
        tokio::spawn(refresh_periodically(Arc::downgrade(&jwks)));
        Ok(jwks)
    }

    /// The key named `kid`, or the only key when the token names none.
    pub fn get(&self, kid: Option<&str>) -> Option<SigningKey> {
        let keys = self.keys.read().map(|keys| Arc::clone(&keys)).ok()?;
        match kid {
            Some(kid) => keys.get(kid).cloned(),
            None if keys.len() == 1 => keys.values().next().cloned(),
            None => None,
        }
    }

    /// Fetches the set again for a `kid` it lacks, unless a fetch started less than
    /// [`MIN_REFETCH`] ago (then waits for that one, if it is still running).
    pub async fn refetch_for_unknown_kid(&self) {
        let mut last_fetch = self.last_fetch.lock().await;
        if last_fetch.elapsed() < MIN_REFETCH {
            return;
        }
        *last_fetch = Instant::now();
        self.refresh().await;
    }

    async fn refresh(&self) {
        match fetch(&self.http, &self.url).await {
            Ok(keys) if !keys.is_empty() => {
                tracing::info!(url = %self.url, keys = keys.len(), "refreshed the JWT signing keys");
                if let Ok(mut held) = self.keys.write() {
                    *held = Arc::new(keys);
                }
            }
            Ok(_) => {
                tracing::warn!(url = %self.url, "the JWKS serves no usable key; keeping the old ones")
            }
            Err(error) => {
                tracing::warn!(url = %self.url, error = format!("{error:#}"), "JWKS fetch failed; keeping the old keys")
            }
        }
    }
}

/// Refreshes every [`REFRESH_EVERY`] until the set is no longer used.
async fn refresh_periodically(jwks: Weak<Jwks>) {
    loop {
        tokio::time::sleep(REFRESH_EVERY).await;
        let Some(jwks) = jwks.upgrade() else {
            return;
        };
        *jwks.last_fetch.lock().await = Instant::now();
        jwks.refresh().await;
    }
}

async fn fetch(http: &reqwest::Client, url: &str) -> anyhow::Result<HashMap<String, SigningKey>> {
    let set: JwkSet = http
        .get(url)
        .send()
        .await
        .context("requesting the key set")?
        .error_for_status()
        .context("the key set's URL answered")?
        .json()
        .await
        .context("the answer is not a JWK set")?;
    Ok(set
        .keys
        .iter()
        .enumerate()
        .filter_map(|(index, jwk)| {
            let key = signing_key(jwk)?;
            // A key without a kid can only be chosen as the set's only key.
            let kid = jwk
                .common
                .key_id
                .clone()
                .unwrap_or_else(|| format!("#{index}"));
            Some((kid, key))
        })
        .collect())
}

/// The key and its one algorithm, or `None` for a key that must not verify tokens.
fn signing_key(jwk: &Jwk) -> Option<SigningKey> {
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return None;
    }
    let implied = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => Algorithm::ES256,
            EllipticCurve::P384 => Algorithm::ES384,
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        _ => return None,
    };
    let algorithm = match jwk.common.key_algorithm {
        Some(named) => Algorithm::try_from(named).ok()?,
        None => implied,
    };
    if matches!(
        algorithm,
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
    ) {
        return None;
    }
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some(SigningKey { key, algorithm })
}
