-- scan-ingest owns: materials, stations, work orders (BOM, routing), lots, inventory, scans and
-- the event log. Consistency rules that must hold under any code path are constraints here.

CREATE TABLE materials (
    number       text PRIMARY KEY,
    description  text NOT NULL DEFAULT '',
    tracking     text NOT NULL CHECK (tracking IN ('lot', 'serial')),
    unit         text NOT NULL DEFAULT 'pcs',
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE stations (
    id          text PRIMARY KEY,
    name        text NOT NULL DEFAULT '',
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE work_orders (
    number             text PRIMARY KEY,
    material           text NOT NULL REFERENCES materials (number),
    planned_quantity   numeric NOT NULL CHECK (planned_quantity > 0),
    status             text NOT NULL CHECK (status IN ('released', 'in_progress', 'completed', 'closed', 'cancelled')),
    produced_quantity  numeric NOT NULL DEFAULT 0 CHECK (produced_quantity >= 0),
    scrap_quantity     numeric NOT NULL DEFAULT 0 CHECK (scrap_quantity >= 0),
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX work_orders_status ON work_orders (status, number);

CREATE TABLE work_order_operations (
    work_order      text NOT NULL REFERENCES work_orders (number) ON DELETE CASCADE,
    step            integer NOT NULL CHECK (step > 0),
    station         text NOT NULL REFERENCES stations (id),
    description     text NOT NULL DEFAULT '',
    status          text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'in_progress', 'completed')),
    good_quantity   numeric NOT NULL DEFAULT 0 CHECK (good_quantity >= 0),
    scrap_quantity  numeric NOT NULL DEFAULT 0 CHECK (scrap_quantity >= 0),
    PRIMARY KEY (work_order, step)
);
CREATE INDEX work_order_operations_station ON work_order_operations (station, work_order);

CREATE TABLE work_order_components (
    work_order         text NOT NULL REFERENCES work_orders (number) ON DELETE CASCADE,
    material           text NOT NULL REFERENCES materials (number),
    quantity_per_unit  numeric NOT NULL CHECK (quantity_per_unit > 0),
    PRIMARY KEY (work_order, material)
);

CREATE TABLE lots (
    lot               text PRIMARY KEY,
    material          text NOT NULL REFERENCES materials (number),
    -- Inventory can never go negative, whatever the code does.
    quantity_on_hand  numeric NOT NULL CHECK (quantity_on_hand >= 0),
    -- Received quantity, or 0 for produced lots (their quantity comes from produce scans).
    initial_quantity  numeric NOT NULL DEFAULT 0 CHECK (initial_quantity >= 0),
    status            text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'on_hold', 'consumed', 'scrapped')),
    location          text NOT NULL DEFAULT '',
    origin_kind       text NOT NULL CHECK (origin_kind IN ('received', 'produced')),
    supplier          text NOT NULL DEFAULT '',
    supplier_lot      text NOT NULL DEFAULT '',
    work_order        text NOT NULL DEFAULT '',
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

-- Scans are never updated or deleted; an undo is a new 'void' scan.
CREATE TABLE scans (
    scan_id       uuid PRIMARY KEY,
    kind          text NOT NULL CHECK (kind IN ('start_operation', 'consume', 'produce', 'complete_operation', 'scrap', 'move', 'inspect', 'void')),
    work_order    text NOT NULL DEFAULT '',
    operation     integer NOT NULL DEFAULT 0,
    station       text NOT NULL DEFAULT '',
    lot           text NOT NULL DEFAULT '',
    material      text NOT NULL DEFAULT '',
    quantity      numeric,
    into_lot      text NOT NULL DEFAULT '',
    location      text NOT NULL DEFAULT '',
    result        text NOT NULL DEFAULT '',
    defect_code   text NOT NULL DEFAULT '',
    scanned_at    timestamptz NOT NULL,
    attributes    text NOT NULL DEFAULT '',
    operator      text NOT NULL,
    device        text NOT NULL DEFAULT '',
    received_at   timestamptz NOT NULL DEFAULT now(),
    -- Hash of the client-supplied content: same id + same hash = duplicate, else conflict.
    content_hash  text NOT NULL,
    voids         uuid REFERENCES scans (scan_id),
    reason        text NOT NULL DEFAULT '',
    traceparent   text NOT NULL DEFAULT ''
);
-- A scan can be voided once.
CREATE UNIQUE INDEX scans_voids ON scans (voids) WHERE voids IS NOT NULL;
CREATE INDEX scans_lot ON scans (lot) WHERE lot <> '';
CREATE INDEX scans_into_lot ON scans (into_lot) WHERE into_lot <> '';
CREATE INDEX scans_work_order ON scans (work_order, operation);

-- The event log. Rows are inserted in the writer's transaction with position NULL; the
-- sequencer assigns gap-free positions in commit order (it only ever sees committed rows, and
-- runs one at a time under the feed_sequencer row lock), so a reader of `position > cursor`
-- never skips an event that committed late.
CREATE TABLE event_log (
    id           bigserial PRIMARY KEY,
    position     bigint UNIQUE,
    kind         text NOT NULL,
    payload      bytea NOT NULL,
    traceparent  text NOT NULL DEFAULT '',
    occurred_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX event_log_unsequenced ON event_log (id) WHERE position IS NULL;

CREATE TABLE feed_sequencer (
    id             integer PRIMARY KEY CHECK (id = 1),
    last_position  bigint NOT NULL
);
INSERT INTO feed_sequencer (id, last_position) VALUES (1, 0);
