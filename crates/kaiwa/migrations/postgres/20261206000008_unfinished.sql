-- Unfinished messages (accepted, not yet replied to) in a narrow table of their own instead of
-- a partial index of `messages` (measured with bench/pg-cost.sh, docs/architecture.md "What a
-- message costs PostgreSQL").
--
-- A column named in an index's predicate counts as indexed: every `replied` status, written
-- once per message, was a full update of `messages`, its row copied and a new entry added to
-- each of the table's indexes. With `status` in no index and half of each new page left free,
-- that update is heap-only, beside the row. What recovery and the sweepers look up is now
-- `unfinished`: one small row per message in flight, inserted and deleted by the same triggers
-- that keep the in-flight count, so that no way of changing a message can leave the two apart.

-- No message may change or be read until the triggers below have taken over and the old
-- index is gone (processes of the previous version may be running): they wait for this
-- transaction. The strongest lock first, as `DROP INDEX` would take it later anyway: taken
-- late, it would wait behind readers while new ones queued behind it.
LOCK TABLE messages IN ACCESS EXCLUSIVE MODE;

CREATE TABLE unfinished (
    message_id BIGINT PRIMARY KEY
);
INSERT INTO unfinished (message_id) SELECT id FROM messages WHERE status = 'accepted';

-- The in-flight count is the number of rows of `unfinished`: each statement's change to it
-- comes from the rows it added and removed there.
CREATE OR REPLACE FUNCTION in_flight_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    added BIGINT := 0;
    removed BIGINT := 0;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        DELETE FROM unfinished;
        UPDATE in_flight SET accepted = 0;
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
    IF added <> removed THEN
        UPDATE in_flight SET accepted = accepted + added - removed;
    END IF;
    RETURN NULL;
END $$;

DROP INDEX messages_unfinished;

-- Each message is updated once after its insert (its `replied` status): with half of each new
-- page left free, that update fits beside the row, as replies' delivery marks do (migration 6).
-- The price is disk: pages written from now on hold half as many messages.
ALTER TABLE messages SET (fillfactor = 50);
