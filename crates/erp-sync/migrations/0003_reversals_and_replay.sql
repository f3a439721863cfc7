-- Reversals of confirmed scans share the outbox with confirmations: `kind` tells them apart.
ALTER TABLE outbox ADD COLUMN kind text NOT NULL DEFAULT 'confirmation'
    CHECK (kind IN ('confirmation', 'reversal'));

-- Dead letters can be replayed: a replayed one is marked resolved, not deleted (history).
-- Outbound dead letters (entity 'outbox') are outbox rows the ERP refused for good.
ALTER TABLE dead_letters ADD COLUMN resolved_at timestamptz;
ALTER TABLE dead_letters ADD COLUMN resolved_by text NOT NULL DEFAULT '';
CREATE INDEX dead_letters_unresolved ON dead_letters (id) WHERE resolved_at IS NULL;
