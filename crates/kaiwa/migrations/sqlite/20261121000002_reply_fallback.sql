-- A text reply that is kaiwa's stand-in because the language model gave up.
ALTER TABLE replies ADD COLUMN fallback INTEGER NOT NULL DEFAULT 0 CHECK (fallback IN (0, 1));
