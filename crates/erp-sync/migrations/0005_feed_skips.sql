-- Events of the feed that this consumer could not apply (an unknown kind from a newer
-- scan-ingest, an unreadable payload that may carry production) and that an operator decided
-- to pass, with why — the same table and procedure as trace-query's:
--   INSERT INTO feed_skips (consumer, position, reason) VALUES ('erp-sync', 1234, 'ticket 56');
-- The consumer stops in front of such an event until its position is recorded here, then
-- stamps skipped_at when it passes it. Nothing is ever skipped without a row in this table.
CREATE TABLE feed_skips (
    consumer    text NOT NULL,
    position    bigint NOT NULL,
    reason      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    skipped_at  timestamptz,
    PRIMARY KEY (consumer, position)
);

-- The event the consumer is stopped in front of (at position + 1), written with the cursor:
-- any replica's health reads it (NULL: not stalled).
ALTER TABLE feed_cursor
    ADD COLUMN stalled_kind   text,
    ADD COLUMN stalled_reason text,
    ADD COLUMN stalled_since  timestamptz;
