-- Finding a free client slot must not walk past every taken one: with tens of thousands of
-- clients connected, a new connection would scan them all. Free slots have an index of their
-- own (a gateway that dies has its slots freed by the others once its lease runs out), and a
-- gateway finds its own rows by gateway id when it renews its lease or leaves.
CREATE INDEX client_slots_free ON client_slots (slot) WHERE gateway_id IS NULL;
CREATE INDEX client_slots_gateway ON client_slots (gateway_id) WHERE gateway_id IS NOT NULL;
