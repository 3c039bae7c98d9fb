-- What each message's request was, and the requests refused for reusing a key that already
-- named a different message (ADR 0005).

-- SHA-256 over the request's content, contentType, metadata, recipientIds and priority
-- (hotpath_core::ids::request_digest). NULL for rows stored before it existed: such a row
-- never conflicts with anything.
ALTER TABLE messages ADD COLUMN request_digest text;

-- One row per refused message: it reused an idempotency key for a different request after
-- the stream's duplicate window, so the gateway had answered 202. Written in the transaction
-- of the batch that met it, so it is recorded exactly once however often the message is
-- delivered; the message itself is never stored and never takes a seq.
CREATE TABLE message_rejections (
    -- The refused request's own messageId (derived from its key and its request digest).
    message_id          uuid PRIMARY KEY,
    conversation_id     uuid NOT NULL REFERENCES conversations (id),
    sender_id           text NOT NULL,
    correlation_id      uuid NOT NULL,
    idempotency_key     text NOT NULL,
    reason              text NOT NULL CHECK (reason IN ('IDEMPOTENCY_KEY_REUSED')),
    -- The message the key already names.
    original_message_id uuid NOT NULL,
    accepted_at         timestamptz NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now()
);
