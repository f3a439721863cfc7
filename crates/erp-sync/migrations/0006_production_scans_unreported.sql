-- The feed consumer looks for late production among the scans of each batch it applies
-- (`position > $1 AND position <= $2 AND confirmation_key IS NULL AND NOT voided`, see
-- `queue_follow_ups`), and once per leadership below the whole cursor. No index served
-- `position`, so every batch seq-scanned the whole table (14 ms per batch at 100,000 scans,
-- growing all day). Partial like the query: a scan leaves the index once it is reported or
-- voided, so it holds the scans of open operations only.
-- On a large existing table this builds the index under a write lock (about a second per
-- million scans).
CREATE INDEX production_scans_unreported ON production_scans (position)
    WHERE confirmation_key IS NULL AND NOT voided;
