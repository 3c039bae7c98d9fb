//! What a message is and how urgently it should reach its recipients: the request's
//! `contentType` and `priority`.
//!
//! The shipped schema policy allows exactly the words below, but a pushed policy may allow
//! more (a `sticker` content type, say), so these vocabularies are open: an unknown value is
//! kept as sent in the envelope, the `messages` row and the history, and counted under the
//! metric label `other`. What Hotpath itself decides from them (a push preview's wording, a
//! push's urgency) treats an unknown value like the nearest known one, as the docs of those
//! decisions say.

open_words! {
    /// A message's `contentType`.
    pub enum ContentType {
        Text => "text",
        Image => "image",
        File => "file",
        Audio => "audio",
        Video => "video",
        Location => "location",
    }
}

open_words! {
    /// A message's `priority`; `normal` when the request names none.
    #[derive(Default)]
    pub enum Priority {
        Low => "low",
        #[default]
        Normal => "normal",
        High => "high",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_words_round_trip_and_unknown_ones_are_kept_but_labelled_other() {
        for content_type in ContentType::KNOWN {
            let word = content_type.as_str();
            assert_eq!(word.parse::<ContentType>(), Ok(content_type.clone()));
            assert_eq!(content_type.label(), word);
        }
        let sticker: ContentType = "sticker".parse().unwrap();
        assert_eq!(sticker, ContentType::Other("sticker".into()));
        assert_eq!((sticker.as_str(), sticker.label()), ("sticker", "other"));
        assert_eq!(serde_json::to_string(&sticker).unwrap(), "\"sticker\"");
        assert_eq!(
            serde_json::from_str::<Priority>("\"urgent\"")
                .unwrap()
                .label(),
            "other"
        );
        assert_eq!(Priority::default().as_str(), "normal");
    }
}
