//! A stand-in for Firebase Cloud Messaging: a local HTTP server speaking FCM HTTP v1's wire
//! protocol, so tests run Hotpath's real FCM client (reqwest + gcp_auth) against it and script
//! what "Google" answers.
//!
//! It serves the two endpoints the client talks to:
//!
//! * `POST /token`, Google's OAuth token endpoint for service accounts: a JWT-bearer grant is
//!   exchanged for an access token. The assertion must be a JWT whose claims ask for FCM's scope
//!   and name this endpoint as audience, as Google requires; its signature is not checked (the
//!   key is the fixture's, handed out by [`FakeFcm::service_account_json`]).
//! * `POST /v1/projects/{project}/messages:send`: every request is recorded, a bearer token the
//!   token endpoint never issued is refused with 401, and every other request is answered from
//!   the script ([`FcmAnswer`]), with Google's error bodies, status codes and Retry-After.
//!
//! The server runs on the test's tokio runtime and stops when the [`FakeFcm`] is dropped or
//! [`FakeFcm::stop`]ped.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::FormRejection;
use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The OAuth scope a client needs to send through FCM HTTP v1.
pub const FCM_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";

/// The only grant a service account uses: a signed JWT exchanged for an access token.
const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// The `@type` of the FCM-specific entry in an error's `details`.
const FCM_ERROR_TYPE: &str = "type.googleapis.com/google.firebase.fcm.v1.FcmError";

/// A throwaway 2048-bit RSA key (PKCS#8 PEM), generated once for this fake server and used
/// nowhere else: it only signs the JWTs tests' clients send to [`FakeFcm`]'s token endpoint,
/// which never checks signatures. It is not, and never was, a Google credential.
const TEST_SERVICE_ACCOUNT_KEY: &str = include_str!("../fixtures/fcm-test-service-account.key");

/// What the fake answers one `messages:send` request.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum FcmAnswer {
    /// 200 with the new message's name; the default answer.
    #[default]
    Ok,
    /// An error in Google's shape: `{"error": {"code", "message", "status", "details"}}`, with
    /// an `FcmError` entry in `details` when `error_code` is given, and a `Retry-After` header
    /// when `retry_after_secs` is.
    Error {
        status: u16,
        /// The canonical status name, e.g. "UNAVAILABLE".
        status_text: &'static str,
        /// The `FcmError` `errorCode`, e.g. "UNREGISTERED".
        error_code: Option<&'static str>,
        retry_after_secs: Option<u64>,
    },
    /// Any other answer, its body sent verbatim (for shapes `Error` does not build, such as an
    /// `INVALID_ARGUMENT` that names the offending field).
    Raw {
        status: u16,
        body: Value,
        retry_after_secs: Option<u64>,
    },
}

impl FcmAnswer {
    /// 503 UNAVAILABLE: FCM is overloaded; retry with backoff.
    pub fn unavailable() -> FcmAnswer {
        FcmAnswer::error(503, "UNAVAILABLE", Some("UNAVAILABLE"))
    }

    /// 500 INTERNAL: an unknown error inside FCM; retry with backoff.
    pub fn internal() -> FcmAnswer {
        FcmAnswer::error(500, "INTERNAL", Some("INTERNAL"))
    }

    /// 404 NOT_FOUND / UNREGISTERED: the app was uninstalled or the token expired.
    pub fn unregistered() -> FcmAnswer {
        FcmAnswer::error(404, "NOT_FOUND", Some("UNREGISTERED"))
    }

    /// 400 INVALID_ARGUMENT naming `message.token`: the token is not an FCM registration token.
    pub fn invalid_token() -> FcmAnswer {
        let description = "The registration token is not a valid FCM registration token";
        FcmAnswer::Raw {
            status: 400,
            body: json!({
                "error": {
                    "code": 400,
                    "message": description,
                    "status": "INVALID_ARGUMENT",
                    "details": [
                        {"@type": FCM_ERROR_TYPE, "errorCode": "INVALID_ARGUMENT"},
                        {
                            "@type": "type.googleapis.com/google.rpc.BadRequest",
                            "fieldViolations": [
                                {"field": "message.token", "description": description}
                            ]
                        }
                    ]
                }
            }),
            retry_after_secs: None,
        }
    }

    /// This answer with a `Retry-After` header of `secs` seconds.
    pub fn with_retry_after(self, secs: u64) -> FcmAnswer {
        match self {
            FcmAnswer::Ok => FcmAnswer::Ok,
            FcmAnswer::Error {
                status,
                status_text,
                error_code,
                ..
            } => FcmAnswer::Error {
                status,
                status_text,
                error_code,
                retry_after_secs: Some(secs),
            },
            FcmAnswer::Raw { status, body, .. } => FcmAnswer::Raw {
                status,
                body,
                retry_after_secs: Some(secs),
            },
        }
    }

    fn error(
        status: u16,
        status_text: &'static str,
        error_code: Option<&'static str>,
    ) -> FcmAnswer {
        FcmAnswer::Error {
            status,
            status_text,
            error_code,
            retry_after_secs: None,
        }
    }

    /// The status and body this answer sends for `project`'s message number `number`.
    fn reply(&self, project: &str, number: u64) -> Reply {
        match self {
            FcmAnswer::Ok => Reply {
                status: 200,
                body: json!({"name": format!("projects/{project}/messages/{number}")}),
                retry_after_secs: None,
            },
            FcmAnswer::Error {
                status,
                status_text,
                error_code,
                retry_after_secs,
            } => Reply {
                status: *status,
                body: google_error(*status, status_text, *error_code),
                retry_after_secs: *retry_after_secs,
            },
            FcmAnswer::Raw {
                status,
                body,
                retry_after_secs,
            } => Reply {
                status: *status,
                body: body.clone(),
                retry_after_secs: *retry_after_secs,
            },
        }
    }
}

/// A Google API error body, with the message Google sends for each status.
fn google_error(status: u16, status_text: &str, error_code: Option<&str>) -> Value {
    let message = match status_text {
        "NOT_FOUND" => "Requested entity was not found.",
        "UNAVAILABLE" => "The service is currently unavailable.",
        "INTERNAL" => "Internal error encountered.",
        "INVALID_ARGUMENT" => "Request contains an invalid argument.",
        "RESOURCE_EXHAUSTED" => "Resource has been exhausted (e.g. check quota).",
        "PERMISSION_DENIED" => "The caller does not have permission",
        "UNAUTHENTICATED" => {
            "Request had invalid authentication credentials. Expected OAuth 2 access token, \
             login cookie or other valid authentication credential. See \
             https://developers.google.com/identity/sign-in/web/devconsole-project."
        }
        other => other,
    };
    let mut error = json!({"code": status, "message": message, "status": status_text});
    if let Some(code) = error_code {
        error["details"] = json!([{"@type": FCM_ERROR_TYPE, "errorCode": code}]);
    }
    json!({ "error": error })
}

/// One `messages:send` request as the fake received it.
#[derive(Debug, Clone)]
pub struct FcmRequest {
    pub at: Instant,
    pub project: String,
    /// The `Authorization: Bearer` token, if the request had one.
    pub bearer: Option<String>,
    /// `message.token` of the body.
    pub device_token: Option<String>,
    /// The JSON body; the raw text as a JSON string when it was not JSON.
    pub body: Value,
    pub answered_status: u16,
}

/// A fake FCM HTTP v1 server on a free loopback port.
pub struct FakeFcm {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    server: Option<JoinHandle<std::io::Result<()>>>,
}

impl FakeFcm {
    /// Starts the server on the current tokio runtime; it answers `Ok` until scripted otherwise.
    pub async fn start() -> FakeFcm {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("fake FCM binds a loopback port");
        let addr = listener.local_addr().expect("fake FCM's address");
        let shared = Arc::new(Shared {
            token_uri: format!("http://{addr}/token"),
            ledger: Mutex::new(Ledger::default()),
        });
        let app = Router::new()
            .route("/token", post(issue_token))
            .route("/v1/projects/{project}/messages:send", post(send_message))
            .with_state(shared.clone());
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown.clone().cancelled_owned())
                .into_future(),
        );
        FakeFcm {
            addr,
            shared,
            shutdown,
            server: Some(server),
        }
    }

    /// `http://127.0.0.1:<port>`: FCM's base URL for the client under test.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The OAuth token endpoint, `<base_url>/token`.
    pub fn token_uri(&self) -> String {
        self.shared.token_uri.clone()
    }

    /// A Google service-account JSON for `project_id` whose `token_uri` is this server's and
    /// whose key is the test fixture's.
    pub fn service_account_json(&self, project_id: &str) -> String {
        json!({
            "type": "service_account",
            "project_id": project_id,
            "private_key_id": "0123456789abcdef0123456789abcdef01234567",
            "private_key": TEST_SERVICE_ACCOUNT_KEY,
            "client_email": format!("hotpath-test@{project_id}.iam.gserviceaccount.com"),
            "client_id": "100000000000000000001",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.token_uri(),
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": format!(
                "https://www.googleapis.com/robot/v1/metadata/x509/hotpath-test%40{project_id}.iam.gserviceaccount.com"
            ),
            "universe_domain": "googleapis.com"
        })
        .to_string()
    }

    /// The next sends are answered with `answers`, in order, then with the default.
    pub fn script(&self, answers: Vec<FcmAnswer>) {
        self.shared.ledger().script = answers.into();
    }

    /// The next sends to `device_token` are answered with `answers`, in order, ahead of the
    /// shared script; once they are used up, that token's sends take the shared script's turn.
    pub fn script_for(&self, device_token: &str, answers: Vec<FcmAnswer>) {
        self.shared
            .ledger()
            .scripts_by_token
            .insert(device_token.to_string(), answers.into());
    }

    /// Every send from now on is answered with `answer`: the scripts are dropped.
    pub fn answer_always(&self, answer: FcmAnswer) {
        let mut ledger = self.shared.ledger();
        ledger.default = answer;
        ledger.script.clear();
        ledger.scripts_by_token.clear();
    }

    /// Every `messages:send` request so far, in arrival order.
    pub fn requests(&self) -> Vec<FcmRequest> {
        self.shared.ledger().requests.clone()
    }

    /// Requests to the token endpoint so far, granted or not.
    pub fn token_requests(&self) -> usize {
        self.shared.ledger().token_requests
    }

    /// The access tokens the token endpoint has issued, in order.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.shared.ledger().issued_tokens.clone()
    }

    /// Waits until at least `n` `messages:send` requests have arrived and returns them all;
    /// panics, listing what did arrive, if `within` passes first.
    pub async fn wait_for_requests(&self, n: usize, within: Duration) -> Vec<FcmRequest> {
        let deadline = Instant::now() + within;
        loop {
            let requests = self.requests();
            if requests.len() >= n {
                return requests;
            }
            if Instant::now() > deadline {
                let arrived: Vec<String> = requests
                    .iter()
                    .map(|r| {
                        format!(
                            "project {} token {:?} -> {}",
                            r.project, r.device_token, r.answered_status
                        )
                    })
                    .collect();
                panic!(
                    "fake FCM expected {n} send requests within {within:?}, got {}: {arrived:#?} \
                     ({} token requests)",
                    requests.len(),
                    self.token_requests()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the server: it accepts no more connections and closes the open ones once their
    /// request is answered. Returns when the port is closed.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        let Some(server) = self.server.take() else {
            return;
        };
        match tokio::time::timeout(Duration::from_secs(5), server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => panic!("fake FCM's server failed: {error}"),
            Ok(Err(error)) => panic!("fake FCM's server task failed: {error}"),
            Err(_) => panic!("fake FCM did not stop within 5 s"),
        }
    }
}

impl Drop for FakeFcm {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// What the handlers share with the test.
struct Shared {
    token_uri: String,
    ledger: Mutex<Ledger>,
}

impl Shared {
    /// The ledger; a test that panicked while holding it left it consistent (every update is
    /// one assignment or push), so a poisoned lock is used as it is.
    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Default)]
struct Ledger {
    script: VecDeque<FcmAnswer>,
    scripts_by_token: HashMap<String, VecDeque<FcmAnswer>>,
    /// What answers once the scripts are used up.
    default: FcmAnswer,
    requests: Vec<FcmRequest>,
    token_requests: usize,
    issued_tokens: Vec<String>,
    messages_sent: u64,
}

impl Ledger {
    fn next_answer(&mut self, device_token: Option<&str>) -> FcmAnswer {
        let for_token = device_token
            .and_then(|token| self.scripts_by_token.get_mut(token))
            .and_then(VecDeque::pop_front);
        for_token
            .or_else(|| self.script.pop_front())
            .unwrap_or_else(|| self.default.clone())
    }
}

/// A status, JSON body and optional Retry-After.
struct Reply {
    status: u16,
    body: Value,
    retry_after_secs: Option<u64>,
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, Json(self.body)).into_response();
        if let Some(secs) = self.retry_after_secs {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// `POST /token`: a JWT-bearer grant for FCM's scope, addressed to this endpoint, gets a new
/// access token; anything else gets Google's `invalid_grant`.
async fn issue_token(
    State(shared): State<Arc<Shared>>,
    form: Result<Form<HashMap<String, String>>, FormRejection>,
) -> Response {
    let verdict = match form {
        Ok(Form(form)) => check_grant(&form, &shared.token_uri),
        Err(rejection) => Err(rejection.body_text()),
    };
    let mut ledger = shared.ledger();
    ledger.token_requests += 1;
    match verdict {
        Ok(()) => {
            let access_token = format!("fake-access-token-{}", ledger.issued_tokens.len() + 1);
            ledger.issued_tokens.push(access_token.clone());
            Json(json!({
                "access_token": access_token,
                "expires_in": 3600,
                "token_type": "Bearer"
            }))
            .into_response()
        }
        Err(description) => (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_grant", "error_description": description})),
        )
            .into_response(),
    }
}

/// What Google checks of a service account's grant before looking at the signature.
fn check_grant(form: &HashMap<String, String>, token_uri: &str) -> Result<(), String> {
    if form.get("grant_type").map(String::as_str) != Some(JWT_BEARER_GRANT) {
        return Err(format!("grant_type must be {JWT_BEARER_GRANT}"));
    }
    let assertion = form.get("assertion").ok_or("no assertion")?;
    let parts: Vec<&str> = assertion.split('.').collect();
    let [_header, claims, _signature] = parts[..] else {
        return Err("the assertion is not a JWT (header.claims.signature)".to_string());
    };
    let claims: Value = base64url_decode(claims)
        .and_then(|json| serde_json::from_slice(&json).ok())
        .ok_or("the JWT's claims are not base64url-encoded JSON")?;
    let scope = claims["scope"].as_str().unwrap_or_default();
    if !scope.split(' ').any(|s| s == FCM_SCOPE) {
        return Err(format!("scope {scope:?} does not include {FCM_SCOPE}"));
    }
    if claims["aud"].as_str() != Some(token_uri) {
        return Err(format!("aud {} is not {token_uri}", claims["aud"]));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    if claims["exp"].as_i64().is_none_or(|exp| exp <= now) {
        return Err(format!("exp {} is not in the future", claims["exp"]));
    }
    Ok(())
}

/// Decodes base64url, padded or not (JWT libraries differ; Google takes both).
fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    let mut bytes = Vec::with_capacity(text.len() * 3 / 4);
    let mut bits: u32 = 0;
    let mut bit_count = 0;
    for c in text.trim_end_matches('=').bytes() {
        let value = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        bits = (bits << 6) | u32::from(value);
        bit_count += 6;
        if bit_count >= 8 {
            bit_count -= 8;
            bytes.push((bits >> bit_count) as u8);
        }
    }
    Some(bytes)
}

/// `POST /v1/projects/{project}/messages:send`: recorded, then refused with 401 if the bearer
/// token was never issued, 400 if the body is not JSON, and answered from the script otherwise.
async fn send_message(
    State(shared): State<Arc<Shared>>,
    Path(project): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let at = Instant::now();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::to_string);
    let json = serde_json::from_slice::<Value>(&body).ok();
    let device_token = json
        .as_ref()
        .and_then(|body| body["message"]["token"].as_str())
        .map(str::to_string);

    let mut ledger = shared.ledger();
    let authenticated = bearer
        .as_ref()
        .is_some_and(|bearer| ledger.issued_tokens.contains(bearer));
    let reply = if !authenticated {
        Reply {
            status: 401,
            body: google_error(401, "UNAUTHENTICATED", None),
            retry_after_secs: None,
        }
    } else if json.is_none() {
        Reply {
            status: 400,
            body: google_error(400, "INVALID_ARGUMENT", None),
            retry_after_secs: None,
        }
    } else {
        let answer = ledger.next_answer(device_token.as_deref());
        if matches!(answer, FcmAnswer::Ok) {
            ledger.messages_sent += 1;
        }
        answer.reply(&project, ledger.messages_sent)
    };
    ledger.requests.push(FcmRequest {
        at,
        project,
        bearer,
        device_token,
        body: json.unwrap_or_else(|| Value::String(String::from_utf8_lossy(&body).into_owned())),
        answered_status: reply.status,
    });
    reply.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use gcp_auth::{CustomServiceAccount, TokenProvider};

    async fn access_token(fake: &FakeFcm) -> String {
        hotpath_core::tls::install_crypto_provider();
        let account = CustomServiceAccount::from_json(&fake.service_account_json("demo"))
            .expect("the service account parses");
        let token = account
            .token(&[FCM_SCOPE])
            .await
            .expect("a token is granted");
        token.as_str().to_string()
    }

    fn http() -> reqwest::Client {
        hotpath_core::tls::install_crypto_provider();
        reqwest::Client::new()
    }

    async fn send(fake: &FakeFcm, bearer: &str, device_token: &str) -> reqwest::Response {
        http()
            .post(format!(
                "{}/v1/projects/demo/messages:send",
                fake.base_url()
            ))
            .bearer_auth(bearer)
            .json(&json!({"message": {"token": device_token, "notification": {"title": "hi"}}}))
            .send()
            .await
            .expect("the fake answers")
    }

    #[tokio::test]
    async fn gcp_auth_gets_a_token_and_sends_are_recorded_and_answered_per_script() {
        let fake = FakeFcm::start().await;
        let bearer = access_token(&fake).await;
        assert_eq!(bearer, "fake-access-token-1");
        assert_eq!(fake.token_requests(), 1);
        assert_eq!(fake.issued_tokens(), vec![bearer.clone()]);

        fake.script(vec![
            FcmAnswer::Ok,
            FcmAnswer::unavailable().with_retry_after(7),
        ]);
        let ok = send(&fake, &bearer, "device-a").await;
        assert_eq!(ok.status(), 200);
        let ok: Value = ok.json().await.expect("json");
        assert_eq!(ok, json!({"name": "projects/demo/messages/1"}));

        let unavailable = send(&fake, &bearer, "device-a").await;
        assert_eq!(unavailable.status(), 503);
        assert_eq!(unavailable.headers()[header::RETRY_AFTER], "7");
        let unavailable: Value = unavailable.json().await.expect("json");
        assert_eq!(unavailable["error"]["status"], "UNAVAILABLE");
        assert_eq!(unavailable["error"]["code"], 503);

        // The script is used up: the default answers.
        assert_eq!(send(&fake, &bearer, "device-b").await.status(), 200);

        let requests = fake.wait_for_requests(3, Duration::from_secs(5)).await;
        let statuses: Vec<u16> = requests.iter().map(|r| r.answered_status).collect();
        assert_eq!(statuses, vec![200, 503, 200]);
        assert!(requests[0].at <= requests[1].at && requests[1].at <= requests[2].at);
        assert_eq!(requests[0].project, "demo");
        assert_eq!(requests[0].bearer.as_deref(), Some(bearer.as_str()));
        assert_eq!(requests[2].device_token.as_deref(), Some("device-b"));
        assert_eq!(requests[0].body["message"]["notification"]["title"], "hi");
    }

    #[tokio::test]
    async fn a_token_the_fake_never_issued_is_refused_without_using_the_script() {
        let fake = FakeFcm::start().await;
        fake.script(vec![FcmAnswer::unregistered()]);

        let refused = send(&fake, "made-up", "device-a").await;
        assert_eq!(refused.status(), 401);
        let refused: Value = refused.json().await.expect("json");
        assert_eq!(refused["error"]["status"], "UNAUTHENTICATED");

        let bearer = access_token(&fake).await;
        let unregistered = send(&fake, &bearer, "device-a").await;
        assert_eq!(unregistered.status(), 404);
        let unregistered: Value = unregistered.json().await.expect("json");
        assert_eq!(
            unregistered,
            json!({"error": {
                "code": 404,
                "message": "Requested entity was not found.",
                "status": "NOT_FOUND",
                "details": [{
                    "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                    "errorCode": "UNREGISTERED"
                }]
            }})
        );
        let statuses: Vec<u16> = fake.requests().iter().map(|r| r.answered_status).collect();
        assert_eq!(statuses, vec![401, 404]);
    }

    #[tokio::test]
    async fn a_device_tokens_script_goes_before_the_shared_one() {
        let fake = FakeFcm::start().await;
        let bearer = access_token(&fake).await;
        fake.script(vec![FcmAnswer::internal()]);
        fake.script_for("stale", vec![FcmAnswer::invalid_token()]);

        let stale = send(&fake, &bearer, "stale").await;
        assert_eq!(stale.status(), 400);
        let stale: Value = stale.json().await.expect("json");
        assert_eq!(
            stale["error"]["details"][1]["fieldViolations"][0]["field"],
            "message.token"
        );
        assert_eq!(send(&fake, &bearer, "fresh").await.status(), 500);
        assert_eq!(send(&fake, &bearer, "stale").await.status(), 200);

        fake.answer_always(FcmAnswer::unavailable());
        assert_eq!(send(&fake, &bearer, "fresh").await.status(), 503);
        assert_eq!(send(&fake, &bearer, "fresh").await.status(), 503);
    }

    /// Posts a grant whose assertion is a JWT signed with the fixture key carrying `claims`.
    async fn grant(fake: &FakeFcm, grant_type: &str, claims: &Value) -> reqwest::Response {
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(TEST_SERVICE_ACCOUNT_KEY.as_bytes())
            .expect("the fixture key parses");
        let jwt = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
            claims,
            &key,
        )
        .expect("the JWT is signed");
        http()
            .post(fake.token_uri())
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(format!("grant_type={grant_type}&assertion={jwt}"))
            .send()
            .await
            .expect("the fake answers")
    }

    #[tokio::test]
    async fn the_token_endpoint_grants_only_fcms_scope_for_its_own_audience() {
        let fake = FakeFcm::start().await;
        let grant_type = "urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer";
        let exp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_secs()
            + 600;
        let claims = |scope: &str, aud: &str| {
            json!({"iss": "hotpath-test@demo.iam.gserviceaccount.com", "scope": scope,
                   "aud": aud, "exp": exp, "iat": exp - 600})
        };

        let wrong_scope = claims(
            "https://www.googleapis.com/auth/cloud-platform",
            &fake.token_uri(),
        );
        let wrong_aud = claims(FCM_SCOPE, "https://oauth2.googleapis.com/token");
        for refused in [
            grant(&fake, grant_type, &wrong_scope).await,
            grant(&fake, grant_type, &wrong_aud).await,
            grant(
                &fake,
                "client_credentials",
                &claims(FCM_SCOPE, &fake.token_uri()),
            )
            .await,
        ] {
            assert_eq!(refused.status(), 400);
            let body: Value = refused.json().await.expect("json");
            assert_eq!(body["error"], "invalid_grant");
        }

        let granted = grant(&fake, grant_type, &claims(FCM_SCOPE, &fake.token_uri())).await;
        assert_eq!(granted.status(), 200);
        let body: Value = granted.json().await.expect("json");
        assert_eq!(body["access_token"], "fake-access-token-1");
        assert_eq!(body["expires_in"], 3600);
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(fake.token_requests(), 4);
        assert_eq!(fake.issued_tokens(), vec!["fake-access-token-1"]);
    }

    #[tokio::test]
    async fn a_stopped_fake_refuses_connections() {
        let mut fake = FakeFcm::start().await;
        let bearer = access_token(&fake).await;
        assert_eq!(send(&fake, &bearer, "device-a").await.status(), 200);
        fake.stop().await;
        let refused = http()
            .post(format!(
                "{}/v1/projects/demo/messages:send",
                fake.base_url()
            ))
            .bearer_auth(&bearer)
            .json(&json!({"message": {"token": "device-a"}}))
            .send()
            .await;
        assert!(refused.is_err(), "a stopped fake still answered");
    }
}
