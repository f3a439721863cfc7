-- Follow-ups: production booked after its operation's confirmation is confirmed on its own,
-- naming the confirmation it adds to (NULL: an operation's own confirmation, or a reversal).
ALTER TABLE outbox ADD COLUMN follows text;
-- Delivery is in queue order per work order: the head of each work order's queue.
CREATE INDEX outbox_work_order ON outbox (work_order, id);

-- The scheduler's lease: whoever takes the advisory lock bumps `token` (a fencing token,
-- monotonically increasing), and every outbox change and ERP write of the delivery checks that
-- the token it holds is still the current one (a deposed leader that wakes up is refused).
CREATE TABLE erp_leader (
    id           integer PRIMARY KEY CHECK (id = 1),
    token        bigint NOT NULL,
    holder       text NOT NULL DEFAULT '',
    acquired_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO erp_leader (id, token) VALUES (1, 0);
