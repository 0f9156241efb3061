-- Run-store data model (spec §3): runs, batches, batch items, waitpoints, and the reaper lease.
-- One schema, applied to both databases (LEGACY rows in the control-plane database, NEW rows in
-- the run-ops database). Ids are friendly-id bodies; the friendly id is "<prefix>_" || id.
-- Constraint and index names are stable: a unique violation reports its name to clients.
-- Status texts are the proto enum names without their prefix (RUN_STATUS_, BATCH_STATUS_, ...).

CREATE TABLE batches (
    id text PRIMARY KEY,
    environment_id text NOT NULL,
    organization_id text NOT NULL,
    project_id text NOT NULL,
    status text NOT NULL DEFAULT 'PENDING',
    run_count integer NOT NULL,
    -- Batch-item rows written so far; bumped by the statement that writes them.
    accepted_count integer NOT NULL DEFAULT 0,
    -- Accepted items whose run was written pre-failed (becomes failed_run_count at seal).
    failed_item_count integer NOT NULL DEFAULT 0,
    sealed boolean NOT NULL DEFAULT false,
    sealed_at timestamptz,
    processing_started_at timestamptz,
    processing_completed_at timestamptz,
    successful_run_count integer NOT NULL DEFAULT 0,
    failed_run_count integer NOT NULL DEFAULT 0,
    -- Items whose run reached a final status.
    completed_run_count integer NOT NULL DEFAULT 0,
    idempotency_key text,
    parent_run_id text,
    resume_parent_on_completion boolean NOT NULL DEFAULT false,
    waitpoint_id text,
    task_identifiers text[] NOT NULL DEFAULT '{}',
    aborted_reason text,
    error_message text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT batches_status_check
        CHECK (status IN ('PENDING', 'PROCESSING', 'COMPLETED', 'PARTIAL_FAILED', 'ABORTED')),
    CONSTRAINT batches_counts_check CHECK (
        run_count >= 0
        AND accepted_count BETWEEN 0 AND run_count
        AND failed_item_count BETWEEN 0 AND accepted_count
        AND completed_run_count BETWEEN 0 AND accepted_count
    ),
    CONSTRAINT batches_aborted_reason_check CHECK (
        (status = 'ABORTED') = (aborted_reason IS NOT NULL)
        AND aborted_reason IN ('SEAL_TIMEOUT', 'EVERY_ITEM_FAILED')
    ),
    CONSTRAINT batches_sealed_check CHECK (sealed = (sealed_at IS NOT NULL))
);
-- A replayed CreateBatch finds the batch its key made.
CREATE UNIQUE INDEX batches_environment_idempotency_key
    ON batches (environment_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
-- The seal-timeout reaper: unsealed PENDING batches, oldest first.
CREATE INDEX batches_unsealed_created ON batches (created_at) WHERE status = 'PENDING' AND NOT sealed;

CREATE TABLE runs (
    id text PRIMARY KEY,
    environment_id text NOT NULL,
    organization_id text NOT NULL,
    project_id text NOT NULL,
    task_identifier text NOT NULL,
    status text NOT NULL DEFAULT 'PENDING',
    payload bytea NOT NULL DEFAULT '',
    payload_type text NOT NULL DEFAULT '',
    metadata text NOT NULL DEFAULT '',
    metadata_type text NOT NULL DEFAULT '',
    tags text[] NOT NULL DEFAULT '{}',
    queue text NOT NULL DEFAULT '',
    concurrency_key text NOT NULL DEFAULT '',
    -- NULL when the run holds no key (none given, reset, or cleared after expiry).
    idempotency_key text,
    -- NULL: the key never expires.
    idempotency_key_expires_at timestamptz,
    ttl_ms bigint,
    delay_until timestamptz,
    max_attempts integer NOT NULL DEFAULT 0,
    machine_preset text NOT NULL DEFAULT '',
    lock_to_version text NOT NULL DEFAULT '',
    worker_version text NOT NULL DEFAULT '',
    priority_ms bigint NOT NULL DEFAULT 0,
    is_test boolean NOT NULL DEFAULT false,
    -- The trigger options no column above holds (debounce, one-time-use token), as given.
    options jsonb NOT NULL DEFAULT '{}',
    -- The batch this run was created for, and its item index there.
    batch_id text REFERENCES batches (id),
    batch_index integer,
    parent_run_id text,
    root_run_id text,
    resume_parent_on_completion boolean NOT NULL DEFAULT false,
    error_code text,
    error_message text NOT NULL DEFAULT '',
    output bytea,
    output_type text NOT NULL DEFAULT '',
    -- Caller-given for a drained run (it keeps the creation time its caller was shown).
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    completed_at timestamptz,
    CONSTRAINT runs_status_check CHECK (status IN (
        'PENDING', 'QUEUED', 'DELAYED', 'EXECUTING', 'COMPLETED_SUCCESSFULLY',
        'COMPLETED_WITH_ERRORS', 'SYSTEM_FAILURE', 'CANCELED', 'EXPIRED'
    )),
    CONSTRAINT runs_batch_check CHECK ((batch_id IS NULL) = (batch_index IS NULL)),
    CONSTRAINT runs_batch_index_check CHECK (batch_index >= 0)
);
-- Idempotency: one run holds a key per (environment, task). Expired holders are cleared (key set
-- NULL) by the create that replaces them, in the same statement.
CREATE UNIQUE INDEX runs_idempotency_key
    ON runs (environment_id, task_identifier, idempotency_key) WHERE idempotency_key IS NOT NULL;
-- A batch index has at most one run created for it (batch_items is the primary guard).
CREATE UNIQUE INDEX runs_batch_index_key ON runs (batch_id, batch_index) WHERE batch_id IS NOT NULL;

CREATE TABLE batch_items (
    batch_id text NOT NULL REFERENCES batches (id),
    index integer NOT NULL,
    -- The run created for the item, or the existing run it links to (maybe in the other
    -- database, so no foreign key).
    run_id text NOT NULL,
    linked boolean NOT NULL DEFAULT false,
    pre_failed boolean NOT NULL DEFAULT false,
    -- The run reached a final status and the batch's completed_run_count counts it.
    run_final boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT batch_items_pkey PRIMARY KEY (batch_id, index),
    CONSTRAINT batch_items_index_check CHECK (index >= 0)
);
-- Completion: every item (own or linked) whose run just became final.
CREATE INDEX batch_items_run ON batch_items (run_id) WHERE NOT run_final;

CREATE TABLE waitpoints (
    id text PRIMARY KEY,
    environment_id text NOT NULL,
    status text NOT NULL DEFAULT 'PENDING',
    batch_id text REFERENCES batches (id),
    run_id text,
    output_is_error boolean NOT NULL DEFAULT false,
    output bytea,
    output_type text NOT NULL DEFAULT '',
    completed_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT waitpoints_status_check CHECK (status IN ('PENDING', 'COMPLETED')),
    CONSTRAINT waitpoints_completed_check CHECK ((status = 'COMPLETED') = (completed_at IS NOT NULL))
);
CREATE INDEX waitpoints_batch ON waitpoints (batch_id) WHERE batch_id IS NOT NULL;
CREATE INDEX waitpoints_run ON waitpoints (run_id) WHERE run_id IS NOT NULL;

-- Background jobs of the run store that only one process may run at a time (the seal-timeout
-- reaper), per database: a holder owns the row until expires_at.
CREATE TABLE runstore_leases (
    name text PRIMARY KEY,
    holder text NOT NULL,
    expires_at timestamptz NOT NULL
);
