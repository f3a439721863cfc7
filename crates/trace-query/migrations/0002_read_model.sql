-- The read model, built only from scan-ingest's event feed (see src/store/apply.rs). Every
-- table here can be rebuilt by truncating it and replaying the feed from position 0.

CREATE TABLE materials (
    number       text PRIMARY KEY,
    description  text NOT NULL DEFAULT '',
    tracking     text NOT NULL DEFAULT '',
    unit         text NOT NULL DEFAULT ''
);

CREATE TABLE stations (
    id    text PRIMARY KEY,
    name  text NOT NULL DEFAULT ''
);

CREATE TABLE work_orders (
    number            text PRIMARY KEY,
    material          text NOT NULL DEFAULT '',
    planned_quantity  numeric NOT NULL DEFAULT 0,
    status            text NOT NULL DEFAULT ''
);

-- Routing; `completed` follows start/complete scans (used to resolve a scan that names no step
-- the way scan-ingest does: the first unfinished operation at the scan's station).
CREATE TABLE work_order_operations (
    work_order   text NOT NULL,
    step         integer NOT NULL,
    station      text NOT NULL,
    description  text NOT NULL DEFAULT '',
    completed    boolean NOT NULL DEFAULT false,
    PRIMARY KEY (work_order, step)
);

-- Every lot the feed made known: received (with supplier data) or produced (by a work order).
-- `quantity`: the received quantity, or the sum of the active produce scans.
CREATE TABLE lots (
    lot           text PRIMARY KEY,
    material      text NOT NULL DEFAULT '',
    origin        text NOT NULL CHECK (origin IN ('received', 'produced')),
    work_order    text NOT NULL DEFAULT '',
    supplier      text NOT NULL DEFAULT '',
    supplier_lot  text NOT NULL DEFAULT '',
    quantity      numeric NOT NULL DEFAULT 0,
    produced_at   timestamptz
);

-- Every scan (voided ones keep their row, with `voided_by`; voids are rows of kind 'void').
-- `operation` is the routing step, resolved when the scan named none.
CREATE TABLE scans (
    scan_id      uuid PRIMARY KEY,
    position     bigint NOT NULL,
    kind         text NOT NULL,
    work_order   text NOT NULL DEFAULT '',
    operation    integer NOT NULL DEFAULT 0,
    station      text NOT NULL DEFAULT '',
    lot          text NOT NULL DEFAULT '',
    into_lot     text NOT NULL DEFAULT '',
    material     text NOT NULL DEFAULT '',
    quantity     numeric,
    result       text NOT NULL DEFAULT '',
    defect_code  text NOT NULL DEFAULT '',
    operator     text NOT NULL DEFAULT '',
    scanned_at   timestamptz NOT NULL,
    received_at  timestamptz NOT NULL,
    trace_id     text NOT NULL DEFAULT '',
    voids        uuid,
    voided_by    uuid
);
CREATE INDEX scans_lot ON scans (lot);
CREATE INDEX scans_into_lot ON scans (into_lot);
CREATE INDEX scans_work_order ON scans (work_order, kind);
CREATE INDEX scans_scanned_at ON scans (scanned_at);

-- Genealogy: one edge per (consume scan, output lot). Exact edges come from a consume naming
-- `into_lot`; the others from the work order (EPCIS TransformationEvent: each of its consumed
-- lots → each lot it produces, including lots produced later). A void removes its edges.
CREATE TABLE genealogy_edges (
    consume_scan  uuid NOT NULL,
    from_lot      text NOT NULL,
    to_lot        text NOT NULL,
    exact         boolean NOT NULL,
    work_order    text NOT NULL DEFAULT '',
    quantity      numeric NOT NULL DEFAULT 0,
    station       text NOT NULL DEFAULT '',
    operator      text NOT NULL DEFAULT '',
    at            timestamptz NOT NULL,
    PRIMARY KEY (consume_scan, to_lot)
);
CREATE INDEX genealogy_edges_to ON genealogy_edges (to_lot, from_lot);
CREATE INDEX genealogy_edges_from ON genealogy_edges (from_lot, to_lot);

-- Production per hour (of `scanned_at`, UTC), station, material and work order: whole hours of
-- a report come from here, the partial hours at its ends from `scans`.
CREATE TABLE production_hourly (
    hour        timestamptz NOT NULL,
    station     text NOT NULL,
    material    text NOT NULL,
    work_order  text NOT NULL,
    good        numeric NOT NULL DEFAULT 0,
    scrap       numeric NOT NULL DEFAULT 0,
    scans       bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (hour, station, material, work_order)
);
