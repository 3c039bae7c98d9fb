//! The steps of a delivery batch, in the order they run: the `step` label of
//! `delivery_pipeline_step_duration_ms`.

closed_words! {
    /// One step of a delivery batch.
    pub enum PipelineStep as "pipeline step" {
        /// Reading the envelopes out of the fetched messages.
        Decode => "decode",
        /// The one Postgres transaction of the batch.
        Persist => "persist",
        /// Publishing the frames to the recipients' socket nodes.
        Fanout => "fanout",
        /// Scheduling pushes for offline recipients.
        Push => "push",
        /// Copying the batch into the replay stream.
        Replay => "replay",
        /// Acknowledging the batch to JetStream.
        Ack => "ack",
    }
}
