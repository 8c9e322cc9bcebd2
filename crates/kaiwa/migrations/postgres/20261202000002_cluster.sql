-- What several kaiwa processes share besides the history: which gateways are alive, which of
-- them holds which client, the client slots of the whole cluster, and when a message's job was
-- last taken by a worker or queued again.

-- A gateway renews its lease while it runs. What it holds (client slots, client ids) counts
-- only while its lease runs: a gateway that dies gives everything back when the lease ends.
CREATE TABLE gateways (
    id          TEXT        COLLATE "C" PRIMARY KEY,
    started_at  TIMESTAMPTZ NOT NULL,
    lease_until TIMESTAMPTZ NOT NULL
);

-- The client slots of the cluster (R13): one row per slot, as many as --max-clients; a
-- connection holds one, so no more clients than rows can ever be connected at once, whatever
-- the number of gateways.
CREATE TABLE client_slots (
    slot       INTEGER PRIMARY KEY CHECK (slot > 0),
    gateway_id TEXT    COLLATE "C",
    conn_id    BIGINT,
    taken_at   TIMESTAMPTZ
);

-- One connection per client id across the cluster (R15), and where to send its replies.
CREATE TABLE sessions (
    client_id  TEXT        COLLATE "C" PRIMARY KEY,
    gateway_id TEXT        COLLATE "C" NOT NULL,
    conn_id    BIGINT      NOT NULL,
    since      TIMESTAMPTZ NOT NULL
);
CREATE INDEX sessions_gateway ON sessions (gateway_id);

-- When a worker last took the message's job, or a sweeper queued it again: an accepted message
-- whose job nobody has touched for a while is queued again, by one process.
ALTER TABLE messages ADD COLUMN touched_at TIMESTAMPTZ;
