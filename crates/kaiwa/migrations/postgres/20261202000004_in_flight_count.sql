-- The number of accepted messages not yet replied to (R14's "in flight"), kept in one row
-- instead of counted. A gateway reads it under a row lock before it accepts messages, so the
-- limit holds across the cluster; counting the rows instead costs a visit to every row that
-- was ever accepted until VACUUM runs (the partial index keeps pointing at their old versions),
-- and the count ran while every gateway waited for it.
-- No message may change between the count below and the triggers taking over (processes of the
-- previous version may be running): they wait for this transaction.
LOCK TABLE messages IN SHARE ROW EXCLUSIVE MODE;

CREATE TABLE in_flight (
    only_row BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (only_row),
    accepted BIGINT  NOT NULL CHECK (accepted >= 0)
);
INSERT INTO in_flight (accepted) SELECT COUNT(*) FROM messages WHERE status = 'accepted';

-- Kept by triggers, so that no way of changing a message (the writers, a sweeper, an operator's
-- UPDATE) can leave the count wrong: one update per statement, not per row, and none when the
-- count does not change (rejected messages only; a sweeper touching `touched_at`), so such a
-- statement takes no lock. A trigger with transition tables cannot name columns: every UPDATE
-- of messages comes here.
CREATE FUNCTION in_flight_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    delta BIGINT := 0;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        UPDATE in_flight SET accepted = 0;
        RETURN NULL;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        delta := delta + (SELECT COUNT(*) FROM new_rows WHERE status = 'accepted');
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        delta := delta - (SELECT COUNT(*) FROM old_rows WHERE status = 'accepted');
    END IF;
    IF delta <> 0 THEN
        UPDATE in_flight SET accepted = accepted + delta;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER messages_in_flight_insert AFTER INSERT ON messages
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION in_flight_changed();
CREATE TRIGGER messages_in_flight_update AFTER UPDATE ON messages
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION in_flight_changed();
CREATE TRIGGER messages_in_flight_delete AFTER DELETE ON messages
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION in_flight_changed();
CREATE TRIGGER messages_in_flight_truncate AFTER TRUNCATE ON messages
    FOR EACH STATEMENT EXECUTE FUNCTION in_flight_changed();
