-- Control-plane data model (spec §2): organizations with flags, projects, runtime environments,
-- API keys (hashes only), background workers with their tasks, and the promoted current worker.

CREATE TABLE organizations (
    id text PRIMARY KEY,
    slug text NOT NULL,
    title text NOT NULL,
    mollifier_enabled boolean NOT NULL DEFAULT false,
    mollifier_shadow_mode boolean NOT NULL DEFAULT false,
    -- Any other named flag: {"name": "value"}.
    extra_flags jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT organizations_slug_key UNIQUE (slug)
);

CREATE TABLE projects (
    id text PRIMARY KEY,
    organization_id text NOT NULL REFERENCES organizations (id),
    slug text NOT NULL,
    name text NOT NULL,
    external_ref text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT projects_organization_slug_key UNIQUE (organization_id, slug),
    CONSTRAINT projects_external_ref_key UNIQUE (external_ref)
);

CREATE TABLE runtime_environments (
    id text PRIMARY KEY,
    project_id text NOT NULL REFERENCES projects (id),
    -- Denormalised from the project: flags and invalidations are per organization.
    organization_id text NOT NULL REFERENCES organizations (id),
    slug text NOT NULL,
    type text NOT NULL CHECK (type IN ('DEVELOPMENT', 'STAGING', 'PREVIEW', 'PRODUCTION')),
    paused boolean NOT NULL DEFAULT false,
    -- The promoted worker of a deployed environment (FK added below: workers reference us).
    current_worker_id text,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT runtime_environments_project_slug_key UNIQUE (project_id, slug)
);

CREATE TABLE api_keys (
    id text PRIMARY KEY,
    environment_id text NOT NULL REFERENCES runtime_environments (id),
    -- sha256 of the key; the key itself is never stored.
    key_hash bytea NOT NULL,
    -- The non-secret start of the key, for display.
    key_prefix text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz,
    CONSTRAINT api_keys_key_hash_key UNIQUE (key_hash)
);
-- At most one live key per environment; rotation revokes the old one in the same transaction.
CREATE UNIQUE INDEX api_keys_live_per_environment
    ON api_keys (environment_id) WHERE revoked_at IS NULL;

CREATE TABLE background_workers (
    id text PRIMARY KEY,
    environment_id text NOT NULL REFERENCES runtime_environments (id),
    version text NOT NULL,
    sdk_version text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT background_workers_environment_version_key UNIQUE (environment_id, version)
);
-- DEVELOPMENT resolves the most recent worker of the environment.
CREATE INDEX background_workers_environment_recent
    ON background_workers (environment_id, created_at DESC, id DESC);

ALTER TABLE runtime_environments
    ADD CONSTRAINT runtime_environments_current_worker_fkey
    FOREIGN KEY (current_worker_id) REFERENCES background_workers (id);

CREATE TABLE background_worker_tasks (
    worker_id text NOT NULL REFERENCES background_workers (id),
    task_identifier text NOT NULL,
    queue text NOT NULL,
    -- NULL: runs of this task never expire while queued.
    default_ttl_ms bigint CHECK (default_ttl_ms > 0),
    max_attempts integer NOT NULL CHECK (max_attempts BETWEEN 1 AND 100),
    machine_preset text NOT NULL,
    PRIMARY KEY (worker_id, task_identifier)
);
