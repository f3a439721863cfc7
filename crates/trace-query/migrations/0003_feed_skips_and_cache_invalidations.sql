-- Events of the feed that this consumer could not apply (an unknown kind from a newer
-- scan-ingest, an unreadable payload) and that an operator decided to pass, with why:
--   INSERT INTO feed_skips (consumer, position, reason) VALUES ('trace-query', 1234, 'ticket 56');
-- The projection stops in front of such an event until its position is recorded here, then
-- stamps skipped_at when it passes it. Nothing is ever skipped without a row in this table.
CREATE TABLE feed_skips (
    consumer    text NOT NULL,
    position    bigint NOT NULL,
    reason      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    skipped_at  timestamptz,
    PRIMARY KEY (consumer, position)
);

-- Cache deletions owed by committed projection batches (written in the batch's transaction,
-- deleted once Redis has removed the keys): a replica that crashes between its commit and its
-- deletions, or loses Redis meanwhile, leaves them here, and any replica replays them.
CREATE TABLE cache_invalidations (
    id          bigserial PRIMARY KEY,
    keys        text[] NOT NULL,
    lots        text[] NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
