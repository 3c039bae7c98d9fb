//! Who is asking: the [`AuthUser`] extractor.
//!
//! Every route but health, metrics and the WebSocket upgrade wants a bearer token in
//! `Authorization`, and the user is the token's subject, never a field of the body. Taking the
//! user as a handler argument makes that impossible to forget, and puts the check where axum
//! runs it: before the handler, in argument order. An extractor listed before `AuthUser`
//! (a `Path`, a `Query`) refuses a malformed request before the token is looked at; the body
//! ([`super::body::BoundedJson`]) always comes last, so an unauthenticated client never has its
//! body read.
//!
//! Routes that also spend a per-user budget before the body (sends, membership changes) wrap
//! `AuthUser` in an extractor of their own, so the budget is checked between the two. The
//! WebSocket upgrade accepts the token in `?token=` as well (`routes::ws`), since browsers cannot
//! set headers on it.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use super::ApiError;
use crate::state::AppState;

/// The authenticated user of a request: the subject of its bearer token, verified once per
/// [`super::verified_tokens::TRUST_FOR`] ([`super::VerifiedTokens`]). Waits on the network
/// only for a token signed by a key the identity provider's cached key set lacks (see
/// [`TokenVerifier::verify_bearer_or_refetch`]).
///
/// [`TokenVerifier::verify_bearer_or_refetch`]: hotpath_core::auth::TokenVerifier::verify_bearer_or_refetch
#[derive(Debug)]
pub struct AuthUser(pub String);

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let verified = state
            .verified_tokens
            .verify(&state.verifier, header)
            .await?;
        Ok(AuthUser(verified.user_id))
    }
}
