//! What a push says, and how each platform is told.
//!
//! [`notification`] turns a stored message into a [`Notification`]: who wrote (the title), a
//! shortened single-line preview of the text (the body), or a neutral line when the message
//! is an attachment or the conversation keeps content out of pushes. Everything platform
//! specific starts from that value, so "no content in pushes" is decided in one place:
//! [`fcm_message`] here builds FCM's request body, and APNS's payload is built next to its
//! client in [`super::apns`]. Neither ever puts the message content in the data part, which
//! apps may log or forward: only ids go there.
//!
//! The same text shaping makes providers' answers fit in one log line ([`error_reason`]).

use std::time::Duration;

use chrono::{DateTime, Utc};
use hotpath_core::domain::{ContentType, Priority};
use serde_json::{Value, json};
use uuid::Uuid;

use super::{Device, Notification};

/// Longest title (the sender's id), in characters.
pub const TITLE_MAX_CHARS: usize = 64;
/// Longest body, in characters: what a lock screen shows of a message in a few lines, and
/// far below both providers' 4 KB payload limits even in 4-byte characters.
pub const BODY_MAX_CHARS: usize = 178;
/// The body of an attachment's push: its content is a reference, not something to show.
pub const ATTACHMENT_BODY: &str = "Sent an attachment";
/// The body of a push whose conversation keeps content out of pushes.
pub const NEUTRAL_BODY: &str = "New message";
/// The longest TTL FCM accepts: four weeks.
const FCM_MAX_TTL: Duration = Duration::from_secs(28 * 24 * 3600);

/// The parts of a stored message (and its conversation) a push is made from.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct StoredMessage {
    pub message_id: Uuid,
    pub conversation_id: Uuid,
    pub seq: i64,
    pub sender_id: String,
    pub content: String,
    /// Only text is shown in a push; anything else, known or not, is an attachment.
    pub content_type: ContentType,
    /// Only `low` is sent without urgency; an unknown priority is urgent, like `normal`.
    pub priority: Priority,
    /// The conversation's setting: false keeps content out of pushes.
    pub push_preview: bool,
}

/// What the recipient's phone shows for `message`, valid until `now + ttl`.
pub fn notification(
    message: &StoredMessage,
    badge: Option<u32>,
    ttl: Duration,
    now: DateTime<Utc>,
) -> Notification {
    let body = if !message.push_preview {
        NEUTRAL_BODY.to_string()
    } else if message.content_type != ContentType::Text {
        ATTACHMENT_BODY.to_string()
    } else {
        let text = single_line(&message.content);
        if text.is_empty() {
            NEUTRAL_BODY.to_string()
        } else {
            truncate(&text, BODY_MAX_CHARS)
        }
    };
    // A TTL too large for chrono (centuries) means "never expires" anyway.
    let expires_at = chrono::Duration::from_std(ttl)
        .ok()
        .and_then(|ttl| now.checked_add_signed(ttl))
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    Notification {
        message_id: message.message_id,
        conversation_id: message.conversation_id,
        seq: message.seq,
        sender_id: message.sender_id.clone(),
        title: truncate(&single_line(&message.sender_id), TITLE_MAX_CHARS),
        body,
        preview: message.push_preview,
        badge,
        high_priority: message.priority != Priority::Low,
        expires_at,
    }
}

/// `text` cut to at most `max_chars` characters, the last of them "…" when anything was cut.
/// Cuts only between characters, so the result is always valid UTF-8 (a grapheme made of
/// several characters, such as a flag, may lose its tail).
pub fn truncate(text: &str, max_chars: usize) -> String {
    if max_chars == 0 {
        return String::new();
    }
    // The byte offset of character number `max_chars`, if the text is longer than that.
    let Some((cut, _)) = text.char_indices().nth(max_chars) else {
        return text.to_string();
    };
    // Keep max_chars - 1 characters and the ellipsis.
    let keep = text[..cut]
        .char_indices()
        .last()
        .map_or(0, |(last, _)| last);
    let mut shortened = String::with_capacity(keep + '…'.len_utf8());
    shortened.push_str(&text[..keep]);
    shortened.push('…');
    shortened
}

/// `text` on one line: every run of whitespace and control characters (newlines, tabs, escape
/// sequences) becomes one space, and the ends are trimmed.
pub fn single_line(text: &str) -> String {
    text.split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|word| !word.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Longest failure reason kept from a provider's answer, in characters.
pub const REASON_MAX_CHARS: usize = 300;

/// `text` as a failure reason: one line, at most [`REASON_MAX_CHARS`], fit for logs and DLQ
/// headers.
pub fn reason_line(text: &str) -> String {
    truncate(&single_line(text), REASON_MAX_CHARS)
}

/// `context: error: its cause: ...` as a failure reason: transport errors tend to say what
/// failed only in their sources. A cause an error already quotes is not repeated.
pub fn error_reason(context: &str, error: &dyn std::error::Error) -> String {
    let mut text = format!("{context}: {error}");
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    reason_line(&text)
}

/// The FCM HTTP v1 request body (`messages:send`) for `n` to `device`, its TTL counted from
/// now.
pub fn fcm_message(device: &Device, n: &Notification) -> Value {
    fcm_message_at(device, n, Utc::now())
}

/// [`fcm_message`] with the TTL counted from `now`.
pub fn fcm_message_at(device: &Device, n: &Notification, now: DateTime<Utc>) -> Value {
    let message_id = n.message_id.to_string();
    let conversation_id = n.conversation_id.to_string();
    let ttl = (n.expires_at - now)
        .to_std()
        .unwrap_or(Duration::ZERO)
        .min(FCM_MAX_TTL);

    let mut android_notification = json!({ "tag": conversation_id });
    if let Some(badge) = n.badge {
        android_notification["notification_count"] = json!(badge);
    }
    let mut aps = json!({ "thread-id": conversation_id, "sound": "default" });
    if let Some(badge) = n.badge {
        aps["badge"] = json!(badge);
    }

    json!({
        "message": {
            "token": device.token,
            "notification": { "title": n.title, "body": n.body },
            // FCM requires every data value to be a string.
            "data": {
                "messageId": message_id,
                "conversationId": conversation_id,
                "seq": n.seq.to_string(),
                "senderId": n.sender_id,
            },
            "android": {
                "priority": if n.high_priority { "HIGH" } else { "NORMAL" },
                "ttl": format!("{}s", ttl.as_secs()),
                "collapse_key": message_id,
                "notification": android_notification,
            },
            // For iOS apps that receive through FCM: the same choices as a direct APNS push.
            "apns": {
                "headers": {
                    "apns-priority": if n.high_priority { "10" } else { "5" },
                    "apns-expiration": n.expires_at.timestamp().max(0).to_string(),
                    "apns-collapse-id": message_id,
                },
                "payload": { "aps": aps },
            },
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::push::Platform;

    fn message(content: &str) -> StoredMessage {
        StoredMessage {
            message_id: Uuid::from_u128(0x1111),
            conversation_id: Uuid::from_u128(0x2222),
            seq: 42,
            sender_id: "alice".into(),
            content: content.into(),
            content_type: "text".into(),
            priority: "normal".into(),
            push_preview: true,
        }
    }

    fn device() -> Device {
        Device {
            token: "fcm-token-1".into(),
            platform: Platform::Fcm,
            app_id: "com.example.chat".into(),
            sandbox: false,
        }
    }

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000, 0).unwrap()
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn truncate_keeps_text_at_or_under_the_limit_unchanged() {
        assert_eq!(truncate("hello", 5), "hello");
        assert_eq!(truncate("hello", 6), "hello");
        assert_eq!(truncate("", 3), "");
        let exact = "é".repeat(BODY_MAX_CHARS);
        assert_eq!(truncate(&exact, BODY_MAX_CHARS), exact);
    }

    #[test]
    fn truncate_cuts_between_multibyte_characters_and_marks_the_cut() {
        assert_eq!(truncate("hello world", 5), "hell…");
        // 4-byte emoji and 3-byte CJK characters are never split.
        assert_eq!(truncate("😀😀😀😀", 3), "😀😀…");
        assert_eq!(truncate("漢字漢字漢字", 4), "漢字漢…");
        assert_eq!(truncate("a😀b漢c", 4), "a😀b…");
        assert_eq!(truncate("abc", 1), "…");
        assert_eq!(truncate("abc", 0), "");
        let long = "漢".repeat(500);
        assert_eq!(
            truncate(&long, BODY_MAX_CHARS).chars().count(),
            BODY_MAX_CHARS
        );
    }

    #[test]
    fn single_line_collapses_newlines_and_control_characters() {
        assert_eq!(
            single_line("  one\ntwo\r\n\tthree\u{1b}[0m  "),
            "one two three [0m"
        );
        assert_eq!(single_line("\n\n"), "");
    }

    /// An error that says `what` and has `cause` as its source.
    #[derive(Debug)]
    struct Failed {
        what: String,
        cause: std::io::Error,
    }

    impl std::fmt::Display for Failed {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.what)
        }
    }

    impl std::error::Error for Failed {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.cause)
        }
    }

    #[test]
    fn error_reasons_follow_the_causes_on_one_short_line() {
        let error = Failed {
            what: "request failed".into(),
            cause: std::io::Error::other("connection\nrefused"),
        };
        assert_eq!(
            error_reason("fcm", &error),
            "fcm: request failed: connection refused"
        );
        // A cause the error already quotes is not repeated.
        let quoting = Failed {
            what: "request failed: connection refused".into(),
            cause: std::io::Error::other("connection refused"),
        };
        assert_eq!(
            error_reason("fcm", &quoting),
            "fcm: request failed: connection refused"
        );
        let long = std::io::Error::other("x".repeat(1000));
        assert_eq!(error_reason("fcm", &long).chars().count(), REASON_MAX_CHARS);
    }

    #[test]
    fn text_message_becomes_a_one_line_shortened_preview() {
        let text = format!("line one\nline two {}", "x".repeat(300));
        let n = notification(&message(&text), Some(3), HOUR, now());
        assert!(n.body.starts_with("line one line two xxx"), "{}", n.body);
        assert!(n.body.ends_with('…'));
        assert_eq!(n.body.chars().count(), BODY_MAX_CHARS);
        assert_eq!(n.title, "alice");
        assert!(n.preview);
        assert_eq!(n.badge, Some(3));
        assert_eq!(n.seq, 42);
        assert_eq!(n.expires_at, now() + chrono::Duration::hours(1));
    }

    #[test]
    fn text_at_the_limit_has_no_ellipsis() {
        let text = "y".repeat(BODY_MAX_CHARS);
        let n = notification(&message(&text), None, HOUR, now());
        assert_eq!(n.body, text);
    }

    #[test]
    fn long_sender_ids_are_cut_to_the_title_limit() {
        let mut m = message("hi");
        m.sender_id = "s".repeat(100);
        let n = notification(&m, None, HOUR, now());
        assert_eq!(n.title.chars().count(), TITLE_MAX_CHARS);
        assert_eq!(n.sender_id, m.sender_id, "the data keeps the whole id");
    }

    #[test]
    fn attachments_say_so_without_content() {
        let mut m = message("s3://bucket/secret-photo.jpg");
        m.content_type = "image".into();
        let n = notification(&m, None, HOUR, now());
        assert_eq!(n.body, ATTACHMENT_BODY);
        assert!(n.preview);
    }

    #[test]
    fn preview_off_shows_a_neutral_line() {
        let mut m = message("the secret plan");
        m.push_preview = false;
        let n = notification(&m, None, HOUR, now());
        assert_eq!(n.body, NEUTRAL_BODY);
        assert!(!n.preview);
    }

    #[test]
    fn only_low_priority_messages_wait_for_a_convenient_moment() {
        for (priority, high) in [("low", false), ("normal", true), ("high", true)] {
            let mut m = message("hi");
            m.priority = priority.into();
            assert_eq!(
                notification(&m, None, HOUR, now()).high_priority,
                high,
                "{priority}"
            );
        }
    }

    #[test]
    fn fcm_message_carries_notification_ids_and_android_options() {
        let n = notification(&message("hello"), Some(7), HOUR, now());
        let body = fcm_message_at(&device(), &n, now());
        let m = &body["message"];
        assert_eq!(m["token"], "fcm-token-1");
        assert_eq!(m["notification"]["title"], "alice");
        assert_eq!(m["notification"]["body"], "hello");
        assert_eq!(
            m["data"],
            json!({
                "messageId": Uuid::from_u128(0x1111).to_string(),
                "conversationId": Uuid::from_u128(0x2222).to_string(),
                "seq": "42",
                "senderId": "alice",
            })
        );
        assert_eq!(m["android"]["priority"], "HIGH");
        assert_eq!(m["android"]["ttl"], "3600s");
        assert_eq!(
            m["android"]["collapse_key"],
            Uuid::from_u128(0x1111).to_string()
        );
        assert_eq!(
            m["android"]["notification"]["tag"],
            Uuid::from_u128(0x2222).to_string()
        );
        assert_eq!(m["android"]["notification"]["notification_count"], 7);
        assert_eq!(m["apns"]["headers"]["apns-priority"], "10");
        assert_eq!(m["apns"]["headers"]["apns-expiration"], "1700003600");
        assert_eq!(m["apns"]["payload"]["aps"]["badge"], 7);
    }

    #[test]
    fn fcm_data_values_are_all_strings() {
        let n = notification(&message("hello"), Some(7), HOUR, now());
        let body = fcm_message_at(&device(), &n, now());
        let data = body["message"]["data"].as_object().unwrap();
        assert_eq!(data.len(), 4);
        for (key, value) in data {
            assert!(value.is_string(), "{key} = {value}");
        }
    }

    #[test]
    fn fcm_low_priority_ttl_and_no_badge() {
        let mut m = message("hello");
        m.priority = "low".into();
        let n = notification(&m, None, HOUR, now());
        // Half an hour later, half an hour is left.
        let later = now() + chrono::Duration::minutes(30);
        let body = fcm_message_at(&device(), &n, later);
        let m = &body["message"];
        assert_eq!(m["android"]["priority"], "NORMAL");
        assert_eq!(m["android"]["ttl"], "1800s");
        assert_eq!(m["apns"]["headers"]["apns-priority"], "5");
        assert!(
            m["android"]["notification"]
                .get("notification_count")
                .is_none()
        );
        assert!(m["apns"]["payload"]["aps"].get("badge").is_none());
        // Already expired: FCM is told not to store it at all.
        let expired = fcm_message_at(&device(), &n, now() + chrono::Duration::hours(2));
        assert_eq!(expired["message"]["android"]["ttl"], "0s");
    }

    #[test]
    fn preview_off_keeps_content_out_of_the_whole_fcm_request() {
        let mut m = message("the secret plan");
        m.push_preview = false;
        let n = notification(&m, None, HOUR, now());
        let serialized = fcm_message_at(&device(), &n, now()).to_string();
        assert!(!serialized.contains("secret"), "{serialized}");
        assert!(serialized.contains(NEUTRAL_BODY));
    }

    #[test]
    fn fcm_data_never_carries_content_even_with_preview() {
        let n = notification(&message("visible text"), None, HOUR, now());
        let body = fcm_message_at(&device(), &n, now());
        assert!(!body["message"]["data"].to_string().contains("visible"));
        assert!(!body["message"]["android"].to_string().contains("visible"));
        assert!(!body["message"]["apns"].to_string().contains("visible"));
    }
}
