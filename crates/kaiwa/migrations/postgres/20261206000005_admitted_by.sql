-- The gateway that admitted a message. A gateway acks a message once it is committed and
-- publishes its job right after; one that dies in between leaves the message accepted with no
-- job anywhere. Knowing whose it was, the others' sweepers queue such messages again as soon as
-- that gateway's lease has ended, instead of after --requeue-after. NULL for rows from before
-- this column, and from `kaiwa serve`.
ALTER TABLE messages ADD COLUMN admitted_by TEXT COLLATE "C";
