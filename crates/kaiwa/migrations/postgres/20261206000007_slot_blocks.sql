-- Client slots are held by gateways in blocks (presence/block.rs): a row of `client_slots` with
-- a gateway and no connection is one of that gateway's, handed to its connections without a
-- round trip. A gateway that finds fewer free slots than it asked for marks itself short until
-- then; while any live gateway is short, every gateway gives its spare slots back at its next
-- renewal and keeps none, so that no one is refused while another sits on a spare slot for long.
ALTER TABLE gateways ADD COLUMN short_until TIMESTAMPTZ;
