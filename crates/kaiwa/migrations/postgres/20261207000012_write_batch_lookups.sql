-- Two lookups `write_batch` (migration 11) made per row, made once a call or left out:
--
-- - Each new message's and reply's id came from `nextval(pg_get_serial_sequence(...))`, which
--   looks the sequence up in the catalogs every time it runs: once per row. `perf` of a closed
--   loop through the cluster put 4 % of the whole machine's CPU (about 11 % of PostgreSQL's) in
--   that lookup. The two sequences are now found once per call.
-- - The messages' insert said `ON CONFLICT DO NOTHING` without naming the conflict, so every
--   unique index was checked before each row went in: the client message ids', and the primary
--   key, whose ids are drawn from its sequence in the same statement and cannot be taken. The
--   conflict is now named, and only the client message ids' index is checked first.
--
-- Nothing else changes: the function below is migration 11's with these lines changed.

CREATE OR REPLACE FUNCTION write_batch(
    -- Messages: the columns, the gateway admitting them, the cluster's in-flight limit (null
    -- in one process, whose admission keeps the limit itself).
    m_client TEXT[], m_client_msg_id TEXT[], m_type TEXT[], m_content TEXT[],
    m_filename TEXT[], m_mime_type TEXT[], m_size BIGINT[], m_timezone TEXT[], m_status TEXT[],
    m_reason TEXT[], m_client_timestamp TEXT[], m_received_at TIMESTAMPTZ[],
    admitted_by TEXT, max_in_flight BIGINT,
    -- Replies: the namespace of the streams' advisory locks, the columns, the messages they
    -- complete, and whether replies stored before are looked for.
    stream_locks INTEGER, r_message BIGINT[], r_client TEXT[], r_type TEXT[], r_content TEXT[],
    r_filename TEXT[], r_mime_type TEXT[], r_fallback BOOLEAN[], r_created_at TIMESTAMPTZ[],
    completed BIGINT[], look_for_stored BOOLEAN,
    -- Deliveries by reply id; acknowledgements (client, up to seq); departures (client, seq
    -- acknowledged last).
    d_reply BIGINT[], d_delivery TEXT[], d_at TIMESTAMPTZ[],
    a_client TEXT[], a_seq BIGINT[], a_at TIMESTAMPTZ[],
    x_client TEXT[], x_seq BIGINT[])
    RETURNS TABLE (kind "char", "position" BIGINT, id BIGINT, seq BIGINT, fresh BOOLEAN,
        admitted BOOLEAN)
    LANGUAGE plpgsql VOLATILE
    -- Planned once per connection, not at every call: planning was most of a small batch's
    -- time. A plan made once must stay good as the tables grow from empty, whatever the
    -- statistics said when it was made, so every table is read by an index, row by row of
    -- the batch: each lookup is written as a subquery of its row that cannot become a join
    -- (OFFSET 0, a correlated subquery, or an index condition on the ids given), and with
    -- sequential scans off no plan reads a whole table. No JIT: a plan that costs a
    -- sequential scan where none is needed would count as worth compiling (600 ms).
    SET plan_cache_mode = force_generic_plan
    SET enable_seqscan = off
    SET jit = off
    AS $$
#variable_conflict use_column
DECLARE
    -- Per reply given: its position, id and seq, and whether it was stored now.
    r_positions BIGINT[];
    r_ids BIGINT[];
    r_seqs BIGINT[];
    r_fresh BOOLEAN[];
    -- Replies to store now, and how many the insert stored.
    wanted BIGINT;
    stored BIGINT;
    orphan BIGINT;
    -- The tables' id sequences, found once a call: in a statement, once per row.
    message_ids CONSTANT regclass := pg_get_serial_sequence('messages', 'id');
    reply_ids CONSTANT regclass := pg_get_serial_sequence('replies', 'id');
BEGIN
    IF cardinality(r_message) > 0 THEN
        -- In one order (of the ids' hashes) in every process: two batches never wait on each
        -- other in a circle.
        PERFORM pg_advisory_xact_lock(stream_locks, hashtext(c))
            FROM (SELECT DISTINCT c FROM UNNEST(r_client) AS c) AS distinct_clients
            ORDER BY hashtext(c);
        -- Each reply joined with its message instead of checked by a foreign key (migration
        -- 6), each stream's end read from the end of its index, and each new reply's id drawn
        -- here, so that what became of each row is read from the rows given: joined to the
        -- insert's output, a plan made for few rows compared every row with every other.
        -- The rows carried through the steps are narrow: the rest of each reply is read from
        -- its arrays by position at the insert, not copied from step to step.
        WITH given AS MATERIALIZED (
            SELECT u.*, before.id AS before_id, before.seq AS before_seq
            FROM UNNEST(r_message, r_client, r_type) WITH ORDINALITY
                AS u(message_id, client_id, reply_type, "position")
            LEFT JOIN LATERAL (SELECT r.id, r.seq FROM replies AS r
                WHERE look_for_stored
                  AND r.message_id = u.message_id AND r.reply_type = u.reply_type
                OFFSET 0) AS before ON true),
        -- Materialized: each end read once per client, not once per reply.
        ends AS MATERIALIZED (
            SELECT c AS client_id, COALESCE((SELECT r.seq FROM replies AS r
                WHERE r.client_id = c ORDER BY r.seq DESC LIMIT 1), 0) AS last
            FROM (SELECT DISTINCT c FROM UNNEST(r_client) AS c) AS distinct_clients),
        numbered AS MATERIALIZED (
            SELECT g.*, nextval(reply_ids) AS new_id,
                ends.last + row_number() OVER (PARTITION BY g.client_id
                    ORDER BY g."position") AS new_seq
            FROM given AS g JOIN ends USING (client_id)
            WHERE g.before_id IS NULL),
        inserted AS (
            INSERT INTO replies (id, message_id, client_id, seq, reply_type, content, filename,
                mime_type, fallback, created_at)
            SELECT n.new_id, n.message_id, n.client_id, n.new_seq, n.reply_type,
                r_content[n."position"], r_filename[n."position"], r_mime_type[n."position"],
                r_fallback[n."position"], r_created_at[n."position"]
            FROM numbered AS n
            WHERE EXISTS (SELECT 1 FROM messages AS m WHERE m.id = n.message_id OFFSET 0)
            ON CONFLICT (message_id, reply_type) DO NOTHING
            RETURNING 1),
        -- The messages these replies complete leave `unfinished` in the same statement, and
        -- the in-flight count with them (a shard of the completions', as the triggers choose).
        finished AS (
            DELETE FROM unfinished WHERE message_id = ANY(completed) RETURNING 1),
        counted AS (
            UPDATE in_flight SET accepted = accepted - (SELECT COUNT(*) FROM finished)
            WHERE shard = 1 + pg_backend_pid() % 8 AND EXISTS (SELECT 1 FROM finished))
        SELECT array_agg(every_row."position"), array_agg(every_row.id),
                array_agg(every_row.seq), array_agg(every_row.fresh),
                COUNT(*) FILTER (WHERE every_row.fresh), (SELECT COUNT(*) FROM inserted)
            INTO r_positions, r_ids, r_seqs, r_fresh, wanted, stored
            FROM (SELECT n."position", n.new_id AS id, n.new_seq AS seq, true AS fresh
                    FROM numbered AS n
                UNION ALL
                SELECT g."position", g.before_id, g.before_seq, false
                    FROM given AS g WHERE g.before_id IS NOT NULL) AS every_row;
        IF stored < wanted THEN
            IF NOT look_for_stored THEN
                RAISE EXCEPTION 'a reply of a type its message has stored'
                    USING ERRCODE = 'KW001';
            END IF;
            SELECT MIN(u.message_id) INTO orphan FROM UNNEST(r_message) AS u(message_id)
                WHERE NOT EXISTS (SELECT 1 FROM messages AS m WHERE m.id = u.message_id);
            RAISE EXCEPTION 'a reply to message %, which is not stored', orphan
                USING ERRCODE = 'KW002';
        END IF;
        RETURN QUERY
            SELECT 'r'::"char", t.*, true
            FROM UNNEST(r_positions, r_ids, r_seqs, r_fresh) AS t;
    ELSIF cardinality(completed) > 0 THEN
        WITH finished AS (
            DELETE FROM unfinished WHERE message_id = ANY(completed) RETURNING 1)
        UPDATE in_flight SET accepted = accepted - (SELECT COUNT(*) FROM finished)
            WHERE shard = 1 + pg_backend_pid() % 8 AND EXISTS (SELECT 1 FROM finished);
    END IF;

    IF cardinality(d_reply) > 0 THEN
        -- `r.id = ANY(d_reply)` beside the join: the replies then come by their ids from the
        -- primary key, whatever the statistics say of how few are still undelivered.
        UPDATE replies AS r SET delivery = u.delivery,
                delivered_at = CASE WHEN u.delivery = 'delivered' THEN u.at END
            FROM UNNEST(d_reply, d_delivery, d_at) AS u(id, delivery, at)
            WHERE r.id = ANY(d_reply) AND r.id = u.id AND r.delivery <> 'delivered';
    END IF;
    IF cardinality(a_client) > 0 THEN
        -- Only the range since each client's last acknowledgement, found by a range scan of
        -- the client's part of the stream, and the replies then updated by id. Both as fences
        -- the planner cannot reorder (`OFFSET 0` keeps each client's range a scan of its own,
        -- and `ANY(ARRAY(...))` makes the ids a list looked up in the primary key): left free,
        -- once statistics said that nearly every reply is delivered, it started from a scan of
        -- every reply for the few that are not (20 ms a batch at 100,000 replies). The new
        -- position is written by the same statement, whose reads all see the one from before.
        WITH acknowledged AS (INSERT INTO reply_streams (client_id, acknowledged)
                SELECT * FROM UNNEST(a_client, a_seq)
                ON CONFLICT (client_id) DO UPDATE
                    SET acknowledged = GREATEST(reply_streams.acknowledged,
                        EXCLUDED.acknowledged))
        UPDATE replies AS r SET delivery = 'delivered',
                delivered_at = (SELECT a.at FROM UNNEST(a_client, a_at) AS a(client_id, at)
                    WHERE a.client_id = r.client_id LIMIT 1)
            WHERE r.id = ANY(ARRAY(
                    SELECT range.id
                    FROM UNNEST(a_client, a_seq) AS u(client_id, seq)
                    CROSS JOIN LATERAL (SELECT id FROM replies
                        WHERE client_id = u.client_id
                          AND seq > COALESCE((SELECT s.acknowledged FROM reply_streams AS s
                              WHERE s.client_id = u.client_id), 0)
                          AND seq <= u.seq
                        OFFSET 0) AS range))
              AND r.delivery <> 'delivered';
    END IF;
    IF cardinality(x_client) > 0 THEN
        UPDATE replies AS r SET delivery = 'failed'
            WHERE r.id = ANY(ARRAY(
                    SELECT range.id FROM UNNEST(x_client, x_seq) AS u(client_id, seq)
                    CROSS JOIN LATERAL (SELECT id FROM replies
                        WHERE client_id = u.client_id AND seq > u.seq OFFSET 0) AS range))
              AND r.delivery = 'pending';
    END IF;

    -- Last, right before the commit: with a shared in-flight limit (`max_in_flight` given) this
    -- locks the cluster-wide count that every gateway's messages wait for. Alone on the
    -- database (no limit given), every row goes in: admission's own slots kept the limit. As
    -- with replies, the steps carry each row's position and the columns are read by it at the
    -- insert. Each row's id is drawn from the table's sequence in the order of the rows (UNNEST
    -- yields them in order, and a volatile output is computed after any sort the ORDER BY
    -- needs).
    --
    -- With a limit, accepted rows go in, in the batch's order, while the count leaves room; the
    -- others are not stored, and their senders retry. The count's admission shard is locked
    -- until the commit, so that the count stays true until these messages are committed (the
    -- table's triggers add them to that shard). The locked shard is read as it is once the lock
    -- is held; the others, where completions take themselves off, as of the statement's start,
    -- which can only count completions too late: never more messages than the limit. A resend
    -- of a message stored before takes room too (it is answered as that message). The count is
    -- joined to the rows, not asked for by the first accepted row: a subquery runs when a row
    -- first needs it, after the rows before it went in, and a row inserted before the lock could
    -- make another gateway's batch, holding the lock and inserting the same client message id,
    -- wait for this one: a deadlock.
    IF cardinality(m_client) > 0 THEN
        RETURN QUERY
            WITH admission AS MATERIALIZED (
                SELECT accepted FROM in_flight
                WHERE shard = 0 AND max_in_flight IS NOT NULL FOR UPDATE),
            room AS MATERIALIZED (
                SELECT CASE WHEN max_in_flight IS NOT NULL THEN
                    max_in_flight - (SELECT accepted FROM admission)
                        - (SELECT COALESCE(SUM(accepted), 0) FROM in_flight WHERE shard > 0)
                    END AS places),
            given AS MATERIALIZED (
                SELECT u."position", nextval(message_ids) AS new_id,
                    (max_in_flight IS NULL OR u.status <> 'accepted'
                        OR COUNT(*) FILTER (WHERE u.status = 'accepted')
                            OVER (ORDER BY u."position") <= room.places) AS may_enter
                FROM room CROSS JOIN UNNEST(m_status) WITH ORDINALITY AS u(status, "position")
                ORDER BY u."position"),
            inserted AS (
                INSERT INTO messages (id, client_id, client_msg_id, message_type, content,
                    filename, mime_type, size_bytes, timezone, status, status_reason,
                    client_timestamp, received_at, admitted_by)
                SELECT g.new_id, m_client[g."position"], m_client_msg_id[g."position"],
                    m_type[g."position"], m_content[g."position"], m_filename[g."position"],
                    m_mime_type[g."position"], m_size[g."position"], m_timezone[g."position"],
                    m_status[g."position"], m_reason[g."position"],
                    m_client_timestamp[g."position"], m_received_at[g."position"], admitted_by
                FROM given AS g WHERE g.may_enter
                ON CONFLICT (client_id, client_msg_id) WHERE client_msg_id IS NOT NULL
                    DO NOTHING
                RETURNING messages.id)
            SELECT 'm'::"char", g."position", g.new_id, NULL::BIGINT, i.id IS NOT NULL,
                g.may_enter
            FROM given AS g LEFT JOIN inserted AS i ON i.id = g.new_id;
    END IF;
END $$;
