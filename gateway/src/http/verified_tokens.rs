//! Bearer tokens this gateway verified recently, so a client sending many requests with one
//! token pays for its signature once, not on every request.
//!
//! Verifying a token is the costliest step of authentication: an HMAC for HS256, an RSA or
//! ECDSA signature check (tens of microseconds) for the identity provider's tokens. Clients
//! send the same token for its whole lifetime, so the gateway keeps each valid one it has
//! verified, by its exact `Authorization` header value, for at most [`TRUST_FOR`], and never
//! past the token's own `exp` (with the configured leeway, as the verifier checks it). What is
//! kept is bounded in bytes ([`MAX_BYTES`]). Only valid tokens are kept: a refused one is
//! checked again every time.
//!
//! The price: a token is trusted for up to [`TRUST_FOR`] after it was last verified. The
//! claims it is checked against (`exp`, `nbf`, `iss`, `aud`, the subject's shape) cannot
//! change in that time except by expiring, which is checked on every use; a key removed from
//! the identity provider's key set stops verifying new tokens at once and ones already kept
//! within [`TRUST_FOR`].

use std::time::Duration;

use hotpath_core::auth::{TokenVerifier, Verified};
use hotpath_core::rejection::Rejection;
use moka::future::Cache;

/// Longest a verified token is trusted without its signature being checked again.
pub const TRUST_FOR: Duration = Duration::from_secs(60);

/// Bytes of verified tokens kept (header values and user ids).
const MAX_BYTES: u64 = 16 << 20;

/// Per kept token besides its header value and user id: the entry's own bookkeeping.
const ENTRY_OVERHEAD_BYTES: usize = 64;

#[derive(Clone)]
pub struct VerifiedTokens {
    kept: Cache<String, Verified>,
    leeway_secs: u64,
}

impl VerifiedTokens {
    /// `leeway_secs`: the clock skew the verifier forgives on `exp` (`HOTPATH_JWT_LEEWAY_SECS`).
    pub fn new(leeway_secs: u64) -> VerifiedTokens {
        VerifiedTokens {
            kept: Cache::builder()
                .max_capacity(MAX_BYTES)
                .weigher(|header: &String, verified: &Verified| {
                    let bytes = header.len() + verified.user_id.len() + ENTRY_OVERHEAD_BYTES;
                    u32::try_from(bytes).unwrap_or(u32::MAX)
                })
                .time_to_live(TRUST_FOR)
                .build(),
            leeway_secs,
        }
    }

    /// The user of an `Authorization` header value: from memory if this token was verified
    /// within [`TRUST_FOR`] and has not expired since, else verified by `verifier` (and kept
    /// when valid).
    pub async fn verify(
        &self,
        verifier: &TokenVerifier,
        header: Option<&str>,
    ) -> Result<Verified, Rejection> {
        self.verify_at(verifier, header, now_secs()).await
    }

    async fn verify_at(
        &self,
        verifier: &TokenVerifier,
        header: Option<&str>,
        now: u64,
    ) -> Result<Verified, Rejection> {
        let Some(header) = header else {
            return verifier.verify_bearer_or_refetch(None).await;
        };
        if let Some(kept) = self.kept.get(header).await {
            if now <= kept.expires_at.saturating_add(self.leeway_secs) {
                return Ok(kept);
            }
            self.kept.invalidate(header).await;
        }
        let verified = verifier.verify_bearer_or_refetch(Some(header)).await?;
        self.kept.insert(header.to_owned(), verified.clone()).await;
        Ok(verified)
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"a test secret of at least thirty-two bytes";

    fn bearer(user: &str) -> String {
        let token = hotpath_core::auth::mint_hs256_token(SECRET, user, 3600).expect("token");
        format!("Bearer {token}")
    }

    #[tokio::test]
    async fn a_valid_token_is_verified_once_and_then_answered_from_memory() {
        let tokens = VerifiedTokens::new(0);
        let header = bearer("alice");
        let verified = tokens
            .verify(&TokenVerifier::hs256(SECRET), Some(&header))
            .await
            .expect("valid");
        assert_eq!(verified.user_id, "alice");
        // A verifier that knows another key would refuse it: the answer comes from memory.
        let other = TokenVerifier::hs256(b"another secret, also thirty-two bytes long");
        assert!(other.verify_bearer(Some(&header)).is_err());
        let kept = tokens.verify(&other, Some(&header)).await.expect("kept");
        assert_eq!(kept, verified);
    }

    #[tokio::test]
    async fn a_kept_token_past_its_expiry_is_verified_again_and_refused() {
        let tokens = VerifiedTokens::new(30);
        let header = bearer("alice");
        let verifier = TokenVerifier::hs256(SECRET);
        let verified = tokens
            .verify(&verifier, Some(&header))
            .await
            .expect("valid");
        let other = TokenVerifier::hs256(b"another secret, also thirty-two bytes long");
        // Within the leeway after `exp` it is still trusted ...
        let at_the_edge = verified.expires_at + 30;
        assert!(
            tokens
                .verify_at(&other, Some(&header), at_the_edge)
                .await
                .is_ok()
        );
        // ... past it, it is checked again (and this verifier refuses it).
        let past = verified.expires_at + 31;
        assert!(tokens.verify_at(&other, Some(&header), past).await.is_err());
    }

    #[tokio::test]
    async fn a_refused_token_is_not_kept() {
        let tokens = VerifiedTokens::new(0);
        let header = bearer("alice");
        let other = TokenVerifier::hs256(b"another secret, also thirty-two bytes long");
        assert!(tokens.verify(&other, Some(&header)).await.is_err());
        assert!(tokens.verify(&other, Some(&header)).await.is_err());
        assert!(tokens.verify(&other, None).await.is_err());
    }
}
