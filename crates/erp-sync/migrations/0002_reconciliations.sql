-- Reconciliation runs: the quantities on which the MES and the ERP disagreed, at that time.
CREATE TABLE reconciliations (
    id           bigserial PRIMARY KEY,
    at           timestamptz NOT NULL DEFAULT now(),
    trigger      text NOT NULL CHECK (trigger IN ('scheduled', 'manual')),
    instance     text NOT NULL,
    differences  integer NOT NULL,
    -- [{"entity", "key", "mes_quantity" (null: unknown to the MES), "erp_quantity"}]
    details      jsonb NOT NULL
);
CREATE INDEX reconciliations_at ON reconciliations (at DESC);
