-- Unfinished messages (accepted, not yet replied to) in a narrow table of their own instead of
-- a partial index of `messages`, and the in-flight count in shards (measured with
-- bench/pg-cost.sh and at 1,000 msg/s through a cluster, docs/architecture.md "What a message
-- costs PostgreSQL" and "A message across processes").
--
-- A column named in an index's predicate counts as indexed: every `replied` status, written
-- once per message, was a full update of `messages`, its row copied and a new entry added to
-- each of the table's indexes. With `status` in no index and half of each new page left free,
-- that update is heap-only, beside the row. What recovery and the sweepers look up is now
-- `unfinished`: one small row per message in flight, inserted and deleted by the same triggers
-- that keep the in-flight count, so that no way of changing a message can leave the two apart.
--
-- The number of messages in flight is now the sum of the rows of `in_flight`. Admissions add
-- to shard 0, under the lock that a batch of new messages holds from reading the count to its
-- commit (what keeps the limit exact across gateways). A message completed takes itself off
-- one of shards 1 to 8, chosen by the writing connection's backend: the workers storing
-- replies no longer queue for the row that every admission waits on (with one row, at 1,000
-- msg/s through two gateways and two workers, a commit took 8 ms). Shards 1 to 8 only ever go
-- down, so a sum read while completions commit elsewhere can only count too many, never too
-- few: the limit errs on the side of a client told to retry.
--
-- Processes of a version before this one read the count as a single row (and lock every row
-- of it, in an order the new ones do not keep): stop them before this migration runs.

-- The strongest locks first, as `DROP INDEX` would take one later anyway: taken late, it
-- would wait behind readers while new ones queued behind it.
LOCK TABLE messages IN ACCESS EXCLUSIVE MODE;
LOCK TABLE in_flight IN ACCESS EXCLUSIVE MODE;

CREATE TABLE unfinished (
    message_id BIGINT PRIMARY KEY
);
INSERT INTO unfinished (message_id) SELECT id FROM messages WHERE status = 'accepted';

ALTER TABLE in_flight DROP CONSTRAINT in_flight_pkey,
    DROP CONSTRAINT in_flight_only_row_check,
    DROP CONSTRAINT in_flight_accepted_check;
ALTER TABLE in_flight ADD COLUMN shard SMALLINT NOT NULL DEFAULT 0 CHECK (shard BETWEEN 0 AND 8);
ALTER TABLE in_flight DROP COLUMN only_row;
ALTER TABLE in_flight ADD PRIMARY KEY (shard);
ALTER TABLE in_flight ALTER COLUMN shard DROP DEFAULT;
INSERT INTO in_flight (shard, accepted) SELECT shard, 0 FROM generate_series(1, 8) AS shard;

-- Each statement's change to the count comes from the rows it added to and removed from
-- `unfinished`.
CREATE OR REPLACE FUNCTION in_flight_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    added BIGINT := 0;
    removed BIGINT := 0;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        -- Shard 0 alone takes the count to zero: shards 1 to 8 must only ever go down, or a
        -- room read (shard 0 read after its lock, the others as of its start) could count too
        -- few. No completion runs meanwhile: TRUNCATE holds `messages` exclusively.
        DELETE FROM unfinished;
        UPDATE in_flight
            SET accepted = -(SELECT COALESCE(SUM(accepted), 0) FROM in_flight WHERE shard <> 0)
            WHERE shard = 0;
        RETURN NULL;
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO unfinished (message_id) SELECT id FROM new_rows WHERE status = 'accepted';
        GET DIAGNOSTICS added = ROW_COUNT;
    ELSIF TG_OP = 'UPDATE' THEN
        -- A message that stays accepted (a sweeper's update) stays as it is.
        DELETE FROM unfinished WHERE message_id IN (
            SELECT id FROM old_rows WHERE status = 'accepted'
            EXCEPT SELECT id FROM new_rows WHERE status = 'accepted');
        GET DIAGNOSTICS removed = ROW_COUNT;
        INSERT INTO unfinished (message_id)
            SELECT id FROM new_rows WHERE status = 'accepted'
            EXCEPT SELECT id FROM old_rows WHERE status = 'accepted';
        GET DIAGNOSTICS added = ROW_COUNT;
    ELSIF TG_OP = 'DELETE' THEN
        DELETE FROM unfinished
            WHERE message_id IN (SELECT id FROM old_rows WHERE status = 'accepted');
        GET DIAGNOSTICS removed = ROW_COUNT;
    END IF;
    IF added <> 0 THEN
        UPDATE in_flight SET accepted = accepted + added WHERE shard = 0;
    END IF;
    IF removed <> 0 THEN
        UPDATE in_flight SET accepted = accepted - removed WHERE shard = 1 + pg_backend_pid() % 8;
    END IF;
    RETURN NULL;
END $$;

DROP INDEX messages_unfinished;

-- Each message is updated once after its insert (its `replied` status): with half of each new
-- page left free, that update fits beside the row, as replies' delivery marks do (migration 6).
-- The price is disk: pages written from now on hold half as many messages.
ALTER TABLE messages SET (fillfactor = 50);
