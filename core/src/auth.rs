//! Bearer tokens. The sender of a message is always the token's subject, never a body field.
//!
//! Development uses an HS256 secret (`hotpath up` generates one into its data dir and
//! `hotpath token <user>` signs with it); production configures an RS256 or ES256 public key
//! so that only the identity provider can mint tokens.
//!
//! Every token must carry `sub` and `exp`; `exp` and, when present, `nbf` are checked with
//! `HOTPATH_JWT_LEEWAY_SECS` of tolerated clock skew; `iss` and `aud` are checked when
//! `HOTPATH_JWT_ISSUER` / `HOTPATH_JWT_AUDIENCE` are set (and then required). An HS256 secret
//! shorter than [`MIN_HS256_SECRET_BYTES`] is refused at start-up: an empty one is a key
//! anyone can sign with, a short one can be guessed offline from a single token.

mod jwks;

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::rejection::Rejection;

pub use jwks::{MIN_REFETCH, REFRESH_EVERY};

/// Longest accepted user id.
pub const MAX_USER_ID_LEN: usize = 128;

/// The shortest HS256 secret accepted: 256 bits, the size of the HMAC-SHA-256 output (RFC 7518
/// §3.2 requires a key at least that long).
pub const MIN_HS256_SECRET_BYTES: usize = 32;

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    pub iat: u64,
}

/// Checks bearer tokens against one key, or against the identity provider's key set.
pub struct TokenVerifier {
    keys: Keys,
    /// The claims checks, and the one algorithm of a single key (a key set's keys each bring
    /// their own).
    validation: Validation,
}

enum Keys {
    Single(DecodingKey),
    Set(Arc<jwks::Jwks>),
}

/// Why a token was not verified: refused outright, or signed by a key the cached set lacks.
enum Refusal {
    Rejected(Rejection),
    UnknownKey,
}

fn unauthorized(reason: &str) -> Rejection {
    Rejection::Unauthorized {
        reason: reason.to_string(),
    }
}

impl From<Refusal> for Rejection {
    fn from(refusal: Refusal) -> Rejection {
        match refusal {
            Refusal::Rejected(rejection) => rejection,
            Refusal::UnknownKey => unauthorized("invalid token: unknown signing key (kid)"),
        }
    }
}

impl TokenVerifier {
    /// The verifier the configuration asks for, in order of precedence: the identity provider's
    /// key set (`HOTPATH_JWT_JWKS_URL`, fetched now), a public key file, the HS256 secret.
    pub async fn load(config: &Config) -> anyhow::Result<TokenVerifier> {
        let Some(url) = &config.jwt_jwks_url else {
            return TokenVerifier::from_config(config);
        };
        let mut validation = validation(Algorithm::RS256);
        expect_claims(
            &mut validation,
            config.jwt_issuer.as_deref(),
            config.jwt_audience.as_deref(),
            config.jwt_leeway_secs,
        );
        Ok(TokenVerifier {
            keys: Keys::Set(jwks::Jwks::load(url).await?),
            validation,
        })
    }

    pub fn hs256(secret: &[u8]) -> TokenVerifier {
        TokenVerifier::new(DecodingKey::from_secret(secret), Algorithm::HS256)
    }

    /// An RS256 or ES256 verifier, chosen by the key found in the PEM.
    pub fn from_public_key_pem(pem: &[u8]) -> anyhow::Result<TokenVerifier> {
        if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            return Ok(TokenVerifier::new(key, Algorithm::RS256));
        }
        let key = DecodingKey::from_ec_pem(pem)
            .context("public key is neither an RSA nor an EC (P-256) PEM key")?;
        Ok(TokenVerifier::new(key, Algorithm::ES256))
    }

    /// A verifier from key material in the configuration: a public key file, else the HS256
    /// secret; with the issuer, audience and leeway it sets.
    pub fn from_config(config: &Config) -> anyhow::Result<TokenVerifier> {
        let verifier = match &config.jwt_public_key_file {
            Some(path) => {
                let pem = std::fs::read(path)
                    .with_context(|| format!("reading JWT public key {}", path.display()))?;
                TokenVerifier::from_public_key_pem(&pem)?
            }
            None => TokenVerifier::hs256(&hs256_secret(config)?),
        };
        Ok(verifier.expecting(
            config.jwt_issuer.as_deref(),
            config.jwt_audience.as_deref(),
            config.jwt_leeway_secs,
        ))
    }

    fn new(key: DecodingKey, algorithm: Algorithm) -> TokenVerifier {
        TokenVerifier {
            keys: Keys::Single(key),
            validation: validation(algorithm),
        }
    }

    /// Requires `iss` and `aud` to be these when given, and tolerates `leeway_secs` of clock
    /// skew on `exp` and `nbf`.
    pub fn expecting(
        mut self,
        issuer: Option<&str>,
        audience: Option<&str>,
        leeway_secs: u64,
    ) -> TokenVerifier {
        expect_claims(&mut self.validation, issuer, audience, leeway_secs);
        self
    }

    /// A valid `Authorization` header value's user id and expiry: what a WebSocket, which
    /// outlives the request that opened it, needs to know when to close.
    ///
    /// Never waits on the network. A token signed by a key the cached set lacks is refused,
    /// and the set is fetched again in the background (rate-limited), so a retry finds the
    /// provider's new key; [`TokenVerifier::verify_bearer_or_refetch`] waits for it instead.
    pub fn verify_bearer(&self, header: Option<&str>) -> Result<Verified, Rejection> {
        let refusal = match self.check(header) {
            Ok(verified) => return Ok(verified),
            Err(refusal) => refusal,
        };
        if let (Refusal::UnknownKey, Keys::Set(set)) = (&refusal, &self.keys)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let set = Arc::clone(set);
            runtime.spawn(async move { set.refetch_for_unknown_kid().await });
        }
        Err(refusal.into())
    }

    /// [`TokenVerifier::verify_bearer`], except that a token signed by a key the cached set
    /// lacks waits for the set to be fetched again (at most once per [`MIN_REFETCH`] across
    /// all requests) and is checked once more: the first token of a rotated key is accepted.
    /// Every other token is checked without waiting.
    pub async fn verify_bearer_or_refetch(
        &self,
        header: Option<&str>,
    ) -> Result<Verified, Rejection> {
        match (self.check(header), &self.keys) {
            (Err(Refusal::UnknownKey), Keys::Set(set)) => {
                set.refetch_for_unknown_kid().await;
                self.check(header).map_err(Rejection::from)
            }
            (checked, _) => checked.map_err(Rejection::from),
        }
    }

    fn check(&self, header: Option<&str>) -> Result<Verified, Refusal> {
        let rejected = |reason: &str| Refusal::Rejected(unauthorized(reason));
        let header = header.ok_or_else(|| rejected("missing bearer token"))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| rejected("authorization must be a bearer token"))?
            .trim();
        let invalid = |e: jsonwebtoken::errors::Error| rejected(&format!("invalid token: {e}"));
        let data = match &self.keys {
            Keys::Single(key) => jsonwebtoken::decode::<Claims>(token, key, &self.validation),
            Keys::Set(set) => {
                let header = jsonwebtoken::decode_header(token).map_err(invalid)?;
                let signing = set.get(header.kid.as_deref()).ok_or(Refusal::UnknownKey)?;
                let mut validation = self.validation.clone();
                validation.algorithms = vec![signing.algorithm];
                jsonwebtoken::decode::<Claims>(token, &signing.key, &validation)
            }
        }
        .map_err(invalid)?;
        if !is_valid_user_id(&data.claims.sub) {
            return Err(rejected("token subject is not a valid user id"));
        }
        Ok(Verified {
            user_id: data.claims.sub,
            expires_at: data.claims.exp,
        })
    }
}

/// What a valid token says: whose it is, and until when (its `exp`, Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub user_id: String,
    pub expires_at: u64,
}

/// What every token is checked against besides its signature: `exp` (required) and `nbf`
/// (when present), and `sub` present. `aud` is not checked until an audience is expected:
/// jsonwebtoken would otherwise refuse every token that names one.
fn validation(algorithm: Algorithm) -> Validation {
    let mut validation = Validation::new(algorithm);
    validation.set_required_spec_claims(&["exp", "sub"]);
    validation.validate_nbf = true;
    validation.validate_aud = false;
    validation.leeway = 30;
    validation
}

fn expect_claims(
    validation: &mut Validation,
    issuer: Option<&str>,
    audience: Option<&str>,
    leeway_secs: u64,
) {
    let mut required = vec!["exp", "sub"];
    if let Some(issuer) = issuer {
        validation.set_issuer(&[issuer]);
        required.push("iss");
    }
    if let Some(audience) = audience {
        validation.set_audience(&[audience]);
        validation.validate_aud = true;
        required.push("aud");
    }
    validation.set_required_spec_claims(&required);
    validation.leeway = leeway_secs;
}

/// The HS256 secret from the configuration: the value, else the file's contents; refused when
/// shorter than [`MIN_HS256_SECRET_BYTES`], naming the setting it came from.
pub fn hs256_secret(config: &Config) -> anyhow::Result<Vec<u8>> {
    if let Some(secret) = &config.jwt_secret {
        let secret = secret.as_bytes().to_vec();
        check_secret_length(&secret, "HOTPATH_JWT_SECRET")?;
        return Ok(secret);
    }
    let path = config.jwt_secret_file.as_deref().context(
        "no JWT key configured: set HOTPATH_JWT_SECRET, HOTPATH_JWT_SECRET_FILE or HOTPATH_JWT_PUBLIC_KEY_FILE",
    )?;
    read_secret_file(path).with_context(|| format!("HOTPATH_JWT_SECRET_FILE={}", path.display()))
}

/// The secret in `path` (surrounding whitespace trimmed), refused when too short.
pub fn read_secret_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    let secret = std::fs::read_to_string(path)
        .with_context(|| format!("reading JWT secret {}", path.display()))?;
    let secret = secret.trim().as_bytes().to_vec();
    check_secret_length(&secret, &path.display().to_string())?;
    Ok(secret)
}

fn check_secret_length(secret: &[u8], source: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !secret.is_empty(),
        "the HS256 secret from {source} is empty: anyone could sign tokens with it"
    );
    anyhow::ensure!(
        secret.len() >= MIN_HS256_SECRET_BYTES,
        "the HS256 secret from {source} is {} bytes; it must be at least {MIN_HS256_SECRET_BYTES} \
         (make one with `openssl rand -hex 32`)",
        secret.len()
    );
    Ok(())
}

/// A new random HS256 secret, hex encoded.
pub fn generate_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    hex::encode(bytes)
}

/// Signs a development token for `user_id`, valid for `ttl_secs`.
pub fn mint_hs256_token(secret: &[u8], user_id: &str, ttl_secs: u64) -> anyhow::Result<String> {
    anyhow::ensure!(is_valid_user_id(user_id), "invalid user id {user_id:?}");
    let now = jsonwebtoken::get_current_timestamp();
    let claims = Claims {
        sub: user_id.to_string(),
        iat: now,
        exp: now + ttl_secs,
    };
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )?)
}

/// User ids are opaque strings of 1–128 characters from `[A-Za-z0-9._@:-]`.
pub fn is_valid_user_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_USER_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._@:-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    impl TokenVerifier {
        fn user_of(&self, header: Option<&str>) -> Result<String, Rejection> {
            self.verify_bearer(header).map(|verified| verified.user_id)
        }
    }

    #[test]
    fn minted_tokens_verify_and_name_their_subject() {
        let token = mint_hs256_token(b"secret", "alice", 60).unwrap();
        let verifier = TokenVerifier::hs256(b"secret");
        assert_eq!(
            verifier.user_of(Some(&format!("Bearer {token}"))).unwrap(),
            "alice"
        );
    }

    #[test]
    fn a_verified_token_names_its_expiry() {
        let token = mint_hs256_token(b"secret", "alice", 60).unwrap();
        let verified = TokenVerifier::hs256(b"secret")
            .verify_bearer(Some(&format!("Bearer {token}")))
            .unwrap();
        let now = jsonwebtoken::get_current_timestamp();
        assert_eq!(verified.user_id, "alice");
        assert!((now + 59..=now + 60).contains(&verified.expires_at));
    }

    #[test]
    fn wrong_secret_missing_and_malformed_headers_are_unauthorized() {
        let token = mint_hs256_token(b"secret", "alice", 60).unwrap();
        let other = TokenVerifier::hs256(b"other");
        for header in [Some(format!("Bearer {token}")), None, Some(token.clone())] {
            let rejection = other.user_of(header.as_deref()).unwrap_err();
            assert_eq!(rejection.code(), "UNAUTHORIZED");
        }
    }

    /// A throwaway P-256 key pair, made for this test only.
    const ES256_PRIVATE: &str = include_str!("../tests/keys/es256-private.pem");
    const ES256_PUBLIC: &str = include_str!("../tests/keys/es256-public.pem");

    #[test]
    fn es256_tokens_verify_against_the_public_key_only() {
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            sub: "carol".into(),
            iat: now,
            exp: now + 60,
        };
        let key = EncodingKey::from_ec_pem(ES256_PRIVATE.as_bytes()).unwrap();
        let token = jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &key).unwrap();
        let verifier = TokenVerifier::from_public_key_pem(ES256_PUBLIC.as_bytes()).unwrap();
        assert_eq!(
            verifier.user_of(Some(&format!("Bearer {token}"))).unwrap(),
            "carol"
        );

        // An HS256 token signed with the public key's bytes must not pass (algorithm confusion).
        let forged = mint_hs256_token(ES256_PUBLIC.as_bytes(), "carol", 60).unwrap();
        assert!(verifier.user_of(Some(&format!("Bearer {forged}"))).is_err());
    }

    #[test]
    fn an_empty_or_short_hs256_secret_is_refused_naming_its_setting() {
        let mut config = Config::from_env().unwrap();
        config.jwt_public_key_file = None;
        config.jwt_secret_file = None;
        for short in ["", "test-secret", &"x".repeat(MIN_HS256_SECRET_BYTES - 1)] {
            config.jwt_secret = Some(short.to_string());
            let error = format!("{:#}", TokenVerifier::from_config(&config).err().unwrap());
            assert!(error.contains("HOTPATH_JWT_SECRET"), "{error}");
        }
        config.jwt_secret = Some("x".repeat(MIN_HS256_SECRET_BYTES));
        assert!(TokenVerifier::from_config(&config).is_ok());

        let dir = std::env::temp_dir().join(format!("hotpath-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("jwt-secret");
        std::fs::write(&file, "  short \n").unwrap();
        config.jwt_secret = None;
        config.jwt_secret_file = Some(file.clone());
        let error = format!("{:#}", TokenVerifier::from_config(&config).err().unwrap());
        assert!(error.contains("HOTPATH_JWT_SECRET_FILE"), "{error}");
        assert!(error.contains("5 bytes"), "{error}");
        std::fs::write(&file, format!("{}\n", generate_secret())).unwrap();
        assert!(TokenVerifier::from_config(&config).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    const SECRET: &[u8] = b"a-unit-test-secret-of-32-bytes-at-least";

    fn signed(claims: serde_json::Value) -> String {
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        format!("Bearer {token}")
    }

    #[test]
    fn issuer_audience_and_validity_window_are_checked() {
        let now = jsonwebtoken::get_current_timestamp();
        let verifier = TokenVerifier::hs256(SECRET).expecting(
            Some("https://idp.example"),
            Some("hotpath"),
            30,
        );
        let good = serde_json::json!({
            "sub": "alice", "iat": now, "exp": now + 60,
            "iss": "https://idp.example", "aud": ["other", "hotpath"],
        });
        assert_eq!(
            verifier.user_of(Some(&signed(good.clone()))).unwrap(),
            "alice"
        );

        let with = |field: &str, value: serde_json::Value| {
            let mut claims = good.clone();
            claims[field] = value;
            claims
        };
        let without = |field: &str| {
            let mut claims = good.clone();
            claims.as_object_mut().unwrap().remove(field);
            claims
        };
        let refused = [
            ("wrong issuer", with("iss", "https://evil.example".into())),
            ("no issuer", without("iss")),
            ("wrong audience", with("aud", "other".into())),
            ("no audience", without("aud")),
            ("expired beyond the leeway", with("exp", (now - 31).into())),
            (
                "not yet valid beyond the leeway",
                with("nbf", (now + 31).into()),
            ),
        ];
        for (case, claims) in refused {
            let rejection = verifier.user_of(Some(&signed(claims))).unwrap_err();
            assert_eq!(rejection.code(), "UNAUTHORIZED", "{case}");
        }
        // Within the leeway, a clock a little behind or ahead is forgiven.
        for claims in [
            with("exp", (now - 20).into()),
            with("nbf", (now + 20).into()),
        ] {
            assert!(verifier.user_of(Some(&signed(claims))).is_ok());
        }

        // Without an expected audience, a token naming one is still accepted.
        let plain = TokenVerifier::hs256(SECRET);
        assert!(plain.user_of(Some(&signed(good))).is_ok());
    }

    #[test]
    fn user_ids_are_checked() {
        assert!(is_valid_user_id("user_1@example.com"));
        assert!(!is_valid_user_id(""));
        assert!(!is_valid_user_id("a b"));
        assert!(!is_valid_user_id(&"x".repeat(129)));
    }
}
