"""Batch ingest (spec §5): `runops.ingest.v1.BatchIngestService`, the public entry for batches.

Phase 1 creates a batch (run_count bounds, a per-organization token bucket in Redis); Phase 2
streams its items under bounded concurrency, offloads large payloads to the object store and
writes items through the run store. Parts: `settings`, `offload` (object store), `ratelimit`
(token bucket), `retry_rule` (the idempotent-retry rule), `pipeline` (bounded-concurrency engine).
"""
