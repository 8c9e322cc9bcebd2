-- Each client's replies form one stream: `seq` numbers them 1, 2, 3... per client id, in the
-- order they were stored, with no gaps. A native client acknowledges replies by their `seq` and
-- resumes after the last one it processed, so a reconnect neither loses nor repeats one.
--
-- Replies stored before this migration are numbered in id order, which is the order they were
-- stored in.

ALTER TABLE replies ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;

UPDATE replies SET seq = numbered.n
FROM (SELECT id, ROW_NUMBER() OVER (PARTITION BY client_id ORDER BY id) AS n FROM replies)
    AS numbered
WHERE numbered.id = replies.id;

-- A stream position names one reply; resume and acknowledgements read ranges of it.
CREATE UNIQUE INDEX replies_client_seq ON replies (client_id, seq);

-- What a client has not acknowledged yet: acknowledgements (cumulative, "everything up to n")
-- and `resume` without a position touch only these rows, however long the client's history.
CREATE INDEX replies_unacknowledged ON replies (client_id, seq) WHERE delivery <> 'delivered';

-- Resume no longer looks for failed replies: it reads the stream after a position.
DROP INDEX replies_failed;
