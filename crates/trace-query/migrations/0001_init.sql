-- trace-query owns a read model built from scan-ingest's event feed. This first migration holds
-- the feed cursor; the projection tables (lots, genealogy edges, timelines, rollups) follow with
-- the projection itself. The cursor is updated in the same transaction as the effects of the
-- events it covers, so every event is applied exactly once.
CREATE TABLE feed_cursor (
    consumer    text PRIMARY KEY,
    position    bigint NOT NULL CHECK (position >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
