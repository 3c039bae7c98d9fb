//! Firebase Cloud Messaging, through its HTTP v1 API.
//!
//! Each push is one `POST {base}/v1/projects/{project}/messages:send` with an OAuth access
//! token of the Firebase service account. `gcp_auth` signs the token request with the
//! account's key and caches the token until shortly before it expires, so the token endpoint
//! is asked about once an hour, not per push.
//!
//! Both addresses can be overridden (`HOTPATH_FCM_BASE_URL`, `HOTPATH_FCM_TOKEN_URI`), which
//! is how tests point the sender at a local fake. Google's answer is mapped to a
//! [`PushOutcome`] by [`classify`]: the error body's FCM `errorCode` decides where there is
//! one, then Google's status, then the HTTP status alone.

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use gcp_auth::{CustomServiceAccount, TokenProvider};
use hotpath_core::config::Config;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use serde::Deserialize;
use serde_json::Value;

use super::payload::{error_reason, fcm_message, reason_line, truncate};
use super::{Device, Notification, PushOutcome, PushSender};

/// The OAuth scope of sending through FCM.
const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// How much of an error body that is not Google's JSON (a proxy's page) goes into a reason.
const BODY_SNIPPET_CHARS: usize = 100;

/// Sends to FCM as one Firebase project's service account.
pub struct FcmSender {
    http: reqwest::Client,
    auth: CustomServiceAccount,
    send_url: String,
    /// Bounds getting an access token, as the HTTP client's timeout bounds a send.
    timeout: Duration,
}

impl FcmSender {
    /// The sender `config`'s FCM service account calls for; `None` when none is configured.
    pub fn from_config(config: &Config) -> anyhow::Result<Option<FcmSender>> {
        let json = match (&config.fcm_credentials_file, &config.fcm_credentials) {
            (None, None) => return Ok(None),
            (Some(path), None) => std::fs::read_to_string(path).with_context(|| {
                format!(
                    "HOTPATH_FCM_CREDENTIALS_FILE: cannot read {}",
                    path.display()
                )
            })?,
            (None, Some(json)) => json.clone(),
            (Some(_), Some(_)) => {
                bail!("FCM: set HOTPATH_FCM_CREDENTIALS_FILE or HOTPATH_FCM_CREDENTIALS, not both")
            }
        };
        let sender = FcmSender::new(
            &json,
            &config.fcm_base_url,
            config.fcm_token_uri.as_deref(),
            config.fcm_project_id.as_deref(),
            config.push_request_timeout(),
        )?;
        Ok(Some(sender))
    }

    /// A sender for the service account `service_account_json` (the JSON key file's text),
    /// sending to `base_url`, with the account's token endpoint and project replaced when
    /// `token_uri` or `project_id` is given. A request that takes longer than `timeout` fails.
    pub fn new(
        service_account_json: &str,
        base_url: &str,
        token_uri: Option<&str>,
        project_id: Option<&str>,
        timeout: Duration,
    ) -> anyhow::Result<FcmSender> {
        let (json, project) = service_account(service_account_json, token_uri, project_id)?;
        let account = CustomServiceAccount::from_json(&json)
            .map_err(|e| anyhow!("FCM service account is not usable: {e}"))?;
        let send_url = send_url(base_url, &project);
        reqwest::Url::parse(&send_url)
            .with_context(|| format!("HOTPATH_FCM_BASE_URL {base_url:?} does not make a URL"))?;
        // reqwest is built without a TLS provider of its own: it panics unless one is installed.
        hotpath_core::tls::install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .context("building the FCM HTTP client")?;
        Ok(FcmSender {
            http,
            auth: account,
            send_url,
            timeout,
        })
    }

    async fn send_one(&self, device: &Device, n: &Notification) -> PushOutcome {
        let token = match tokio::time::timeout(self.timeout, self.auth.token(&[SCOPE])).await {
            Ok(Ok(token)) => token,
            Ok(Err(e)) => {
                return PushOutcome::Auth {
                    reason: error_reason("fcm oauth", &e),
                };
            }
            Err(_) => {
                return PushOutcome::Retry {
                    reason: format!("fcm oauth: no token within {:?}", self.timeout),
                    retry_after: None,
                };
            }
        };
        let request = self
            .http
            .post(&self.send_url)
            .bearer_auth(token.as_str())
            .json(&fcm_message(device, n));
        // Timeouts, refused connections, resets: the request may be tried again as it is.
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) => {
                return PushOutcome::Retry {
                    reason: error_reason("fcm", &e),
                    retry_after: None,
                };
            }
        };
        let status = response.status();
        if status.is_success() {
            return PushOutcome::Sent;
        }
        let retry_after = retry_after(response.headers(), Utc::now());
        // The status alone still says enough when the body cannot be read.
        let body = response.bytes().await.unwrap_or_default();
        classify(status.as_u16(), retry_after, &body)
    }
}

impl PushSender for FcmSender {
    fn send<'a>(
        &'a self,
        device: &'a Device,
        notification: &'a Notification,
    ) -> BoxFuture<'a, PushOutcome> {
        Box::pin(self.send_one(device, notification))
    }
}

/// The service account JSON with `token_uri` replaced when given, and the project to send
/// as: `project_id` when given, else the account's.
fn service_account(
    json: &str,
    token_uri: Option<&str>,
    project_id: Option<&str>,
) -> anyhow::Result<(String, String)> {
    // Parse errors name a position, never the text: the JSON holds a private key.
    let mut account: Value =
        serde_json::from_str(json).map_err(|e| anyhow!("FCM service account is not JSON: {e}"))?;
    let Some(fields) = account.as_object_mut() else {
        bail!("FCM service account is not a JSON object");
    };
    if let Some(token_uri) = token_uri {
        fields.insert("token_uri".into(), Value::from(token_uri));
    }
    let project = project_id
        .or_else(|| fields.get("project_id").and_then(Value::as_str))
        .unwrap_or_default()
        .to_string();
    if project.is_empty() {
        bail!(
            "FCM: no project: set HOTPATH_FCM_PROJECT_ID or use a service account with project_id"
        );
    }
    let path_safe = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':');
    if !project.chars().all(path_safe) {
        bail!("FCM: project id {project:?} is not a Google Cloud project id");
    }
    Ok((account.to_string(), project))
}

/// Where pushes to `project` are posted.
fn send_url(base_url: &str, project: &str) -> String {
    format!(
        "{}/v1/projects/{project}/messages:send",
        base_url.trim_end_matches('/')
    )
}

/// The `Retry-After` of a response, when it has a usable one.
pub fn retry_after(headers: &HeaderMap, now: DateTime<Utc>) -> Option<Duration> {
    parse_retry_after(headers.get(RETRY_AFTER)?.to_str().ok()?, now)
}

/// A `Retry-After` value: seconds, or an HTTP date (a date already past asks for nothing).
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = DateTime::parse_from_rfc2822(value).ok()?;
    (at.with_timezone(&Utc) - now).to_std().ok()
}

/// Google's error body: `{"error": {"code", "message", "status", "details": [...]}}`.
#[derive(Deserialize)]
struct ErrorResponse {
    error: GoogleError,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct GoogleError {
    message: String,
    /// The canonical code, such as `NOT_FOUND` or `INVALID_ARGUMENT`.
    status: String,
    details: Vec<ErrorDetail>,
}

/// One entry of `details`: an `FcmError` carries `errorCode`, a `BadRequest` carries
/// `fieldViolations`; other kinds carry neither.
#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct ErrorDetail {
    error_code: Option<String>,
    field_violations: Vec<FieldViolation>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct FieldViolation {
    field: String,
}

impl GoogleError {
    fn fcm_error_code(&self) -> Option<&str> {
        self.details
            .iter()
            .find_map(|detail| detail.error_code.as_deref())
    }

    /// Whether the request was refused for its registration token (as opposed to, say, a
    /// payload FCM does not accept).
    fn blames_the_token(&self) -> bool {
        let token_field = self
            .details
            .iter()
            .flat_map(|detail| &detail.field_violations)
            .any(|violation| violation.field == "message.token");
        token_field || self.message.to_lowercase().contains("registration token")
    }
}

/// What FCM's non-2xx answer means for this push: `status`, its `Retry-After` and `body`.
pub fn classify(status: u16, retry_after: Option<Duration>, body: &[u8]) -> PushOutcome {
    let Ok(ErrorResponse { error }) = serde_json::from_slice::<ErrorResponse>(body) else {
        return classify_status(status, retry_after, unparsed_reason(status, body));
    };
    let fcm_code = error.fcm_error_code();
    let google_status = Some(error.status.as_str()).filter(|s| !s.is_empty());
    let reason = match fcm_code.or(google_status) {
        Some(code) => reason_line(&format!("fcm {status} {code}: {}", error.message)),
        None => reason_line(&format!("fcm {status}: {}", error.message)),
    };

    // FCM's own code is the most precise.
    match fcm_code {
        Some("UNREGISTERED") => return PushOutcome::InvalidToken { reason },
        // The token was issued to another Firebase project. That is one stray token, or this
        // deployment's credentials are the wrong project's, in which case every token would
        // say so: never delete devices on it, set the task aside where an operator sees it.
        Some("SENDER_ID_MISMATCH") => return PushOutcome::Rejected { reason },
        // Google could not use our APNs or web-push credentials on our behalf.
        Some("THIRD_PARTY_AUTH_ERROR") => return PushOutcome::Auth { reason },
        Some("QUOTA_EXCEEDED" | "UNAVAILABLE" | "INTERNAL") => {
            return PushOutcome::Retry {
                reason,
                retry_after,
            };
        }
        _ => {}
    }
    // A request FCM refuses is the token's fault only when FCM says so.
    let invalid_argument = status == 400
        || fcm_code == Some("INVALID_ARGUMENT")
        || google_status == Some("INVALID_ARGUMENT");
    if invalid_argument {
        return if error.blames_the_token() {
            PushOutcome::InvalidToken { reason }
        } else {
            PushOutcome::Rejected { reason }
        };
    }
    match google_status {
        Some("UNAUTHENTICATED" | "PERMISSION_DENIED") => PushOutcome::Auth { reason },
        Some("RESOURCE_EXHAUSTED" | "UNAVAILABLE" | "INTERNAL") => PushOutcome::Retry {
            reason,
            retry_after,
        },
        _ => classify_status(status, retry_after, reason),
    }
}

/// An answer without Google's error body: the status is all there is to go on. A bare 404
/// is a wrong URL or project, not an unregistered token: FCM names those.
fn classify_status(status: u16, retry_after: Option<Duration>, reason: String) -> PushOutcome {
    match status {
        401 | 403 => PushOutcome::Auth { reason },
        429 | 500..=599 => PushOutcome::Retry {
            reason,
            retry_after,
        },
        _ => PushOutcome::Rejected { reason },
    }
}

fn unparsed_reason(status: u16, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let snippet = truncate(text.trim(), BODY_SNIPPET_CHARS);
    if snippet.is_empty() {
        format!("fcm {status}")
    } else {
        reason_line(&format!("fcm {status}: {snippet}"))
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use serde_json::json;

    use super::*;

    fn google_error(code: u16, status: &str, message: &str, details: Value) -> Vec<u8> {
        json!({ "error": { "code": code, "message": message, "status": status, "details": details } })
            .to_string()
            .into_bytes()
    }

    fn fcm_error(code: &str) -> Value {
        json!({ "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code })
    }

    fn label(outcome: &PushOutcome) -> &'static str {
        outcome.failure_label().unwrap_or("sent")
    }

    #[test]
    fn unregistered_token_is_invalid_with_googles_words_as_reason() {
        let body = google_error(
            404,
            "NOT_FOUND",
            "Requested entity was not found.",
            json!([fcm_error("UNREGISTERED")]),
        );
        assert_eq!(
            classify(404, None, &body),
            PushOutcome::InvalidToken {
                reason: "fcm 404 UNREGISTERED: Requested entity was not found.".into()
            }
        );
    }

    #[test]
    fn google_answers_map_to_outcomes() {
        let token_field = json!([
            fcm_error("INVALID_ARGUMENT"),
            {
                "@type": "type.googleapis.com/google.rpc.BadRequest",
                "fieldViolations": [{ "field": "message.token", "description": "Invalid registration token" }]
            }
        ]);
        let table = [
            (
                403,
                "PERMISSION_DENIED",
                "SenderId mismatch",
                json!([fcm_error("SENDER_ID_MISMATCH")]),
                "rejected",
            ),
            (
                400,
                "INVALID_ARGUMENT",
                "Invalid value",
                token_field,
                "invalid_token",
            ),
            (
                400,
                "INVALID_ARGUMENT",
                "The registration token is not a valid FCM registration token",
                json!([fcm_error("INVALID_ARGUMENT")]),
                "invalid_token",
            ),
            (
                400,
                "INVALID_ARGUMENT",
                "The registration token is not a valid FCM registration token",
                json!([]),
                "invalid_token",
            ),
            (
                400,
                "INVALID_ARGUMENT",
                "Invalid value at 'message.android.ttl'",
                json!([fcm_error("INVALID_ARGUMENT")]),
                "rejected",
            ),
            (
                400,
                "INVALID_ARGUMENT",
                "Request contains an invalid argument.",
                json!([]),
                "rejected",
            ),
            (
                401,
                "UNAUTHENTICATED",
                "Request had invalid authentication credentials.",
                json!([]),
                "auth",
            ),
            (
                401,
                "UNAUTHENTICATED",
                "Auth error from APNS or Web Push Service",
                json!([fcm_error("THIRD_PARTY_AUTH_ERROR")]),
                "auth",
            ),
            (
                403,
                "PERMISSION_DENIED",
                "Permission denied",
                json!([]),
                "auth",
            ),
            (
                429,
                "RESOURCE_EXHAUSTED",
                "Quota exceeded",
                json!([fcm_error("QUOTA_EXCEEDED")]),
                "unavailable",
            ),
            (
                500,
                "INTERNAL",
                "Internal error",
                json!([fcm_error("INTERNAL")]),
                "unavailable",
            ),
            (
                503,
                "UNAVAILABLE",
                "The service is unavailable",
                json!([fcm_error("UNAVAILABLE")]),
                "unavailable",
            ),
            (502, "", "", json!([]), "unavailable"),
            // A 404 without UNREGISTERED is a wrong project or URL: no device is to blame.
            (
                404,
                "NOT_FOUND",
                "Requested entity was not found.",
                json!([]),
                "rejected",
            ),
            (413, "", "payload too large", json!([]), "rejected"),
        ];
        for (code, status, message, details, expected) in table {
            let outcome = classify(code, None, &google_error(code, status, message, details));
            assert_eq!(
                label(&outcome),
                expected,
                "{code} {status} {message}: {outcome:?}"
            );
        }
    }

    #[test]
    fn retries_keep_the_providers_retry_after() {
        let wait = Some(Duration::from_secs(17));
        let quota = google_error(
            429,
            "RESOURCE_EXHAUSTED",
            "Quota",
            json!([fcm_error("QUOTA_EXCEEDED")]),
        );
        for (status, body) in [
            (429, quota),
            (503, b"<html>down</html>".to_vec()),
            (500, Vec::new()),
        ] {
            match classify(status, wait, &body) {
                PushOutcome::Retry { retry_after, .. } => assert_eq!(retry_after, wait, "{status}"),
                other => panic!("{status}: {other:?}"),
            }
        }
    }

    #[test]
    fn unparseable_bodies_fall_back_on_the_status() {
        let table = [
            (401, "auth"),
            (403, "auth"),
            (404, "rejected"),
            (400, "rejected"),
            (429, "unavailable"),
            (503, "unavailable"),
        ];
        for (status, expected) in table {
            let outcome = classify(status, None, b"<html>\n<body>Error</body>\n</html>");
            assert_eq!(label(&outcome), expected, "{status}");
            assert_eq!(
                outcome.reason(),
                format!("fcm {status}: <html> <body>Error</body> </html>")
            );
        }
        assert_eq!(classify(502, None, b"").reason(), "fcm 502");
    }

    #[test]
    fn reasons_are_one_short_line() {
        let message = format!("first line\nsecond line {}", "z".repeat(1000));
        let body = google_error(400, "INVALID_ARGUMENT", &message, json!([]));
        let reason = classify(400, None, &body).reason().to_string();
        assert!(
            reason.starts_with("fcm 400 INVALID_ARGUMENT: first line second line"),
            "{reason}"
        );
        assert!(reason.chars().count() <= 300);
        assert!(!reason.contains('\n'));
    }

    #[test]
    fn retry_after_is_read_as_seconds_or_a_date() {
        let now = DateTime::parse_from_rfc2822("Wed, 21 Oct 2015 07:28:00 GMT")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:29:30 GMT", now),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            None
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);

        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers, now), None);
        headers.insert(RETRY_AFTER, "30".parse().unwrap());
        assert_eq!(retry_after(&headers, now), Some(Duration::from_secs(30)));
    }

    /// A service account JSON as Google issues it, with a fresh RSA key.
    fn account_json(project_id: Option<&str>) -> String {
        let output = Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ])
            .output()
            .expect("openssl runs");
        assert!(output.status.success(), "openssl genpkey failed");
        let mut account = json!({
            "type": "service_account",
            "private_key_id": "0123456789abcdef",
            "private_key": String::from_utf8(output.stdout).unwrap(),
            "client_email": "pusher@example-project.iam.gserviceaccount.com",
            "client_id": "1234567890",
            "token_uri": "https://oauth2.googleapis.com/token",
        });
        if let Some(project_id) = project_id {
            account["project_id"] = json!(project_id);
        }
        account.to_string()
    }

    #[test]
    fn token_uri_and_project_can_be_overridden() {
        let original = json!({
            "project_id": "from-json",
            "token_uri": "https://oauth2.googleapis.com/token",
            "private_key": "KEY",
        })
        .to_string();
        let (json, project) = service_account(
            &original,
            Some("http://127.0.0.1:9/token"),
            Some("other-project"),
        )
        .unwrap();
        let rewritten: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(rewritten["token_uri"], "http://127.0.0.1:9/token");
        assert_eq!(rewritten["private_key"], "KEY");
        assert_eq!(project, "other-project");

        let (json, project) = service_account(&original, None, None).unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&json).unwrap(),
            serde_json::from_str::<Value>(&original).unwrap()
        );
        assert_eq!(project, "from-json");
    }

    #[test]
    fn a_project_is_required_and_must_be_an_id() {
        let no_project = json!({ "private_key": "KEY" }).to_string();
        let error = service_account(&no_project, None, None)
            .unwrap_err()
            .to_string();
        assert!(error.contains("HOTPATH_FCM_PROJECT_ID"), "{error}");
        assert!(service_account(&no_project, None, Some("a/b")).is_err());
    }

    #[test]
    fn credentials_that_are_not_json_are_refused_without_echoing_them() {
        let error = service_account("{\"private_key\": \"very-secret", None, None)
            .unwrap_err()
            .to_string();
        assert!(!error.contains("very-secret"), "{error}");
    }

    #[test]
    fn sender_posts_to_the_projects_send_url() {
        let sender = FcmSender::new(
            &account_json(Some("from-json")),
            "http://127.0.0.1:9999/",
            None,
            None,
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(
            sender.send_url,
            "http://127.0.0.1:9999/v1/projects/from-json/messages:send"
        );
        let sender = FcmSender::new(
            &account_json(None),
            "https://fcm.googleapis.com",
            Some("http://127.0.0.1:9/token"),
            Some("chat-prod"),
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(
            sender.send_url,
            "https://fcm.googleapis.com/v1/projects/chat-prod/messages:send"
        );
    }

    #[test]
    fn an_unusable_private_key_is_refused() {
        let account = json!({
            "project_id": "p",
            "private_key": "-----BEGIN PRIVATE KEY-----\nbm90LWEta2V5\n-----END PRIVATE KEY-----\n",
            "client_email": "pusher@p.iam.gserviceaccount.com",
            "token_uri": "https://oauth2.googleapis.com/token",
        });
        let error = FcmSender::new(
            &account.to_string(),
            "https://fcm.googleapis.com",
            None,
            None,
            Duration::from_secs(5),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(error.contains("FCM service account"), "{error}");
        assert!(!error.contains("bm90LWEta2V5"), "{error}");
    }

    #[test]
    fn nothing_configured_means_no_sender() {
        let config = Config::from_env().unwrap();
        assert!(FcmSender::from_config(&config).unwrap().is_none());
    }

    #[tokio::test]
    async fn an_unreachable_token_endpoint_is_an_auth_failure() {
        // A port that was free a moment ago: connections to it are refused.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let token_uri = format!("http://{}/token", listener.local_addr().unwrap());
        drop(listener);
        let sender = FcmSender::new(
            &account_json(Some("p")),
            "http://127.0.0.1:9",
            Some(&token_uri),
            None,
            Duration::from_secs(5),
        )
        .unwrap();
        let device = Device {
            token: "t".into(),
            platform: super::super::Platform::Fcm,
            app_id: "app".into(),
            sandbox: false,
        };
        let notification = Notification {
            message_id: uuid::Uuid::from_u128(1),
            conversation_id: uuid::Uuid::from_u128(2),
            seq: 1,
            sender_id: "alice".into(),
            title: "alice".into(),
            body: "hi".into(),
            preview: true,
            badge: None,
            high_priority: true,
            expires_at: Utc::now() + chrono::Duration::hours(1),
        };
        let outcome = sender.send(&device, &notification).await;
        assert_eq!(label(&outcome), "auth", "{outcome:?}");
        assert!(
            outcome.reason().starts_with("fcm oauth: "),
            "{}",
            outcome.reason()
        );
    }
}
