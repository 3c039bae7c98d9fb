//! Authentication as an identity provider's tokens meet it: real signed tokens against a gateway
//! on real NATS and Postgres, checked for signature, issuer, audience and validity window, with
//! the keys from a key file or from a JWKS endpoint served here on loopback (keys made by the
//! `openssl` command for each run, key rotation included); and the HS256 secret refused at
//! start-up when it is too weak.

use hotpath_testkit as support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{Jwk, JwkSet};
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
    let conversation = conversation_with(&system, &es256_token(&claims("alice"))).await;

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

/// A private key made by `openssl genpkey` for this run, with its algorithm and key id.
struct IdpKey {
    kid: String,
    algorithm: Algorithm,
    key: EncodingKey,
}

impl IdpKey {
    fn generate(kid: &str, algorithm: Algorithm) -> IdpKey {
        let args: &[&str] = match algorithm {
            Algorithm::RS256 => &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
            Algorithm::ES256 => &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
            Algorithm::EdDSA => &["-algorithm", "ED25519"],
            other => panic!("no test key for {other:?}"),
        };
        let output = std::process::Command::new("openssl")
            .arg("genpkey")
            .args(args)
            .output()
            .expect("openssl runs");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let pem = output.stdout;
        let key = match algorithm {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
            Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
            _ => EncodingKey::from_ed_pem(&pem),
        }
        .expect("openssl's key loads");
        IdpKey {
            kid: kid.to_owned(),
            algorithm,
            key,
        }
    }

    /// The public half as the provider publishes it.
    fn jwk(&self) -> Jwk {
        let mut jwk = Jwk::from_encoding_key(&self.key, self.algorithm).expect("public JWK");
        jwk.common.key_id = Some(self.kid.clone());
        jwk
    }

    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.algorithm);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key).expect("token")
    }
}

/// A JWKS endpoint on loopback serving whatever set the test puts in it, counting its fetches.
struct Idp {
    url: String,
    keys: Arc<Mutex<JwkSet>>,
    fetches: Arc<AtomicUsize>,
}

impl Idp {
    async fn start(keys: &[&IdpKey]) -> Idp {
        let set = Arc::new(Mutex::new(JwkSet { keys: vec![] }));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (served, counted) = (Arc::clone(&set), Arc::clone(&fetches));
        let app = axum::Router::new().route(
            "/.well-known/jwks.json",
            axum::routing::get(move || {
                let (served, counted) = (Arc::clone(&served), Arc::clone(&counted));
                async move {
                    counted.fetch_add(1, Ordering::SeqCst);
                    let set = served.lock().expect("set").clone();
                    axum::Json(set)
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!(
            "http://{}/.well-known/jwks.json",
            listener.local_addr().expect("addr")
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        let idp = Idp {
            url,
            keys: set,
            fetches,
        };
        idp.publish(keys);
        idp
    }

    /// Replaces the published set: the provider rotates its keys.
    fn publish(&self, keys: &[&IdpKey]) {
        *self.keys.lock().expect("set") = JwkSet {
            keys: keys.iter().map(|key| key.jwk()).collect(),
        };
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

async fn system_behind(idp: &Idp) -> System {
    let url = idp.url.clone();
    System::start_with(move |config| {
        config.jwt_secret = None;
        config.jwt_jwks_url = Some(url);
        config.jwt_issuer = Some(ISSUER.into());
        config.jwt_audience = Some(AUDIENCE.into());
        config.jwt_leeway_secs = 5;
    })
    .await
}

async fn conversation_with(system: &System, token: &str) -> uuid::Uuid {
    let created = system
        .http
        .post(system.url("/v1/conversations"))
        .bearer_auth(token)
        .json(&json!({"type": "group", "members": ["bob"]}))
        .send()
        .await
        .expect("create");
    assert_eq!(created.status(), 201);
    let body: Value = created.json().await.expect("json");
    uuid::Uuid::parse_str(body["conversationId"].as_str().expect("id")).expect("uuid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_from_a_jwks_endpoint_are_verified_by_kid_algorithm_and_claims() {
    let rsa = IdpKey::generate("rsa-1", Algorithm::RS256);
    let ec = IdpKey::generate("ec-1", Algorithm::ES256);
    let ed = IdpKey::generate("ed-1", Algorithm::EdDSA);
    let idp = Idp::start(&[&rsa, &ec, &ed]).await;
    let system = system_behind(&idp).await;
    let conversation = conversation_with(&system, &rsa.sign(&claims("alice"))).await;

    for key in [&rsa, &ec, &ed] {
        let (status, ack) = send_with(&system, conversation, &key.sign(&claims("alice"))).await;
        assert_eq!(status, 202, "{:?}: {ack}", key.algorithm);
    }

    let with = |field: &str, value: Value| {
        let mut claims = claims("alice");
        claims[field] = value;
        claims
    };
    let stranger = IdpKey::generate("not-published", Algorithm::ES256);
    // The EC key's signature under the RSA key's kid: the kid's key allows RS256 only.
    let mut confused = Header::new(Algorithm::ES256);
    confused.kid = Some("rsa-1".into());
    let cases = [
        (
            "wrong issuer",
            rsa.sign(&with("iss", "https://evil.example".into())),
        ),
        (
            "wrong audience",
            ec.sign(&with("aud", "someone-else".into())),
        ),
        ("expired", ed.sign(&with("exp", (now() - 60).into()))),
        ("not yet valid", rsa.sign(&with("nbf", (now() + 60).into()))),
        ("unknown kid", stranger.sign(&claims("alice"))),
        (
            "an algorithm the key does not allow",
            jsonwebtoken::encode(&confused, &claims("alice"), &ec.key).expect("token"),
        ),
        ("HS256", system.token("alice")),
    ];
    for (case, token) in cases {
        assert_unauthorized(case, send_with(&system, conversation, &token).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_is_picked_up_without_a_restart_and_made_up_kids_cannot_flood_the_idp() {
    let old = IdpKey::generate("2026-old", Algorithm::RS256);
    let idp = Idp::start(&[&old]).await;
    let system = system_behind(&idp).await;
    let conversation = conversation_with(&system, &old.sign(&claims("alice"))).await;

    // The provider rotates: the new key replaces the old one in its set.
    let new = IdpKey::generate("2026-new", Algorithm::ES256);
    idp.publish(&[&new]);
    let token = new.sign(&claims("alice"));
    // Accepted once the gateway has fetched the set again, which an unknown kid prompts (at
    // most once every few seconds, so the first tries may still be refused).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = send_with(&system, conversation, &token).await;
        if status == 202 {
            break;
        }
        assert_unauthorized("the new key, before the refetch", (status, body));
        assert!(
            Instant::now() < deadline,
            "the rotated key was never picked up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The withdrawn key no longer verifies anything.
    assert_unauthorized(
        "the withdrawn key",
        send_with(&system, conversation, &old.sign(&claims("alice"))).await,
    );

    // Tokens with made-up kids: each is refused, and the provider is asked again at most
    // once per MIN_REFETCH however many arrive.
    let before = idp.fetches();
    let started = Instant::now();
    for n in 0..40 {
        let forged = IdpKey {
            kid: format!("made-up-{n}"),
            algorithm: Algorithm::ES256,
            key: EncodingKey::from_ec_pem(ES256_PRIVATE.as_bytes()).expect("key"),
        };
        assert_unauthorized(
            "a made-up kid",
            send_with(&system, conversation, &forged.sign(&claims("alice"))).await,
        );
    }
    let windows = started.elapsed().as_secs() / hotpath_core::auth::MIN_REFETCH.as_secs() + 1;
    let fetched = idp.fetches() - before;
    assert!(
        fetched as u64 <= windows,
        "{fetched} fetches for 40 made-up kids within {} windows",
        windows
    );
}
