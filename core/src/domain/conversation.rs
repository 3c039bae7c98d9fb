//! The kinds of conversation: the request's `type`, the `conversations.type` column and the
//! `conversation_type` label of the ingress metrics.

closed_words! {
    /// What a conversation is.
    pub enum ConversationKind as "conversation type" {
        /// Exactly two members, for good: nobody joins or is added.
        Direct => "direct",
        /// Any number of members, who come and go.
        Group => "group",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_spelled_as_in_the_conversations_table() {
        assert_eq!(
            ConversationKind::ALL.map(ConversationKind::as_str),
            ["direct", "group"]
        );
        assert_eq!("group".parse(), Ok(ConversationKind::Group));
        assert!("channel".parse::<ConversationKind>().is_err());
    }
}
