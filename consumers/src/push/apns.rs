//! Apple Push Notification service, through `a2`.
//!
//! One HTTP/2 client per APNS environment: production for App Store and TestFlight builds,
//! sandbox for development builds (a device says which it is when it registers). Both
//! authenticate the same way, with either
//!
//! * a token signing key (`.p8`, with its key id and the team id): one key serves every app
//!   of the team and does not expire, so it is what Apple recommends; or
//! * a client certificate and its private key (PEM), one per app and renewed yearly.
//!
//! The payload shows the sender as the title and the [`Notification`]'s body (already neutral
//! when the conversation keeps content out of pushes), groups the notifications of one
//! conversation (`thread-id`), and carries only ids as data for the app. Apple's answer is
//! mapped to a [`PushOutcome`] by [`classify`].

use std::path::Path;

use a2::request::notification::NotificationOptions;
use a2::request::payload::PayloadLike;
use a2::{Client, ClientConfig, CollapseId, Endpoint, ErrorReason, Priority, PushType};
use anyhow::{Context, anyhow, bail};
use futures::future::BoxFuture;
use hotpath_core::config::Config;
use serde::Serialize;
use uuid::Uuid;

use super::payload::error_reason;
use super::{Device, Notification, PushOutcome, PushSender};

/// How long an idle connection to Apple is kept: APNS prefers long-lived connections.
const POOL_IDLE_TIMEOUT_SECS: u64 = 600;

/// Sends to APNS, choosing the environment per device.
pub struct ApnsSender {
    production: Client,
    sandbox: Client,
}

/// How this deployment proves itself to Apple.
enum Credentials {
    Token {
        key_pem: Vec<u8>,
        key_id: String,
        team_id: String,
    },
    Certificate {
        cert_pem: Vec<u8>,
        key_pem: Vec<u8>,
    },
}

impl ApnsSender {
    /// The sender `config`'s APNS credentials call for; `None` when none are configured.
    /// Partial or ambiguous credentials are an error naming the settings to fix (never their
    /// values).
    pub fn from_config(config: &Config) -> anyhow::Result<Option<ApnsSender>> {
        let Some(credentials) = credentials(config)? else {
            return Ok(None);
        };
        let request_timeout_secs = config.push_request_timeout().as_secs();
        let client = |endpoint: Endpoint| {
            let client_config = ClientConfig {
                endpoint,
                request_timeout_secs: Some(request_timeout_secs),
                pool_idle_timeout_secs: Some(POOL_IDLE_TIMEOUT_SECS),
            };
            connect(&credentials, client_config)
        };
        Ok(Some(ApnsSender {
            production: client(Endpoint::Production)?,
            sandbox: client(Endpoint::Sandbox)?,
        }))
    }
}

fn connect(credentials: &Credentials, config: ClientConfig) -> anyhow::Result<Client> {
    match credentials {
        Credentials::Token {
            key_pem,
            key_id,
            team_id,
        } => Client::token(key_pem.as_slice(), key_id, team_id, config).map_err(|e| {
            anyhow!(
                "HOTPATH_APNS_KEY_FILE/HOTPATH_APNS_KEY is not a usable APNS signing key \
                 (a .p8 EC P-256 key in PEM): {e}"
            )
        }),
        Credentials::Certificate { cert_pem, key_pem } => {
            Client::certificate_parts(cert_pem, key_pem, config).map_err(|e| {
                anyhow!(
                    "HOTPATH_APNS_CERT_FILE/HOTPATH_APNS_CERT_KEY_FILE are not a usable APNS \
                     client certificate and PKCS#8 key in PEM: {e}"
                )
            })
        }
    }
}

fn credentials(config: &Config) -> anyhow::Result<Option<Credentials>> {
    let token_auth = config.apns_key_file.is_some()
        || config.apns_key.is_some()
        || config.apns_key_id.is_some()
        || config.apns_team_id.is_some();
    let certificate_auth = config.apns_cert_file.is_some() || config.apns_cert_key_file.is_some();
    match (token_auth, certificate_auth) {
        (false, false) => Ok(None),
        (true, true) => bail!(
            "APNS: configure token auth (HOTPATH_APNS_KEY_FILE or HOTPATH_APNS_KEY, \
             HOTPATH_APNS_KEY_ID, HOTPATH_APNS_TEAM_ID) or certificate auth \
             (HOTPATH_APNS_CERT_FILE, HOTPATH_APNS_CERT_KEY_FILE), not both"
        ),
        (true, false) => token_credentials(config).map(Some),
        (false, true) => certificate_credentials(config).map(Some),
    }
}

fn token_credentials(config: &Config) -> anyhow::Result<Credentials> {
    let mut missing = Vec::new();
    if config.apns_key_file.is_none() && config.apns_key.is_none() {
        missing.push("HOTPATH_APNS_KEY_FILE or HOTPATH_APNS_KEY");
    }
    if config.apns_key_id.is_none() {
        missing.push("HOTPATH_APNS_KEY_ID");
    }
    if config.apns_team_id.is_none() {
        missing.push("HOTPATH_APNS_TEAM_ID");
    }
    if !missing.is_empty() {
        bail!("APNS token auth is missing {}", missing.join(", "));
    }
    let key_pem = match (&config.apns_key_file, &config.apns_key) {
        (Some(path), None) => read(path, "HOTPATH_APNS_KEY_FILE")?,
        (None, Some(key)) => key.clone().into_bytes(),
        _ => bail!("APNS token auth: set HOTPATH_APNS_KEY_FILE or HOTPATH_APNS_KEY, not both"),
    };
    Ok(Credentials::Token {
        key_pem,
        key_id: config.apns_key_id.clone().unwrap_or_default(),
        team_id: config.apns_team_id.clone().unwrap_or_default(),
    })
}

fn certificate_credentials(config: &Config) -> anyhow::Result<Credentials> {
    let (Some(cert_file), Some(key_file)) = (&config.apns_cert_file, &config.apns_cert_key_file)
    else {
        let missing = if config.apns_cert_file.is_none() {
            "HOTPATH_APNS_CERT_FILE"
        } else {
            "HOTPATH_APNS_CERT_KEY_FILE"
        };
        bail!("APNS certificate auth is missing {missing}");
    };
    Ok(Credentials::Certificate {
        cert_pem: read(cert_file, "HOTPATH_APNS_CERT_FILE")?,
        key_pem: read(key_file, "HOTPATH_APNS_CERT_KEY_FILE")?,
    })
}

fn read(path: &Path, setting: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{setting}: cannot read {}", path.display()))
}

/// The strings an [`ApnsPayload`] borrows that a [`Notification`] holds only as ids.
pub struct ApnsStrings {
    collapse_id: String,
}

impl ApnsStrings {
    pub fn new(n: &Notification) -> ApnsStrings {
        ApnsStrings {
            collapse_id: n.message_id.to_string(),
        }
    }
}

/// What is sent to Apple: the request body (`aps` and the app's `hotpath` data) and, not
/// serialized, the request headers and the device. Its own type rather than `a2`'s
/// `Payload` because that one has no `thread-id`.
#[derive(Debug, Serialize)]
pub struct ApnsPayload<'a> {
    aps: Aps<'a>,
    hotpath: PushData<'a>,
    #[serde(skip)]
    options: NotificationOptions<'a>,
    #[serde(skip)]
    device_token: &'a str,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
struct Aps<'a> {
    alert: Alert<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    badge: Option<u32>,
    sound: &'static str,
    /// Notifications with the same thread id are grouped: one group per conversation.
    thread_id: Uuid,
}

#[derive(Debug, Serialize)]
struct Alert<'a> {
    title: &'a str,
    body: &'a str,
}

/// What the app needs to open the conversation at the message: ids, never content.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct PushData<'a> {
    message_id: Uuid,
    conversation_id: Uuid,
    seq: i64,
    sender_id: &'a str,
}

impl PayloadLike for ApnsPayload<'_> {
    fn get_device_token(&self) -> &str {
        self.device_token
    }

    fn get_options(&self) -> &NotificationOptions<'_> {
        &self.options
    }
}

/// The APNS request for `n` to `device`.
pub fn build_payload<'a>(
    device: &'a Device,
    n: &'a Notification,
    strings: &'a ApnsStrings,
) -> ApnsPayload<'a> {
    let options = NotificationOptions {
        // Left to Apple, which makes one up: it only names the request in Apple's answer.
        apns_id: None,
        apns_push_type: Some(PushType::Alert),
        // Before 1970 means already expired: 0 tells Apple not to store it.
        apns_expiration: Some(u64::try_from(n.expires_at.timestamp()).unwrap_or(0)),
        apns_priority: Some(if n.high_priority {
            Priority::High
        } else {
            Priority::Normal
        }),
        apns_topic: Some(&device.app_id),
        // A hyphenated UUID is 36 bytes, within CollapseId's 64 (what `CollapseId::new`
        // checks), so a retried push replaces its first copy instead of showing twice.
        apns_collapse_id: Some(CollapseId {
            value: &strings.collapse_id,
        }),
    };
    ApnsPayload {
        aps: Aps {
            alert: Alert {
                title: &n.title,
                body: &n.body,
            },
            badge: n.badge,
            sound: "default",
            thread_id: n.conversation_id,
        },
        hotpath: PushData {
            message_id: n.message_id,
            conversation_id: n.conversation_id,
            seq: n.seq,
            sender_id: &n.sender_id,
        },
        options,
        device_token: &device.token,
    }
}

/// What Apple's answer (or the failure to get one) means for this push.
pub fn classify(result: Result<a2::Response, a2::Error>) -> PushOutcome {
    let error = match result {
        Ok(_) => return PushOutcome::Sent,
        Err(a2::Error::ResponseError(response)) => return classify_response(&response),
        Err(error) => error,
    };
    let reason = error_reason("apns", &error);
    match error {
        a2::Error::RequestTimeout(_)
        | a2::Error::ConnectionError(_)
        | a2::Error::ClientError(_) => PushOutcome::Retry {
            reason,
            retry_after: None,
        },
        // The key or certificate cannot be used: someone has to fix the credentials.
        a2::Error::SignerError(_)
        | a2::Error::UnexpectedKey(_)
        | a2::Error::Tls(_)
        | a2::Error::ReadError(_)
        | a2::Error::InvalidCertificate => PushOutcome::Auth { reason },
        // The request itself cannot be built (a token or topic that is not a valid header).
        // (Apple's answers were classified above.)
        a2::Error::SerializeError(_)
        | a2::Error::InvalidOptions(_)
        | a2::Error::BuildRequestError(_)
        | a2::Error::ResponseError(_) => PushOutcome::Rejected { reason },
    }
}

/// Apple answered with an error status: its reason decides, the status when there is none
/// (or one newer than `a2` knows).
fn classify_response(response: &a2::Response) -> PushOutcome {
    let apple_reason = response.error.as_ref().map(|body| &body.reason);
    let reason = match apple_reason {
        Some(apple_reason) => format!("apns {} {apple_reason:?}", response.code),
        None => format!("apns {}", response.code),
    };
    match (response.code, apple_reason) {
        // 410: the token is no longer active for the topic, whatever the reason's name.
        (410, _)
        | (
            _,
            Some(
                ErrorReason::Unregistered
                | ErrorReason::BadDeviceToken
                | ErrorReason::DeviceTokenNotForTopic,
            ),
        ) => PushOutcome::InvalidToken { reason },
        (
            _,
            Some(
                ErrorReason::ExpiredProviderToken
                | ErrorReason::InvalidProviderToken
                | ErrorReason::MissingProviderToken
                | ErrorReason::BadCertificate
                | ErrorReason::BadCertificateEnvironment
                | ErrorReason::Forbidden,
            ),
        )
        | (401 | 403, None) => PushOutcome::Auth { reason },
        // An idle connection closed by Apple is gone by the retry.
        (
            _,
            Some(
                ErrorReason::TooManyRequests
                | ErrorReason::TooManyProviderTokenUpdates
                | ErrorReason::InternalServerError
                | ErrorReason::ServiceUnavailable
                | ErrorReason::Shutdown
                | ErrorReason::IdleTimeout,
            ),
        )
        | (429 | 500..=599, None) => PushOutcome::Retry {
            reason,
            retry_after: None,
        },
        _ => PushOutcome::Rejected { reason },
    }
}

impl PushSender for ApnsSender {
    fn send<'a>(
        &'a self,
        device: &'a Device,
        notification: &'a Notification,
    ) -> BoxFuture<'a, PushOutcome> {
        Box::pin(async move {
            let client = if device.sandbox {
                &self.sandbox
            } else {
                &self.production
            };
            let strings = ApnsStrings::new(notification);
            let payload = build_payload(device, notification, &strings);
            classify(client.send(payload).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::process::Command;
    use std::time::Duration;

    use chrono::{DateTime, Utc};
    use serde_json::{Value, json};

    use super::*;
    use crate::push::Platform;
    use crate::push::payload::{NEUTRAL_BODY, StoredMessage, notification};

    fn message(push_preview: bool) -> StoredMessage {
        StoredMessage {
            message_id: Uuid::from_u128(0xaaaa),
            conversation_id: Uuid::from_u128(0xbbbb),
            seq: 9,
            sender_id: "bob".into(),
            content: "meet at the secret place".into(),
            content_type: "text".into(),
            priority: "high".into(),
            push_preview,
        }
    }

    fn device() -> Device {
        Device {
            token: "apns-token-1".into(),
            platform: Platform::Apns,
            app_id: "com.example.chat".into(),
            sandbox: false,
        }
    }

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000, 0).unwrap()
    }

    fn body_json(n: &Notification) -> Value {
        let device = device();
        let strings = ApnsStrings::new(n);
        let payload = build_payload(&device, n, &strings);
        serde_json::from_str(&payload.to_json_string().unwrap()).unwrap()
    }

    #[test]
    fn payload_has_alert_badge_sound_thread_and_ids() {
        let n = notification(&message(true), Some(4), Duration::from_secs(60), now());
        assert_eq!(
            body_json(&n),
            json!({
                "aps": {
                    "alert": { "title": "bob", "body": "meet at the secret place" },
                    "badge": 4,
                    "sound": "default",
                    "thread-id": Uuid::from_u128(0xbbbb).to_string(),
                },
                "hotpath": {
                    "messageId": Uuid::from_u128(0xaaaa).to_string(),
                    "conversationId": Uuid::from_u128(0xbbbb).to_string(),
                    "seq": 9,
                    "senderId": "bob",
                },
            })
        );
    }

    #[test]
    fn payload_without_badge_or_preview_has_no_badge_and_no_content() {
        let n = notification(&message(false), None, Duration::from_secs(60), now());
        let body = body_json(&n);
        assert!(body["aps"].get("badge").is_none());
        assert_eq!(body["aps"]["alert"]["body"], NEUTRAL_BODY);
        assert!(!body.to_string().contains("secret"), "{body}");
    }

    #[test]
    fn options_carry_topic_collapse_id_priority_and_expiration() {
        let n = notification(&message(true), None, Duration::from_secs(3600), now());
        let device = device();
        let strings = ApnsStrings::new(&n);
        let payload = build_payload(&device, &n, &strings);
        let options = payload.get_options();
        assert_eq!(payload.get_device_token(), "apns-token-1");
        assert_eq!(options.apns_topic, Some("com.example.chat"));
        assert_eq!(
            options.apns_collapse_id.as_ref().map(|c| c.value),
            Some(Uuid::from_u128(0xaaaa).to_string().as_str())
        );
        assert!(CollapseId::new(&strings.collapse_id).is_ok());
        assert!(matches!(options.apns_priority, Some(Priority::High)));
        assert_eq!(options.apns_expiration, Some(1_700_003_600));
        assert_eq!(options.apns_push_type, Some(PushType::Alert));
    }

    #[test]
    fn low_priority_is_sent_with_normal_apns_priority() {
        let mut m = message(true);
        m.priority = "low".into();
        let n = notification(&m, None, Duration::from_secs(60), now());
        let device = device();
        let strings = ApnsStrings::new(&n);
        let payload = build_payload(&device, &n, &strings);
        assert!(matches!(
            payload.get_options().apns_priority,
            Some(Priority::Normal)
        ));
    }

    fn answer(code: u16, reason: Option<&str>) -> Result<a2::Response, a2::Error> {
        let error = reason.map(|reason| {
            serde_json::from_value(json!({ "reason": reason, "timestamp": 1_700_000_000u64 }))
                .unwrap()
        });
        Err(a2::Error::ResponseError(a2::Response {
            error,
            apns_id: None,
            code,
        }))
    }

    fn label(outcome: &PushOutcome) -> &'static str {
        outcome.failure_label().unwrap_or("sent")
    }

    #[test]
    fn apple_answers_map_to_outcomes() {
        let table = [
            (410, Some("Unregistered"), "invalid_token"),
            (410, None, "invalid_token"),
            (400, Some("BadDeviceToken"), "invalid_token"),
            (400, Some("DeviceTokenNotForTopic"), "invalid_token"),
            (403, Some("ExpiredProviderToken"), "auth"),
            (403, Some("InvalidProviderToken"), "auth"),
            (403, Some("MissingProviderToken"), "auth"),
            (403, Some("BadCertificate"), "auth"),
            (403, Some("BadCertificateEnvironment"), "auth"),
            (403, Some("Forbidden"), "auth"),
            (403, None, "auth"),
            (429, Some("TooManyRequests"), "unavailable"),
            (429, Some("TooManyProviderTokenUpdates"), "unavailable"),
            (429, None, "unavailable"),
            (500, Some("InternalServerError"), "unavailable"),
            (503, Some("ServiceUnavailable"), "unavailable"),
            (503, Some("Shutdown"), "unavailable"),
            (502, None, "unavailable"),
            (400, Some("IdleTimeout"), "unavailable"),
            (413, Some("PayloadTooLarge"), "rejected"),
            (400, Some("BadCollapseId"), "rejected"),
            (400, Some("BadTopic"), "rejected"),
            (400, Some("TopicDisallowed"), "rejected"),
            (400, Some("BadExpirationDate"), "rejected"),
            (400, Some("MissingTopic"), "rejected"),
            (405, Some("MethodNotAllowed"), "rejected"),
            (400, None, "rejected"),
        ];
        for (code, reason, expected) in table {
            let outcome = classify(answer(code, reason));
            assert_eq!(label(&outcome), expected, "{code} {reason:?}: {outcome:?}");
            assert!(matches!(
                outcome,
                PushOutcome::Retry {
                    retry_after: None,
                    ..
                } | PushOutcome::InvalidToken { .. }
                    | PushOutcome::Auth { .. }
                    | PushOutcome::Rejected { .. }
            ));
        }
    }

    #[test]
    fn reasons_name_the_status_and_apples_reason() {
        assert_eq!(
            classify(answer(410, Some("Unregistered"))).reason(),
            "apns 410 Unregistered"
        );
        assert_eq!(classify(answer(503, None)).reason(), "apns 503");
        let ok = a2::Response {
            error: None,
            apns_id: Some("id".into()),
            code: 200,
        };
        assert_eq!(classify(Ok(ok)), PushOutcome::Sent);
    }

    #[test]
    fn client_side_failures_map_to_outcomes() {
        let timeout = classify(Err(a2::Error::RequestTimeout(10)));
        assert_eq!(label(&timeout), "unavailable");
        assert!(timeout.reason().contains("10 s"), "{}", timeout.reason());

        let unreadable = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        assert_eq!(
            label(&classify(Err(a2::Error::ReadError(unreadable)))),
            "auth"
        );
        assert_eq!(label(&classify(Err(a2::Error::InvalidCertificate))), "auth");
        let not_a_key = Client::token(&b"not a key"[..], "KEY", "TEAM", ClientConfig::default())
            .err()
            .unwrap();
        assert_eq!(label(&classify(Err(not_a_key))), "auth");

        let options = a2::Error::InvalidOptions("too big".into());
        assert_eq!(label(&classify(Err(options))), "rejected");
        let json = serde_json::from_str::<Value>("{").unwrap_err();
        assert_eq!(
            label(&classify(Err(a2::Error::SerializeError(json)))),
            "rejected"
        );
        let header = reqwest::Method::from_bytes(b"\0").unwrap_err().into();
        let build = classify(Err(a2::Error::BuildRequestError(header)));
        assert_eq!(label(&build), "rejected");
        assert!(!build.reason().contains('\n'));
    }

    fn config() -> Config {
        Config::from_env().unwrap()
    }

    fn openssl(args: &[&str]) -> Vec<u8> {
        let output = Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl runs");
        assert!(output.status.success(), "openssl {args:?} failed");
        output.stdout
    }

    /// A fresh P-256 key in PKCS#8 PEM, as Apple's `.p8` files are.
    fn signing_key() -> String {
        let pem = openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ]);
        String::from_utf8(pem).unwrap()
    }

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("hotpath-apns-{}-{name}", std::process::id()))
    }

    #[test]
    fn nothing_configured_means_no_sender() {
        assert!(ApnsSender::from_config(&config()).unwrap().is_none());
    }

    #[test]
    fn token_auth_builds_a_sender() {
        let mut config = config();
        config.apns_key = Some(signing_key());
        config.apns_key_id = Some("KEYID12345".into());
        config.apns_team_id = Some("TEAMID1234".into());
        assert!(ApnsSender::from_config(&config).unwrap().is_some());
    }

    #[test]
    fn certificate_auth_builds_a_sender() {
        let (cert, key) = (temp_path("cert.pem"), temp_path("key.pem"));
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/CN=hotpath-test",
            "-days",
            "1",
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            cert.to_str().unwrap(),
        ]);
        let mut config = config();
        config.apns_cert_file = Some(cert.clone());
        config.apns_cert_key_file = Some(key.clone());
        let sender = ApnsSender::from_config(&config);
        let _ = std::fs::remove_file(cert);
        let _ = std::fs::remove_file(key);
        assert!(sender.unwrap().is_some());
    }

    #[test]
    fn partial_token_auth_names_what_is_missing() {
        let mut config = config();
        config.apns_key = Some(signing_key());
        config.apns_team_id = Some("TEAMID1234".into());
        let error = ApnsSender::from_config(&config).err().unwrap().to_string();
        assert!(error.contains("HOTPATH_APNS_KEY_ID"), "{error}");
        assert!(!error.contains("HOTPATH_APNS_TEAM_ID"), "{error}");
        assert!(!error.contains("PRIVATE KEY"), "{error}");

        let mut config = self::config();
        config.apns_key_id = Some("KEYID12345".into());
        let error = ApnsSender::from_config(&config).err().unwrap().to_string();
        assert!(
            error.contains("HOTPATH_APNS_KEY_FILE or HOTPATH_APNS_KEY"),
            "{error}"
        );
        assert!(error.contains("HOTPATH_APNS_TEAM_ID"), "{error}");
    }

    #[test]
    fn partial_certificate_auth_names_what_is_missing() {
        let mut config = config();
        config.apns_cert_file = Some(temp_path("only-cert.pem"));
        let error = ApnsSender::from_config(&config).err().unwrap().to_string();
        assert!(error.contains("HOTPATH_APNS_CERT_KEY_FILE"), "{error}");
    }

    #[test]
    fn token_and_certificate_together_are_refused() {
        let mut config = config();
        config.apns_key = Some(signing_key());
        config.apns_key_id = Some("KEYID12345".into());
        config.apns_team_id = Some("TEAMID1234".into());
        config.apns_cert_file = Some(temp_path("cert.pem"));
        config.apns_cert_key_file = Some(temp_path("key.pem"));
        let error = ApnsSender::from_config(&config).err().unwrap().to_string();
        assert!(error.contains("not both"), "{error}");
    }

    #[test]
    fn unreadable_key_file_names_the_setting() {
        let mut config = config();
        config.apns_key_file = Some(temp_path("missing.p8"));
        config.apns_key_id = Some("KEYID12345".into());
        config.apns_team_id = Some("TEAMID1234".into());
        let error = format!("{:#}", ApnsSender::from_config(&config).err().unwrap());
        assert!(error.contains("HOTPATH_APNS_KEY_FILE"), "{error}");
        assert!(error.contains("missing.p8"), "{error}");
    }

    #[test]
    fn an_unusable_key_is_an_error_that_does_not_echo_it() {
        let mut config = config();
        let secret =
            "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LXNlY3JldA==\n-----END PRIVATE KEY-----\n";
        config.apns_key = Some(secret.into());
        config.apns_key_id = Some("KEYID12345".into());
        config.apns_team_id = Some("TEAMID1234".into());
        let error = format!("{:#}", ApnsSender::from_config(&config).err().unwrap());
        assert!(error.contains("HOTPATH_APNS_KEY"), "{error}");
        assert!(!error.contains("c2VjcmV0"), "{error}");
    }
}
