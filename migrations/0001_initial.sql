-- Conversations, their members, blocks between users, and the persisted messages.

CREATE TABLE conversations (
    id          uuid PRIMARY KEY,
    type        text NOT NULL CHECK (type IN ('direct', 'group')),
    is_active   boolean NOT NULL DEFAULT true,
    created_by  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- The highest per-conversation seq handed out; bumped in the same transaction that
    -- inserts the messages, so seq is gap-free.
    last_seq    bigint NOT NULL DEFAULT 0
);

CREATE TABLE conversation_members (
    conversation_id uuid NOT NULL REFERENCES conversations (id),
    user_id         text NOT NULL,
    is_active       boolean NOT NULL DEFAULT true,
    joined_at       timestamptz NOT NULL DEFAULT now(),
    left_at         timestamptz,
    PRIMARY KEY (conversation_id, user_id)
);
CREATE INDEX conversation_members_by_user ON conversation_members (user_id) WHERE is_active;

CREATE TABLE blocks (
    blocker_id  text NOT NULL,
    blocked_id  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (blocker_id, blocked_id)
);
CREATE INDEX blocks_by_blocked ON blocks (blocked_id);

CREATE TABLE messages (
    id               uuid PRIMARY KEY,
    conversation_id  uuid NOT NULL REFERENCES conversations (id),
    seq              bigint NOT NULL,
    sender_id        text NOT NULL,
    content          text NOT NULL,
    content_type     text NOT NULL,
    recipient_ids    text[] NOT NULL,
    metadata         jsonb NOT NULL DEFAULT '{}',
    priority         text NOT NULL,
    idempotency_key  text NOT NULL UNIQUE,
    correlation_id   uuid NOT NULL,
    -- Where the message sat in the MESSAGES stream: acceptance order within its partition.
    stream_partition integer NOT NULL,
    stream_seq       bigint NOT NULL,
    accepted_at      timestamptz NOT NULL,
    persisted_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (conversation_id, seq)
);
