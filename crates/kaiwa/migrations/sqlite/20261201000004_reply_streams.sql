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

-- How far each client has acknowledged its stream. An acknowledgement ("everything up to n")
-- then updates only the replies since the last one, however long the client's history, and
-- `resume` without a position finds where to start in one lookup. Replies already recorded
-- delivered (written to a legacy socket, before acknowledgements existed) count as
-- acknowledged.
CREATE TABLE reply_streams (
    client_id    TEXT    PRIMARY KEY,
    acknowledged INTEGER NOT NULL CHECK (acknowledged >= 0)
) WITHOUT ROWID;

INSERT INTO reply_streams (client_id, acknowledged)
SELECT client_id, MAX(seq) FROM replies WHERE delivery = 'delivered' GROUP BY client_id;

-- Resume no longer looks for failed replies: it reads the stream after a position.
DROP INDEX replies_failed;
