-- The gateway's own database: who may log in, with which roles, and which tablets are enrolled
-- at which station.

CREATE TABLE users (
    username      text PRIMARY KEY CHECK (username ~ '^[A-Za-z0-9._@-]{1,64}$'),
    -- PHC string of an argon2id hash; never the password.
    password_hash text NOT NULL,
    roles         text[] NOT NULL CHECK (
                      cardinality(roles) > 0
                      AND roles <@ ARRAY['operator', 'supervisor', 'quality', 'planner', 'admin']::text[]),
    active        boolean NOT NULL DEFAULT true,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE devices (
    device_id   text PRIMARY KEY CHECK (device_id ~ '^[A-Za-z0-9._:/#+-]{1,64}$'),
    -- The station this device is bound to (stations are owned by scan-ingest).
    station     text NOT NULL CHECK (station ~ '^[A-Za-z0-9._:/#+-]{1,64}$'),
    active      boolean NOT NULL DEFAULT true,
    enrolled_at timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
