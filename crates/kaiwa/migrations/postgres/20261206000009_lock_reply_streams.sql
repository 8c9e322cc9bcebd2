-- Storing a batch's replies starts by locking each of its clients' reply streams, then reading
-- where each stream ends. Two statements, because a statement reads the snapshot it started
-- with: only a statement after the lock sees what the lock's last holder wrote. A function
-- (volatile, so each of its statements takes a snapshot of its own) does both in one round trip
-- of the writer's.
--
-- The locks are taken in one order (of the ids' hashes) by every process, so that two batches
-- never wait on each other in a circle; the second key is the client id's hash, under the
-- namespace the caller passes.
CREATE FUNCTION lock_reply_streams(namespace INTEGER, clients TEXT[])
    RETURNS TABLE (client TEXT, latest BIGINT)
    LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(namespace, hashtext(c))
        FROM (SELECT DISTINCT c FROM UNNEST(clients) AS c) AS distinct_clients
        ORDER BY hashtext(c);
    -- Each stream's end read from the end of its index (a MAX with GROUP BY would read every
    -- reply the client ever had).
    RETURN QUERY
        SELECT c, (SELECT r.seq FROM replies AS r WHERE r.client_id = c ORDER BY r.seq DESC LIMIT 1)
        FROM UNNEST(clients) AS c;
END $$;
