-- The sequencer finds unsequenced events through `event_log_unsequenced` (position IS NULL).
-- The UNIQUE constraint on `position` indexed the NULLs too, so the planner could answer
-- `position IS NULL` with a bitmap scan of that index: it holds an entry for the unsequenced
-- version of every event ever written (until VACUUM), and a bitmap scan never marks dead
-- entries, so each sequencer round visited the heap pages of every event since the last VACUUM
-- (20 ms per round at 100,000 events, growing). Positions are unique among sequenced events
-- only, so the index is partial; readers (`position > $1`) use it as before.
-- On a large existing log this builds the index under a write lock (seconds per million events).
CREATE UNIQUE INDEX event_log_position ON event_log (position) WHERE position IS NOT NULL;
ALTER TABLE event_log DROP CONSTRAINT event_log_position_key;
