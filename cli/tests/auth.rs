//! Authentication as an identity provider's tokens meet it: real signed tokens against a gateway
//! on real NATS and Postgres, checked for signature, issuer, audience and validity window; and
//! the HS256 secret refused at start-up when it is too weak.

use hotpath_testkit as support;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use support::{System, text};

const ISSUER: &str = "https://idp.example";
const AUDIENCE: &str = "hotpath-api";

/// The throwaway P-256 key pair of core's unit tests.
const ES256_PRIVATE: &str = include_str!("../../core/tests/keys/es256-private.pem");
const ES256_PUBLIC: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../core/tests/keys/es256-public.pem"
);

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// Claims as the identity provider issues them for `user`, valid for the next minute.
fn claims(user: &str) -> Value {
    json!({"sub": user, "iss": ISSUER, "aud": AUDIENCE, "iat": now(), "exp": now() + 60})
}

fn es256_token(claims: &Value) -> String {
    let key = EncodingKey::from_ec_pem(ES256_PRIVATE.as_bytes()).expect("test key");
    jsonwebtoken::encode(&Header::new(Algorithm::ES256), claims, &key).expect("token")
}

/// Sends one message with `token` and returns the status and the body.
async fn send_with(system: &System, conversation: uuid::Uuid, token: &str) -> (u16, Value) {
    let response = system
        .http
        .post(system.url("/v1/messages"))
        .bearer_auth(token)
        .json(&text(conversation, "hi"))
        .send()
        .await
        .expect("request completes");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn assert_unauthorized(case: &str, (status, body): (u16, Value)) {
    assert_eq!(status, 401, "{case}: {body}");
    assert_eq!(body["error"]["code"], "UNAUTHORIZED", "{case}: {body}");
    assert!(body["error"]["message"].is_string(), "{case}: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_key_with_issuer_and_audience_accepts_only_the_identity_providers_tokens() {
    let system = System::start_with(|config| {
        config.jwt_secret = None;
        config.jwt_public_key_file = Some(ES256_PUBLIC.into());
        config.jwt_issuer = Some(ISSUER.into());
        config.jwt_audience = Some(AUDIENCE.into());
        config.jwt_leeway_secs = 5;
    })
    .await;
    // The harness's own helpers sign HS256 tokens, which this gateway refuses: make the
    // conversation with an ES256 token.
    let created = system
        .http
        .post(system.url("/v1/conversations"))
        .bearer_auth(es256_token(&claims("alice")))
        .json(&json!({"type": "group", "members": ["bob"]}))
        .send()
        .await
        .expect("create");
    assert_eq!(created.status(), 201);
    let conversation: Value = created.json().await.expect("json");
    let conversation =
        uuid::Uuid::parse_str(conversation["conversationId"].as_str().expect("id")).expect("uuid");

    let (status, ack) = send_with(&system, conversation, &es256_token(&claims("alice"))).await;
    assert_eq!(status, 202, "{ack}");

    let with = |field: &str, value: Value| {
        let mut claims = claims("alice");
        claims[field] = value;
        claims
    };
    let cases = [
        (
            "wrong issuer",
            es256_token(&with("iss", "https://evil.example".into())),
        ),
        (
            "wrong audience",
            es256_token(&with("aud", "someone-else".into())),
        ),
        ("expired", es256_token(&with("exp", (now() - 60).into()))),
        (
            "not yet valid",
            es256_token(&with("nbf", (now() + 60).into())),
        ),
        ("HS256, signed with the test secret", system.token("alice")),
        (
            "HS256, signed with the public key's bytes",
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &claims("alice"),
                &EncodingKey::from_secret(&std::fs::read(ES256_PUBLIC).expect("pem")),
            )
            .expect("token"),
        ),
    ];
    for (case, token) in cases {
        assert_unauthorized(case, send_with(&system, conversation, &token).await);
    }
    assert_eq!(
        system
            .wait_for_messages(1, std::time::Duration::from_secs(10))
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_refuses_to_start_with_an_empty_or_short_hs256_secret() {
    hotpath_core::tls::install_crypto_provider();
    let servers = support::Servers::start().await;
    for secret in ["", "test-secret", &"x".repeat(31)] {
        let mut config = support::test_config(&servers);
        config.jwt_secret = Some(secret.to_string());
        let error = hotpath::roles::spawn_gateway(config, Default::default())
            .await
            .err()
            .unwrap_or_else(|| panic!("a {}-byte secret is refused", secret.len()));
        let error = format!("{error:#}");
        assert!(error.contains("HOTPATH_JWT_SECRET"), "{error}");
    }
}

#[test]
fn hotpath_up_replaces_a_development_secret_the_gateway_would_refuse() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("jwt-secret");
    std::fs::write(&file, "short").expect("write");
    let path = hotpath::up::ensure_dev_secret(dir.path()).expect("secret");
    let replaced = hotpath_core::auth::read_secret_file(&path).expect("a usable secret");
    assert!(replaced.len() >= hotpath_core::auth::MIN_HS256_SECRET_BYTES);

    // A good one is kept, so the tokens minted with it keep working.
    let again = hotpath::up::ensure_dev_secret(dir.path()).expect("secret");
    assert_eq!(
        hotpath_core::auth::read_secret_file(&again).expect("secret"),
        replaced
    );
}
