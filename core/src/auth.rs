//! Bearer tokens. The sender of a message is always the token's subject, never a body field.
//!
//! Development uses an HS256 secret (`hotpath up` generates one into its data dir and
//! `hotpath token <user>` signs with it); production configures an RS256 or ES256 public key
//! so that only the identity provider can mint tokens.

use std::path::Path;

use anyhow::Context as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::rejection::Rejection;

/// Longest accepted user id.
pub const MAX_USER_ID_LEN: usize = 128;

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    pub iat: u64,
}

/// Checks bearer tokens against one key.
pub struct TokenVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl TokenVerifier {
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

    /// The verifier the configuration asks for: a public key file, else the HS256 secret.
    pub fn from_config(config: &Config) -> anyhow::Result<TokenVerifier> {
        if let Some(path) = &config.jwt_public_key_file {
            let pem = std::fs::read(path)
                .with_context(|| format!("reading JWT public key {}", path.display()))?;
            return TokenVerifier::from_public_key_pem(&pem);
        }
        Ok(TokenVerifier::hs256(&hs256_secret(config)?))
    }

    fn new(key: DecodingKey, algorithm: Algorithm) -> TokenVerifier {
        let mut validation = Validation::new(algorithm);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 30;
        TokenVerifier { key, validation }
    }

    /// The user id of a valid `Authorization` header value.
    pub fn verify_header(&self, header: Option<&str>) -> Result<String, Rejection> {
        self.verify_bearer(header).map(|verified| verified.user_id)
    }

    /// A valid `Authorization` header value's user id and expiry: what a WebSocket, which
    /// outlives the request that opened it, needs to know when to close.
    pub fn verify_bearer(&self, header: Option<&str>) -> Result<Verified, Rejection> {
        let unauthorized = |reason: &str| Rejection::Unauthorized {
            reason: reason.to_string(),
        };
        let header = header.ok_or_else(|| unauthorized("missing bearer token"))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| unauthorized("authorization must be a bearer token"))?;
        let data = jsonwebtoken::decode::<Claims>(token.trim(), &self.key, &self.validation)
            .map_err(|e| unauthorized(&format!("invalid token: {e}")))?;
        if !is_valid_user_id(&data.claims.sub) {
            return Err(unauthorized("token subject is not a valid user id"));
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

/// The HS256 secret from the configuration: the value, else the file's contents.
pub fn hs256_secret(config: &Config) -> anyhow::Result<Vec<u8>> {
    if let Some(secret) = &config.jwt_secret {
        return Ok(secret.as_bytes().to_vec());
    }
    let path = config.jwt_secret_file.as_deref().context(
        "no JWT key configured: set HOTPATH_JWT_SECRET, HOTPATH_JWT_SECRET_FILE or HOTPATH_JWT_PUBLIC_KEY_FILE",
    )?;
    read_secret_file(path)
}

pub fn read_secret_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    let secret = std::fs::read_to_string(path)
        .with_context(|| format!("reading JWT secret {}", path.display()))?;
    Ok(secret.trim().as_bytes().to_vec())
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

    #[test]
    fn minted_tokens_verify_and_name_their_subject() {
        let token = mint_hs256_token(b"secret", "alice", 60).unwrap();
        let verifier = TokenVerifier::hs256(b"secret");
        assert_eq!(
            verifier
                .verify_header(Some(&format!("Bearer {token}")))
                .unwrap(),
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
            let rejection = other.verify_header(header.as_deref()).unwrap_err();
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
            verifier
                .verify_header(Some(&format!("Bearer {token}")))
                .unwrap(),
            "carol"
        );

        // An HS256 token signed with the public key's bytes must not pass (algorithm confusion).
        let forged = mint_hs256_token(ES256_PUBLIC.as_bytes(), "carol", 60).unwrap();
        assert!(
            verifier
                .verify_header(Some(&format!("Bearer {forged}")))
                .is_err()
        );
    }

    #[test]
    fn user_ids_are_checked() {
        assert!(is_valid_user_id("user_1@example.com"));
        assert!(!is_valid_user_id(""));
        assert!(!is_valid_user_id("a b"));
        assert!(!is_valid_user_id(&"x".repeat(129)));
    }
}
