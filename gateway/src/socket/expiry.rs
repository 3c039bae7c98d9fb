//! A socket lives as long as its token.
//!
//! The token is checked once, at the upgrade, but a socket can stay open for days: without an
//! end, a token that expired (or whose user was signed out and no longer gets new ones) would
//! keep receiving forever. So each socket knows its token's `exp` and is closed at that moment
//! with **4001** "token expired", unless the client has handed over a newer token in a
//! `refresh` frame first. This is Centrifugo's connection expiry: there the connect reply
//! carries the seconds left and the client refreshes in time; here the gateway tells the
//! client itself, with a `token.expiring` frame `HOTPATH_WS_EXPIRY_NOTICE_SECS` before the
//! expiry (at once when less is left), so a client needs no timer of its own. A refresh must
//! be a valid token of the socket's own user; its `exp` replaces the old one (even when it is
//! sooner) and is confirmed with `refreshed`. A refused refresh changes nothing: the socket
//! still closes at the old expiry unless a good refresh follows.
//!
//! The expiry is measured on the gateway's clock, without the verifier's leeway: the leeway
//! forgives clock skew at one check, it does not lengthen a token's life.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::ws::Utf8Bytes;
use hotpath_core::auth::TokenVerifier;
use hotpath_core::rejection::Rejection;
use tokio::sync::{mpsc, watch};

use super::close::{CloseReason, Ending};
use super::protocol;

/// The expiry of a socket's token (its `exp`, Unix seconds), moved on by `refresh` frames.
pub struct TokenLifetime {
    expires_at: watch::Sender<u64>,
}

impl TokenLifetime {
    /// The lifetime of a socket opened with a token expiring at `expires_at`, and what
    /// [`enforce`] watches.
    pub fn new(expires_at: u64) -> (TokenLifetime, watch::Receiver<u64>) {
        let (sender, receiver) = watch::channel(expires_at);
        (TokenLifetime { expires_at: sender }, receiver)
    }

    /// Takes a `refresh` frame's token: valid and `user_id`'s, or refused. Returns the new
    /// expiry.
    pub fn refresh(
        &self,
        verifier: &TokenVerifier,
        user_id: &str,
        token: &str,
    ) -> Result<u64, Rejection> {
        let verified = verifier.verify_bearer(Some(&format!("Bearer {token}")))?;
        if verified.user_id != user_id {
            return Err(Rejection::Forbidden {
                reason: "the token names another user; a socket stays with the user who opened it"
                    .into(),
            });
        }
        self.expires_at.send_replace(verified.expires_at);
        Ok(verified.expires_at)
    }
}

/// Time left until `expires_at` (Unix seconds) on this machine's clock.
fn time_left(expires_at: u64) -> Duration {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Duration::from_secs(expires_at).saturating_sub(now)
}

/// Sends `token.expiring` when the expiry is `notice` away and ends the connection at the
/// expiry, following refreshes, until the connection ends otherwise.
pub async fn enforce(
    mut expires_at: watch::Receiver<u64>,
    notice: Duration,
    replies: mpsc::Sender<Utf8Bytes>,
    ending: Ending,
) {
    // The expiry the client was last told about: one notice per token.
    let mut noticed = None;
    loop {
        let expiry = *expires_at.borrow_and_update();
        let left = time_left(expiry);
        if left.is_zero() {
            ending.end(CloseReason::TokenExpired);
            return;
        }
        if left <= notice && noticed != Some(expiry) {
            noticed = Some(expiry);
            // A client busy reading a long sync may leave no room at once; the expiry
            // itself does not wait for it.
            tokio::select! {
                biased;
                () = ending.ended() => return,
                _ = replies.send(protocol::token_expiring(expiry)) => {}
                () = tokio::time::sleep(left) => {}
            }
            continue;
        }
        let wait = if left > notice { left - notice } else { left };
        tokio::select! {
            biased;
            () = ending.ended() => return,
            changed = expires_at.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hotpath_core::auth::mint_hs256_token;

    #[test]
    fn a_refresh_must_be_a_valid_token_of_the_same_user() {
        let verifier = TokenVerifier::hs256(b"secret");
        let (lifetime, expiry) = TokenLifetime::new(1);
        let bobs = mint_hs256_token(b"secret", "bob", 600).unwrap();
        let alices = mint_hs256_token(b"secret", "alice", 600).unwrap();

        let code = |token: &str| {
            lifetime
                .refresh(&verifier, "bob", token)
                .unwrap_err()
                .code()
        };
        assert_eq!(code(&alices), "FORBIDDEN");
        assert_eq!(code("not-a-token"), "UNAUTHORIZED");
        assert_eq!(*expiry.borrow(), 1, "a refused refresh changes nothing");

        let renewed = lifetime.refresh(&verifier, "bob", &bobs).unwrap();
        assert_eq!(*expiry.borrow(), renewed);
        assert!(time_left(renewed) > Duration::from_secs(590));
    }

    #[tokio::test]
    async fn an_expired_token_ends_the_connection_after_its_notice() {
        let (_lifetime, expiry) = TokenLifetime::new(1);
        let (replies, mut written) = mpsc::channel(4);
        let ending = Ending::default();
        enforce(expiry, Duration::from_secs(30), replies, ending.clone()).await;
        assert_eq!(ending.reason(), CloseReason::TokenExpired);
        assert!(
            written.try_recv().is_err(),
            "no notice for a token already expired"
        );
    }
}
