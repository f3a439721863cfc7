-- erp-sync owns: sync cursors, pull runs, dead letters, contract-drift records, the feed cursor,
-- the production scans that confirmations are built from, and the outbound confirmation queue.

-- Per entity: the ERP's cursor after the last successful pull, and when that was.
CREATE TABLE sync_cursors (
    entity          text PRIMARY KEY CHECK (entity IN ('materials', 'stations', 'lots', 'work_orders')),
    cursor          text,
    last_pull_at    timestamptz NOT NULL,
    created         bigint NOT NULL DEFAULT 0,
    updated         bigint NOT NULL DEFAULT 0,
    unchanged       bigint NOT NULL DEFAULT 0,
    rejected        bigint NOT NULL DEFAULT 0
);

-- Every pull: who ran it, why, and what it did.
CREATE TABLE pull_runs (
    id            bigserial PRIMARY KEY,
    instance      text NOT NULL,
    trigger       text NOT NULL CHECK (trigger IN ('startup', 'scheduled', 'manual')),
    started_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    status        text NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'succeeded', 'failed')),
    created       integer NOT NULL DEFAULT 0,
    updated       integer NOT NULL DEFAULT 0,
    unchanged     integer NOT NULL DEFAULT 0,
    rejected      integer NOT NULL DEFAULT 0,
    error         text NOT NULL DEFAULT ''
);
CREATE INDEX pull_runs_started ON pull_runs (started_at DESC);

-- Inbound records that could not be used, with why, as received. One row per distinct payload;
-- seeing it again on a later pull counts an occurrence.
CREATE TABLE dead_letters (
    id             bigserial PRIMARY KEY,
    entity         text NOT NULL,
    record_key     text NOT NULL,
    kind           text NOT NULL,
    reason         text NOT NULL,
    payload        jsonb NOT NULL,
    payload_hash   text NOT NULL,
    occurrences    integer NOT NULL DEFAULT 1,
    first_seen_at  timestamptz NOT NULL DEFAULT now(),
    last_seen_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (entity, record_key, payload_hash)
);

-- Interface drift: every kind of departure from the contract seen, per entity and field.
CREATE TABLE contract_drift (
    entity         text NOT NULL,
    kind           text NOT NULL,
    field          text NOT NULL,
    sample_key     text NOT NULL DEFAULT '',
    message        text NOT NULL DEFAULT '',
    occurrences    bigint NOT NULL DEFAULT 1,
    first_seen_at  timestamptz NOT NULL DEFAULT now(),
    last_seen_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (entity, kind, field)
);

-- Position in scan-ingest's event feed, updated in the same transaction as the effects of the
-- events it covers (production scans, outbox rows): each event takes effect exactly once.
CREATE TABLE feed_cursor (
    consumer    text PRIMARY KEY,
    position    bigint NOT NULL CHECK (position >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO feed_cursor (consumer, position) VALUES ('erp-sync', 0);

-- Produce, consume and scrap scans of work orders, until a completed operation confirms them.
CREATE TABLE production_scans (
    scan_id           uuid PRIMARY KEY,
    position          bigint NOT NULL,
    work_order        text NOT NULL,
    operation         integer NOT NULL,
    station           text NOT NULL,
    kind              text NOT NULL CHECK (kind IN ('produce', 'consume', 'scrap')),
    lot               text NOT NULL,
    material          text NOT NULL,
    quantity          numeric NOT NULL CHECK (quantity > 0),
    operator          text NOT NULL,
    scanned_at        timestamptz NOT NULL,
    voided            boolean NOT NULL DEFAULT false,
    -- The confirmation that reported it (NULL: not reported yet).
    confirmation_key  text
);
CREATE INDEX production_scans_open ON production_scans (work_order, operation, station)
    WHERE confirmation_key IS NULL;

-- The outbound queue: confirmations to post to the ERP, in order, each with its idempotency key.
CREATE TABLE outbox (
    id               bigserial PRIMARY KEY,
    idempotency_key  text NOT NULL UNIQUE,
    work_order       text NOT NULL,
    operation        integer NOT NULL,
    payload          jsonb NOT NULL,
    traceparent      text NOT NULL DEFAULT '',
    status           text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_error       text NOT NULL DEFAULT '',
    created_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz
);
CREATE INDEX outbox_pending ON outbox (id) WHERE status = 'pending';

-- Small shared facts about the ERP link (breaker state as the delivering replica sees it).
CREATE TABLE erp_state (
    key         text PRIMARY KEY,
    value       text NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
