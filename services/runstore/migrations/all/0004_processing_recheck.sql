-- The reaper's re-check of sealed batches still waiting on runs (spec §3: a batch-and-wait never
-- waits forever): each is re-checked once per RUNOPS_RUNSTORE_PROCESSING_RECHECK_SECONDS, from
-- its seal on.
ALTER TABLE batches ADD COLUMN rechecked_at timestamptz;
CREATE INDEX batches_processing_recheck ON batches ((coalesce(rechecked_at, sealed_at)))
    WHERE sealed AND status IN ('PROCESSING', 'PARTIAL_FAILED');
