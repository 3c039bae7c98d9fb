-- Delivered/read receipts: one row per (message, recipient) that acknowledged it.
-- Written only by the receipts consumer, with an upsert that never moves backwards: each
-- timestamp is set once (the first receipt wins) and a `read` also sets `delivered_at`.

CREATE TABLE message_receipts (
    message_id    uuid NOT NULL REFERENCES messages (id),
    user_id       text NOT NULL,
    delivered_at  timestamptz,
    read_at       timestamptz,
    PRIMARY KEY (message_id, user_id),
    CHECK (read_at IS NULL OR delivered_at IS NOT NULL)
);
