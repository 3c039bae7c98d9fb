-- Push notifications: the devices users registered, whether a conversation's pushes may show
-- message content, and which device was already pushed which message.

CREATE TABLE devices (
    -- A device token belongs to one app installation, so to one user at a time: registering a
    -- token another user had moves it (the newest sign-in on that phone wins).
    token       text PRIMARY KEY,
    platform    text NOT NULL CHECK (platform IN ('apns', 'fcm')),
    user_id     text NOT NULL,
    -- The APNS topic (bundle id) or the FCM app id the token was issued for.
    app_id      text NOT NULL,
    -- APNS only: the token comes from a development build and goes to Apple's sandbox.
    sandbox     boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX devices_by_user ON devices (user_id, platform);

-- false: pushes of this conversation say only that there is a new message, never its content.
ALTER TABLE conversations ADD COLUMN push_preview boolean NOT NULL DEFAULT true;

-- One row per (message, device) the provider accepted: a retried or replayed push task skips
-- the devices that already got it. Pruned by the push workers after a retention period.
CREATE TABLE push_deliveries (
    message_id  uuid NOT NULL,
    token       text NOT NULL,
    sent_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (message_id, token)
);
CREATE INDEX push_deliveries_by_time ON push_deliveries (sent_at);
