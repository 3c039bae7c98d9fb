//! Where a dead-lettered entry came from: the `dlq.<source>` subject of the `DLQ` stream,
//! the `source` label of the DLQ metrics and `hotpath dlq --source`.

closed_words! {
    /// The stream whose consumer gave up on an entry.
    pub enum DlqSource as "DLQ source" {
        /// A message the delivery consumers could not store.
        Messages => "messages",
        /// A receipt the receipts consumer could not record.
        Receipts => "receipts",
        /// A push task that failed for good.
        Push => "push",
    }
}

impl DlqSource {
    /// The stream the entry was taken from, as its `Hotpath-Source-Stream` header names it.
    pub fn stream(self) -> &'static str {
        match self {
            DlqSource::Messages => crate::names::MESSAGES_STREAM,
            DlqSource::Receipts => crate::names::RECEIPTS_STREAM,
            DlqSource::Push => crate::names::PUSH_STREAM,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_name_their_streams() {
        assert_eq!(
            DlqSource::ALL.map(DlqSource::as_str),
            ["messages", "receipts", "push"]
        );
        assert!("outbox".parse::<DlqSource>().is_err());
    }
}
