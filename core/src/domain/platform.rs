//! The push providers a device can be registered with.
//!
//! The platform names a device row (`devices.platform`, whose CHECK allows exactly these
//! words), a push task, the `push.<platform>` subject and `push-<platform>` consumer, and
//! the `platform` label of the push metrics. Adding a provider starts here and in that CHECK.

closed_words! {
    /// A push provider, as a device registered for it.
    pub enum Platform as "push platform" {
        /// Apple Push Notification service.
        Apns => "apns",
        /// Firebase Cloud Messaging.
        Fcm => "fcm",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_are_spelled_as_in_the_devices_table() {
        let table = [(Platform::Apns, "apns"), (Platform::Fcm, "fcm")];
        assert_eq!(table.len(), Platform::ALL.len());
        for (platform, word) in table {
            assert_eq!(platform.as_str(), word);
            assert_eq!(platform.to_string(), word);
            assert_eq!(word.parse::<Platform>(), Ok(platform));
            assert_eq!(
                serde_json::to_string(&platform).unwrap(),
                format!("\"{word}\"")
            );
        }
        assert!("webpush".parse::<Platform>().is_err());
        assert!("APNS".parse::<Platform>().is_err());
    }
}
