-- Issue 15: batch order, run waitpoints, TTL expiry (spec §3, docs/runstore.md).

ALTER TABLE runs
    -- When consumers dequeue the run: its created_at, or for a batch's run the batch's created_at
    -- + index milliseconds (a batch dequeues in index order however its items arrived).
    ADD COLUMN queue_timestamp timestamptz,
    -- The waitpoint (body: the run's own) a triggerAndWait child completes for its parent.
    ADD COLUMN waitpoint_id text,
    -- created_at + ttl_ms: a run not started by then is expired (NULL: no TTL).
    ADD COLUMN ttl_expires_at timestamptz;

UPDATE runs r SET queue_timestamp = b.created_at + r.batch_index * interval '1 millisecond'
FROM batches b
WHERE b.id = r.batch_id;
UPDATE runs SET queue_timestamp = created_at WHERE queue_timestamp IS NULL;
UPDATE runs SET ttl_expires_at = created_at + ttl_ms * interval '1 millisecond'
WHERE ttl_ms IS NOT NULL AND status IN ('PENDING', 'QUEUED', 'DELAYED');

ALTER TABLE runs
    ALTER COLUMN queue_timestamp SET DEFAULT now(),
    ALTER COLUMN queue_timestamp SET NOT NULL;

-- The expiry worker: runs not started yet whose TTL ran out, soonest first.
CREATE INDEX runs_ttl_due ON runs (ttl_expires_at)
    WHERE ttl_expires_at IS NOT NULL AND status IN ('PENDING', 'QUEUED', 'DELAYED');
