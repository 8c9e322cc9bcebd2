-- Messages as received, accepted or rejected, with their replies and delivery statuses.
-- Timestamps are RFC 3339 text in UTC. Media content is the file's path relative to the data
-- directory (e.g. media/images/<uuid>.png).

CREATE TABLE messages (
    id               INTEGER PRIMARY KEY,
    client_id        TEXT    NOT NULL,
    client_msg_id    TEXT,
    message_type     TEXT    NOT NULL CHECK (message_type IN ('text', 'voice', 'video', 'image')),
    content          TEXT    NOT NULL,
    filename         TEXT,
    mime_type        TEXT,
    size_bytes       INTEGER,
    timezone         TEXT    NOT NULL,
    status           TEXT    NOT NULL CHECK (status IN ('accepted', 'replied', 'rejected')),
    status_reason    TEXT,
    client_timestamp TEXT,
    received_at      TEXT    NOT NULL
);

-- A native client's resend of the same id is recognised instead of stored twice.
CREATE UNIQUE INDEX messages_client_msg_id ON messages (client_id, client_msg_id)
    WHERE client_msg_id IS NOT NULL;
-- History, newest first, per client.
CREATE INDEX messages_client_recent ON messages (client_id, id);
-- Recovery after a restart: accepted but never replied.
CREATE INDEX messages_unfinished ON messages (id) WHERE status = 'accepted';

CREATE TABLE replies (
    id           INTEGER PRIMARY KEY,
    message_id   INTEGER NOT NULL REFERENCES messages (id),
    client_id    TEXT    NOT NULL,
    reply_type   TEXT    NOT NULL CHECK (reply_type IN ('text', 'voice', 'image')),
    content      TEXT    NOT NULL,
    filename     TEXT,
    mime_type    TEXT,
    delivery     TEXT    NOT NULL DEFAULT 'pending'
                         CHECK (delivery IN ('pending', 'delivered', 'failed')),
    created_at   TEXT    NOT NULL,
    delivered_at TEXT
);

-- One reply of each type per message: processing a message twice (a recovered or redelivered
-- job) cannot duplicate its replies.
CREATE UNIQUE INDEX replies_message ON replies (message_id, reply_type);
-- What a reconnecting client missed.
CREATE INDEX replies_failed ON replies (client_id, id) WHERE delivery = 'failed';
