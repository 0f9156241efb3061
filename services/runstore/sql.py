"""Every statement of the run store, for one database (the schema: migrations/all/).

All of them run under READ COMMITTED (Postgres' default), which their concurrency arguments rely
on: each statement sees rows committed before it started, ON CONFLICT waits for a conflicting
insert in flight and then skips, and an UPDATE that waited for a row lock re-checks its WHERE
clause against the row's newest version. See docs/runstore.md.

Statements that take many rows take one array per column (`unnest`), so a list of any length is
one statement. A data-modifying CTE that must run after another reads it (`WHERE (SELECT
count(*) FROM earlier) >= 0`): Postgres runs a CTE when it is first read.
"""

from __future__ import annotations

# Run statuses, as stored (the proto enum names without RUN_STATUS_).
FINAL_RUN_STATUSES = (
    "COMPLETED_SUCCESSFULLY",
    "COMPLETED_WITH_ERRORS",
    "SYSTEM_FAILURE",
    "CANCELED",
    "EXPIRED",
)
# A run in one of these holds its idempotency key; one created final (pre-failed, cancelled)
# never claims it, so a retry with the key can run.
CLAIMING_RUN_STATUSES = ("PENDING", "QUEUED", "DELAYED")


def _in(values: tuple[str, ...]) -> str:
    return "(" + ", ".join(f"'{v}'" for v in values) + ")"


_FINAL = _in(FINAL_RUN_STATUSES)
_CLAIMING = _in(CLAIMING_RUN_STATUSES)

# RunRow's fields in order, with the SQL type of their array parameter (tags travel as one JSON
# array per run: a text[][] must be rectangular).
RUN_INPUT_FIELDS = (
    ("id", "text"),
    ("environment_id", "text"),
    ("organization_id", "text"),
    ("project_id", "text"),
    ("task_identifier", "text"),
    ("status", "text"),
    ("payload", "bytea"),
    ("payload_type", "text"),
    ("metadata", "text"),
    ("metadata_type", "text"),
    ("tags", "text"),
    ("queue", "text"),
    ("concurrency_key", "text"),
    ("idempotency_key", "text"),
    ("idempotency_key_expires_at", "timestamptz"),
    ("ttl_ms", "bigint"),
    ("delay_until", "timestamptz"),
    ("max_attempts", "integer"),
    ("machine_preset", "text"),
    ("lock_to_version", "text"),
    ("worker_version", "text"),
    ("priority_ms", "bigint"),
    ("is_test", "boolean"),
    ("options", "jsonb"),
    ("parent_run_id", "text"),
    ("root_run_id", "text"),
    ("resume_parent_on_completion", "boolean"),
    ("error_code", "text"),
    ("error_message", "text"),
    ("created_at", "timestamptz"),
)

RUN_COLUMNS = (
    "id, environment_id, organization_id, project_id, task_identifier, status, payload,"
    " payload_type, metadata, metadata_type, tags, queue, concurrency_key, idempotency_key,"
    " idempotency_key_expires_at, ttl_ms, delay_until, max_attempts, machine_preset,"
    " lock_to_version, worker_version, priority_ms, is_test, options, batch_id, batch_index,"
    " parent_run_id, root_run_id, resume_parent_on_completion, error_code, error_message, output,"
    " output_type, created_at, updated_at, completed_at, queue_timestamp, waitpoint_id"
)
_R_RUN_COLUMNS = ", ".join("r." + c.strip() for c in RUN_COLUMNS.split(","))

BATCH_COLUMNS = (
    "id, environment_id, organization_id, project_id, status, run_count, accepted_count,"
    " failed_item_count, sealed, sealed_at, processing_started_at, processing_completed_at,"
    " successful_run_count, failed_run_count, completed_run_count, idempotency_key,"
    " parent_run_id, resume_parent_on_completion, waitpoint_id, task_identifiers, aborted_reason,"
    " error_message, created_at, updated_at"
)

WAITPOINT_COLUMNS = (
    "id, environment_id, status, batch_id, run_id, output_is_error, output, output_type,"
    " completed_at, created_at"
)


def _unnest(first_param: int, leading: tuple[tuple[str, str], ...] = ()) -> str:
    """`(SELECT <fields>, ord FROM unnest($n::t[], ...) WITH ORDINALITY AS ...) AS input` over
    leading + run fields: one array parameter per field, then one scalar parameter per field,
    in the same order. A field whose every row holds one value (a default, or the chunk's
    environment, task, queue...) travels as a NULL array (unnest pads it with NULLs) and that
    value as its scalar, which coalesce puts back: one value to encode and decode instead of
    one per row. A field sent as an array has a NULL scalar."""
    fields = leading + RUN_INPUT_FIELDS
    arrays = ", ".join(f"${first_param + n}::{t}[]" for n, (_, t) in enumerate(fields))
    names = ", ".join(name for name, _ in fields)
    scalar = first_param + len(fields)
    columns = ", ".join(
        f"coalesce(u.{name}, ${scalar + n}::{t}) AS {name}" for n, (name, t) in enumerate(fields)
    )
    source = f"unnest({arrays}) WITH ORDINALITY AS u({names}, ord)"
    return f"(SELECT {columns}, u.ord FROM {source}) AS input"


_INSERT_RUN_COLUMNS = (
    "id, environment_id, organization_id, project_id, task_identifier, status, payload,"
    " payload_type, metadata, metadata_type, tags, queue, concurrency_key, idempotency_key,"
    " idempotency_key_expires_at, ttl_ms, delay_until, max_attempts, machine_preset,"
    " lock_to_version, worker_version, priority_ms, is_test, options, parent_run_id, root_run_id,"
    " resume_parent_on_completion, error_code, error_message, created_at, updated_at,"
    " completed_at, ttl_expires_at, queue_timestamp"
)

_CREATED_AT = "coalesce(i.created_at, now())"


def _insert_run_values(owner: str, queue_timestamp: str = _CREATED_AT) -> str:
    """The values of _INSERT_RUN_COLUMNS from a row `i` of _unnest; environment, organization
    and project from `owner` (`i`, or the batch a run is created for). The TTL counts from the
    creation time (a drained run's is its caller's)."""
    return f"""
    i.id, {owner}.environment_id, {owner}.organization_id, {owner}.project_id, i.task_identifier,
    i.status, i.payload, i.payload_type, i.metadata, i.metadata_type,
    ARRAY(SELECT jsonb_array_elements_text(i.tags::jsonb)), i.queue, i.concurrency_key,
    CASE WHEN i.status IN {_CLAIMING} THEN i.idempotency_key END,
    CASE WHEN i.status IN {_CLAIMING} THEN i.idempotency_key_expires_at END,
    i.ttl_ms, i.delay_until, i.max_attempts, i.machine_preset, i.lock_to_version,
    i.worker_version, i.priority_ms, i.is_test, i.options, i.parent_run_id, i.root_run_id,
    i.resume_parent_on_completion, i.error_code, i.error_message, {_CREATED_AT},
    now(), CASE WHEN i.status IN {_FINAL} THEN now() END,
    {_CREATED_AT} + i.ttl_ms * interval '1 millisecond', {queue_timestamp}
"""


def _run_waitpoint_result(run: str, final: str = "true") -> str:
    """output_is_error, output, output_type of the waitpoint of the run `run` (a row with the
    run's columns) when `final` holds: its output on success, else its error as JSON
    {code, message}; otherwise the columns' defaults (a pending waitpoint)."""
    ok = f"{run}.status = 'COMPLETED_SUCCESSFULLY'"
    error = f"""convert_to(json_build_object(
        'code', coalesce({run}.error_code, {run}.status), 'message', {run}.error_message
    )::text, 'UTF8')"""
    return f"""{final} AND NOT ({ok}),
    CASE WHEN NOT ({final}) THEN NULL WHEN {ok} THEN {run}.output ELSE {error} END,
    CASE WHEN NOT ({final}) THEN '' WHEN {ok} THEN {run}.output_type
        ELSE 'application/json' END"""


def _complete_run_waitpoints(runs: str) -> str:
    """CTE `run_waitpoints_done`: the waitpoints of the runs `runs` (a CTE of runs that just
    became final, with their new columns) complete with each run's output or error."""
    return f"""
run_waitpoints_done AS (
    UPDATE waitpoints w SET (status, completed_at, output_is_error, output, output_type) =
        ('COMPLETED', now(), {_run_waitpoint_result("r")})
    FROM {runs} r
    WHERE w.id = r.waitpoint_id AND w.status = 'PENDING'
    RETURNING w.id
)"""


def _clear_expired_keys(source: str, environment: str) -> str:
    """Releases the expired keys the input rows (`i` in `source`) want: in the same statement
    as the insert, so no concurrent create sees neither the old holder nor the new run."""
    return f"""
    UPDATE runs r SET idempotency_key = NULL, idempotency_key_expires_at = NULL, updated_at = now()
    FROM {source}
    WHERE i.status IN {_CLAIMING}
        AND r.environment_id = {environment} AND r.task_identifier = i.task_identifier
        AND r.idempotency_key = i.idempotency_key AND r.idempotency_key_expires_at < now()
    RETURNING r.id
"""


# -- runs ---------------------------------------------------------------------------------------


# A run becomes final (created final, completed, cancelled, expired): every batch item of it (its
# own, and items of any batch linked to it) counts once, each batch whose last run this was becomes COMPLETED,
# and that batch's waitpoint is completed. One statement, so all of it or none.
def _count_final_items(run_ids: str) -> str:
    """CTEs `items`, `counted`, `waitpoints_done`: every not-yet-final batch item of the runs
    `run_ids` (a subquery) counts once; batches whose last run this was complete."""
    return f"""
items AS (
    UPDATE batch_items SET run_final = true
    WHERE run_id IN ({run_ids}) AND NOT run_final
    RETURNING batch_id
),
counted AS (
    UPDATE batches b SET
        completed_run_count = b.completed_run_count + n.items,
        status = CASE
            WHEN b.sealed AND b.status IN ('PROCESSING', 'PARTIAL_FAILED')
                AND b.completed_run_count + n.items = b.run_count
            THEN 'COMPLETED' ELSE b.status END,
        updated_at = now()
    FROM (SELECT batch_id, count(*)::int AS items FROM items GROUP BY batch_id) n
    WHERE b.id = n.batch_id
    RETURNING b.id, b.status, b.waitpoint_id
),
waitpoints_done AS (
    UPDATE waitpoints w SET status = 'COMPLETED', completed_at = now()
    FROM counted c
    WHERE w.id = c.waitpoint_id AND c.status = 'COMPLETED' AND w.status = 'PENDING'
    RETURNING w.id
)"""


# Any conflict (the id already written: a replay; the key held by a live run) skips the row;
# SELECT_RUNS_FOR_INPUTS then finds what holds it, in a new snapshot. Returns only what the
# database chose (store.created_run builds the rest of the answer from the input row). A run
# written final (pre-failed, cancelled: completed_at set) counts the items linked to it here, in
# the same statement (a buffered run an item linked to, drained final).
# A run resuming its parent (a triggerAndWait child) gets a waitpoint whose body is its own
# (records.created_run answers it), completed at once when the run is created final.
INSERT_RUNS = f"""
WITH input AS (SELECT * FROM {_unnest(1)}),
cleared AS ({_clear_expired_keys("input i", "i.environment_id")}),
inserted AS (
    INSERT INTO runs ({_INSERT_RUN_COLUMNS}, waitpoint_id)
    SELECT {_insert_run_values("i")},
        CASE WHEN i.parent_run_id IS NOT NULL AND i.resume_parent_on_completion THEN i.id END
    FROM input i
    WHERE (SELECT count(*) FROM cleared) >= 0
    ORDER BY i.ord
    ON CONFLICT DO NOTHING
    RETURNING id, environment_id, status, error_code, error_message, output, output_type,
        waitpoint_id, created_at, updated_at, completed_at
),
run_waitpoints AS (
    INSERT INTO waitpoints (id, environment_id, run_id, created_at, status, completed_at,
        output_is_error, output, output_type)
    SELECT r.waitpoint_id, r.environment_id, r.id, r.created_at,
        CASE WHEN r.completed_at IS NULL THEN 'PENDING' ELSE 'COMPLETED' END, r.completed_at,
        {_run_waitpoint_result("r", "r.completed_at IS NOT NULL")}
    FROM inserted r
    WHERE r.waitpoint_id IS NOT NULL
    ON CONFLICT DO NOTHING
),
{_count_final_items("SELECT id FROM inserted WHERE completed_at IS NOT NULL")}
SELECT id, created_at, updated_at, completed_at,
    (extract(epoch FROM created_at) * 1000000)::bigint AS created_at_us
FROM inserted
"""

# For each (id, environment, task, key): the run with that id, else the live run holding the key.
SELECT_RUNS_FOR_INPUTS = f"""
SELECT i.ord, r.*
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])
    WITH ORDINALITY AS i(id, environment_id, task_identifier, idempotency_key, status, ord)
JOIN LATERAL (
    (SELECT {RUN_COLUMNS}, true AS same_id FROM runs WHERE id = i.id)
    UNION ALL
    (SELECT {RUN_COLUMNS}, false FROM runs
     WHERE i.status IN {_CLAIMING} AND environment_id = i.environment_id
        AND task_identifier = i.task_identifier AND idempotency_key = i.idempotency_key)
    LIMIT 1
) r ON true
"""

SELECT_RUN = f"""
SELECT {RUN_COLUMNS} FROM runs WHERE id = $1 AND ($2::text IS NULL OR environment_id = $2)
"""

SELECT_RUN_BY_IDEMPOTENCY_KEY = f"""
SELECT {RUN_COLUMNS} FROM runs
WHERE environment_id = $1 AND task_identifier = $2 AND idempotency_key = $3
    AND (idempotency_key_expires_at IS NULL OR idempotency_key_expires_at >= now())
"""

# Keyset page of a batch's item runs (own or linked), by item index after $2.
SELECT_BATCH_RUNS = f"""
SELECT i.index AS item_index, {_R_RUN_COLUMNS}
FROM batch_items i
JOIN batches b ON b.id = i.batch_id AND ($4::text IS NULL OR b.environment_id = $4)
JOIN runs r ON r.id = i.run_id
WHERE i.batch_id = $1 AND i.index > $2
ORDER BY i.index
LIMIT $3
"""

# The same page with every item: a run of the other database (a link) comes back with NULL run
# columns and its id in item_run_id. No rows when the batch is missing or of another environment.
SELECT_BATCH_ITEM_RUNS = f"""
SELECT i.index AS item_index, i.run_id AS item_run_id, {_R_RUN_COLUMNS}
FROM batch_items i
LEFT JOIN runs r ON r.id = i.run_id
WHERE i.batch_id = $1 AND i.index > $2
    AND EXISTS (SELECT 1 FROM batches b WHERE b.id = $1 AND b.environment_id = $4)
ORDER BY i.index
LIMIT $3
"""

# Item outcomes by index ($4 pre-failed, $5 linked, $6 the others: which kinds to return); a
# pre-failed item's run lives with its batch, so its error code joins in this database.
SELECT_BATCH_ITEM_OUTCOMES = """
SELECT i.index AS item_index, i.run_id, i.linked, i.pre_failed, r.error_code
FROM batch_items i
LEFT JOIN runs r ON i.pre_failed AND r.id = i.run_id
WHERE i.batch_id = $1 AND i.index > $2
    AND (($4 AND i.pre_failed) OR ($5 AND i.linked) OR ($6 AND NOT i.pre_failed AND NOT i.linked))
    AND EXISTS (SELECT 1 FROM batches b WHERE b.id = $1 AND b.environment_id = $7)
ORDER BY i.index
LIMIT $3
"""

SELECT_RUNS_BY_IDS = f"""
SELECT {RUN_COLUMNS} FROM runs WHERE id = ANY($1::text[]) AND environment_id = $2
"""


FINALIZE_RUN = f"""
WITH done AS (
    UPDATE runs SET status = $3, error_code = $4, error_message = $5, output = $6,
        output_type = $7, completed_at = now(), updated_at = now()
    WHERE id = $1 AND ($2::text IS NULL OR environment_id = $2) AND status NOT IN {_FINAL}
    RETURNING {RUN_COLUMNS}
),
{_count_final_items("SELECT id FROM done")},
{_complete_run_waitpoints("done")}
SELECT d.*, (SELECT count(*) FROM waitpoints_done) + (SELECT count(*) FROM run_waitpoints_done)
    AS waitpoints_completed
FROM done d
"""

# TTL expiry (one step of a database's expiry worker): up to $1 runs not started yet whose TTL
# ran out become EXPIRED, counted as final in their batches, their waitpoints completed with the
# error. Conditional and SKIP LOCKED, so correct without the lease (a run being written, e.g.
# linked by an accept, is left for the next step; one that started no longer matches). The run
# keeps its idempotency key, as a cancelled or failed one does (ResetIdempotencyKey frees it).
EXPIRE_RUNS = f"""
WITH due AS (
    SELECT id FROM runs
    WHERE ttl_expires_at < now() AND status IN {_CLAIMING}
    ORDER BY ttl_expires_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
),
done AS (
    UPDATE runs r SET status = 'EXPIRED', error_code = 'TASK_RUN_EXPIRED',
        error_message = format('the run did not start within its TTL of %s ms', r.ttl_ms),
        completed_at = now(), updated_at = now()
    FROM due
    WHERE r.id = due.id AND r.status IN {_CLAIMING}
    RETURNING r.id, r.status, r.error_code, r.error_message, r.output, r.output_type,
        r.waitpoint_id
),
{_count_final_items("SELECT id FROM done")},
{_complete_run_waitpoints("done")}
SELECT id FROM done
"""

# Runs of the OTHER database that are final: the items of this database linked to them count
# now (idempotent: an item already counted is skipped). Used right after such a run completes,
# after an accept that linked to runs not final yet, and by the reaper's link repair.
MARK_LINKED_RUNS_FINAL = f"""
WITH {_count_final_items("SELECT unnest($1::text[])")}
SELECT (SELECT count(*) FROM items) AS items_counted,
    (SELECT count(*) FROM waitpoints_done) AS waitpoints_completed
"""

# Runs of THIS database among $1 that are final: their items not counted yet count now. After an
# accept that linked to runs not final (or not written yet) when it read them, and by the
# reaper's re-check of PROCESSING batches.
COUNT_FINAL_RUNS = f"""
WITH {_count_final_items(f"SELECT id FROM runs WHERE id = ANY($1::text[]) AND status IN {_FINAL}")}
SELECT (SELECT count(*) FROM items) AS items_counted,
    (SELECT count(*) FROM waitpoints_done) AS waitpoints_completed
"""

# A buffered run an item linked to was never written: the drain resolved it to the run holding
# its idempotency key ($2, by position of $1). Its items, in whichever database holds them, link
# to that run (counted afterwards, if it is final, by MARK_LINKED_RUNS_FINAL).
RELINK_ITEMS = """
UPDATE batch_items i SET run_id = m.holder, linked = true
FROM unnest($1::text[], $2::text[]) AS m(old, holder)
WHERE i.run_id = m.old AND NOT i.run_final
"""

# Items linked to a run of the other database that is not final yet (as far as we know), by
# run id after $1: the reaper asks the other database which of them became final. $3 is the
# NEW body shape (kit.ids) and $4 whether the other database is NEW: links within this
# database are counted by the statement that makes their run final and never need the repair,
# so the reaper's pages hold only the other database's runs, however many live links there are.
SELECT_PENDING_LINKS = """
SELECT DISTINCT run_id FROM batch_items
WHERE linked AND NOT run_final AND run_id > $1 AND (run_id ~ $3) = $4
ORDER BY run_id
LIMIT $2
"""

# Which of these runs are final (the other database's side of the link checks).
SELECT_FINAL_RUN_IDS = f"""
SELECT id FROM runs WHERE id = ANY($1::text[]) AND status IN {_FINAL}
"""

# Which of these runs exist here, and whether each is final (the reaper's re-check).
SELECT_RUN_FINALITY = f"""
SELECT id, status IN {_FINAL} AS final FROM runs WHERE id = ANY($1::text[])
"""

# Live (unexpired) holders of (environment, task, key) triples, by input position (1-based):
# a create routed to one database first asks the other one, so a key is unique across both.
SELECT_LIVE_KEY_HOLDERS = f"""
SELECT i.ord, r.*
FROM unnest($1::text[], $2::text[], $3::text[])
    WITH ORDINALITY AS i(environment_id, task_identifier, idempotency_key, ord)
JOIN LATERAL (
    SELECT {RUN_COLUMNS} FROM runs
    WHERE environment_id = i.environment_id AND task_identifier = i.task_identifier
        AND idempotency_key = i.idempotency_key
        AND (idempotency_key_expires_at IS NULL OR idempotency_key_expires_at >= now())
) r ON true
"""

# Serializes creates of these (environment, task, key) triples across both databases: taken in
# a transaction of the LEGACY database around the check of the other database and the insert
# (store.RunStore.key_lock). Sorted, so two creates of overlapping keys never deadlock; the first
# key 0x52554e53 ("RUNS") keeps these apart from other advisory locks of that database.
LOCK_IDEMPOTENCY_KEYS = """
SELECT pg_advisory_xact_lock(1381322323, h) FROM (
    SELECT DISTINCT hashtext(e || chr(31) || t || chr(31) || k) AS h
    FROM unnest($1::text[], $2::text[], $3::text[]) AS u(e, t, k)
    ORDER BY h
) keys
"""

RESET_IDEMPOTENCY_KEY = """
UPDATE runs SET idempotency_key = NULL, idempotency_key_expires_at = NULL, updated_at = now()
WHERE environment_id = $1 AND task_identifier = $2 AND idempotency_key = $3
"""

# New tags are appended in the order given, each once.
ADD_RUN_TAGS = f"""
UPDATE runs r SET
    tags = r.tags || ARRAY(
        SELECT t FROM unnest($3::text[]) WITH ORDINALITY AS n(t, o)
        WHERE t <> ALL(r.tags) GROUP BY t ORDER BY min(o)
    ),
    updated_at = now()
WHERE id = $1 AND ($2::text IS NULL OR environment_id = $2)
RETURNING {RUN_COLUMNS}
"""

UPDATE_RUN_METADATA = f"""
UPDATE runs SET metadata = $3, metadata_type = $4, updated_at = now()
WHERE id = $1 AND ($2::text IS NULL OR environment_id = $2)
RETURNING {RUN_COLUMNS}
"""

# Only a run that is still waiting for its delay can be rescheduled.
RESCHEDULE_RUN = f"""
UPDATE runs SET delay_until = $3, updated_at = now()
WHERE id = $1 AND ($2::text IS NULL OR environment_id = $2) AND status = 'DELAYED'
RETURNING {RUN_COLUMNS}
"""

# -- batches ------------------------------------------------------------------------------------

# The waitpoint a parent waits on is created with its batch (when $10 names one).
INSERT_BATCH = f"""
WITH inserted AS (
    INSERT INTO batches (
        id, environment_id, organization_id, project_id, run_count, idempotency_key,
        task_identifiers, parent_run_id, resume_parent_on_completion, waitpoint_id, created_at
    )
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, coalesce($11, now()))
    ON CONFLICT DO NOTHING
    RETURNING {BATCH_COLUMNS}
),
waitpoint AS (
    INSERT INTO waitpoints (id, environment_id, batch_id, created_at)
    SELECT waitpoint_id, environment_id, id, created_at FROM inserted
    WHERE waitpoint_id IS NOT NULL
    RETURNING id
)
SELECT * FROM inserted
"""

# What made INSERT_BATCH skip: the batch with that id, else the one holding the key.
SELECT_BATCH_FOR_INPUT = f"""
(SELECT {BATCH_COLUMNS}, true AS same_id FROM batches WHERE id = $1)
UNION ALL
(SELECT {BATCH_COLUMNS}, false FROM batches WHERE environment_id = $2 AND idempotency_key = $3)
LIMIT 1
"""

SELECT_BATCH_BY_IDEMPOTENCY_KEY = f"""
SELECT {BATCH_COLUMNS} FROM batches WHERE environment_id = $1 AND idempotency_key = $2
"""

SELECT_BATCH = f"""
SELECT {BATCH_COLUMNS} FROM batches WHERE id = $1 AND ($2::text IS NULL OR environment_id = $2)
"""

SELECT_WAITPOINT = f"""
SELECT {WAITPOINT_COLUMNS} FROM waitpoints
WHERE id = $1 AND ($2::text IS NULL OR environment_id = $2)
"""

# A batch's runs dequeue in index order, however the items arrived.
_BATCH_QUEUE_TIMESTAMP = "b.created_at + i.index * interval '1 millisecond'"

# existing_final: the linked run lives in the OTHER database and was final when the caller read
# it there (this database cannot see it).
_ITEM_FIELDS = (("index", "integer"), ("existing_run_id", "text"), ("existing_final", "boolean"))

# A chunk of items: item rows first (ON CONFLICT DO NOTHING: an index present, or being written
# by a concurrent chunk, is skipped, so no index is ever written twice), then runs for exactly the
# items this statement inserted, then the batch's counters, bumped by what was inserted. The
# counter update reads new_runs so it runs last: the batch row is locked only at the very end.
# Returns no row when the batch is missing, of another environment, sealed or not PENDING (also
# when that changed while the statement ran): the caller then rolls back.
# A linked run is read FOR SHARE: completing it either waits for us, or we wait and see it final.
# key_held: items whose run was skipped because a live run holds its idempotency key
# (LINK_KEY_HOLDERS links them to it).
ACCEPT_BATCH_ITEMS = f"""
WITH batch AS (
    SELECT id, environment_id, organization_id, project_id, run_count, created_at FROM batches
    WHERE id = $1 AND environment_id = $2 AND status = 'PENDING' AND NOT sealed
),
input AS (
    SELECT DISTINCT ON (index) * FROM {_unnest(3, _ITEM_FIELDS)} ORDER BY index, ord
),
linked AS (
    SELECT id, status IN {_FINAL} AS final FROM runs
    WHERE id IN (SELECT existing_run_id FROM input WHERE existing_run_id IS NOT NULL)
    FOR SHARE
),
items AS (
    INSERT INTO batch_items (batch_id, index, run_id, linked, pre_failed, run_final)
    SELECT b.id, i.index, coalesce(i.existing_run_id, i.id), i.existing_run_id IS NOT NULL,
        i.existing_run_id IS NULL AND i.status IN {_FINAL},
        CASE WHEN i.existing_run_id IS NULL THEN i.status IN {_FINAL}
            ELSE coalesce(l.final, i.existing_final, false) END
    FROM input i JOIN batch b ON i.index < b.run_count
    LEFT JOIN linked l ON l.id = i.existing_run_id
    ORDER BY i.index
    ON CONFLICT (batch_id, index) DO NOTHING
    RETURNING index, run_id, linked, pre_failed, run_final
),
cleared AS ({_clear_expired_keys("input i JOIN items it USING (index)", "$2")}),
new_runs AS (
    INSERT INTO runs ({_INSERT_RUN_COLUMNS}, batch_id, batch_index)
    SELECT {_insert_run_values("b", _BATCH_QUEUE_TIMESTAMP)}, b.id, i.index
    FROM input i JOIN items it ON it.index = i.index AND NOT it.linked CROSS JOIN batch b
    WHERE (SELECT count(*) FROM cleared) >= 0
    ORDER BY i.index
    ON CONFLICT (environment_id, task_identifier, idempotency_key)
        WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING batch_index
),
counted AS (
    UPDATE batches SET
        accepted_count = accepted_count + (SELECT count(*) FROM items),
        failed_item_count = failed_item_count + (SELECT count(*) FROM items WHERE pre_failed),
        completed_run_count = completed_run_count + (SELECT count(*) FROM items WHERE run_final),
        updated_at = now()
    WHERE id = $1 AND environment_id = $2 AND status = 'PENDING' AND NOT sealed
        AND (SELECT count(*) FROM new_runs) >= 0
    RETURNING accepted_count, run_count
)
SELECT c.accepted_count, c.run_count,
    ARRAY(SELECT index FROM items ORDER BY index) AS inserted_indexes,
    ARRAY(SELECT run_id FROM items ORDER BY index) AS inserted_run_ids,
    ARRAY(
        SELECT index FROM items WHERE NOT linked
        EXCEPT SELECT batch_index FROM new_runs
    ) AS key_held
FROM counted c
"""

# Items whose own run lost its idempotency key to a live run (e.g. two items of one chunk with
# one key) link to that run instead; counted at once if it is already final.
LINK_KEY_HOLDERS = f"""
WITH wanted AS (
    SELECT * FROM unnest($3::int[], $4::text[], $5::text[]) AS w(index, task_identifier, key)
),
holder AS (
    SELECT w.index, r.id, r.status IN {_FINAL} AS final
    FROM wanted w JOIN runs r ON r.environment_id = $2
        AND r.task_identifier = w.task_identifier AND r.idempotency_key = w.key
    FOR SHARE OF r
),
relinked AS (
    UPDATE batch_items i SET run_id = h.id, linked = true, run_final = h.final
    FROM holder h
    WHERE i.batch_id = $1 AND i.index = h.index
    RETURNING i.index, i.run_id, i.run_final
),
counted AS (
    UPDATE batches SET
        completed_run_count = completed_run_count + (SELECT count(*) FROM relinked WHERE run_final),
        updated_at = now()
    WHERE id = $1
    RETURNING id
)
SELECT r.index, r.run_id FROM relinked r, counted
"""

SELECT_BATCH_ITEMS = """
SELECT index, run_id FROM batch_items WHERE batch_id = $1 AND index = ANY($2::int[])
"""

# Gaps and islands over the (batch_id, index) primary key, in index order: each present index
# followed by a gap opens a missing range [index + 1, next present index (or run_count)); plus
# the range before the first present index. At most $3 ranges (ask for one more than you show).
MISSING_RANGES = """
WITH batch AS (
    SELECT run_count, accepted_count FROM batches
    WHERE id = $1 AND ($2::text IS NULL OR environment_id = $2)
),
gaps AS (
    SELECT 0 AS range_start,
        coalesce((SELECT min(index) FROM batch_items WHERE batch_id = $1), b.run_count)
            AS range_end
    FROM batch b
    UNION ALL
    SELECT i.index + 1, lead(i.index, 1, b.run_count) OVER (ORDER BY i.index)
    FROM batch_items i CROSS JOIN batch b
    WHERE i.batch_id = $1
),
found AS (
    SELECT range_start, range_end FROM gaps WHERE range_end > range_start
    ORDER BY range_start LIMIT $3
)
SELECT b.run_count, b.accepted_count,
    ARRAY(SELECT range_start FROM found ORDER BY range_start) AS starts,
    ARRAY(SELECT range_end FROM found ORDER BY range_start) AS ends
FROM batch b
"""

_EVERY_ITEM_FAILED = "b.run_count > 0 AND b.failed_item_count = b.run_count"

# Sealing: every item has its run by now (accepted_count = run_count), so processing completes in
# the same update. A batch whose runs are all final already (all linked or pre-failed) completes
# at once; one whose every item failed is ABORTED. Either way its waitpoint is completed.
SEAL_BATCH = f"""
WITH sealed AS (
    UPDATE batches b SET
        sealed = true, sealed_at = now(),
        processing_started_at = now(), processing_completed_at = now(),
        successful_run_count = b.run_count - b.failed_item_count,
        failed_run_count = b.failed_item_count,
        status = CASE
            WHEN {_EVERY_ITEM_FAILED} THEN 'ABORTED'
            WHEN b.completed_run_count = b.run_count THEN 'COMPLETED'
            WHEN b.failed_item_count > 0 THEN 'PARTIAL_FAILED'
            ELSE 'PROCESSING' END,
        aborted_reason = CASE WHEN {_EVERY_ITEM_FAILED} THEN 'EVERY_ITEM_FAILED' END,
        error_message = CASE WHEN {_EVERY_ITEM_FAILED} THEN 'every item failed' END,
        updated_at = now()
    WHERE b.id = $1 AND ($2::text IS NULL OR b.environment_id = $2)
        AND NOT b.sealed AND b.status = 'PENDING' AND b.accepted_count = b.run_count
    RETURNING {BATCH_COLUMNS}
),
waitpoint AS (
    UPDATE waitpoints w SET status = 'COMPLETED', completed_at = now(),
        output_is_error = s.status = 'ABORTED',
        output = CASE WHEN s.status = 'ABORTED' THEN convert_to(
            json_build_object('code', 'BATCH_ABORTED', 'message', s.error_message)::text, 'UTF8'
        ) END,
        output_type = CASE WHEN s.status = 'ABORTED' THEN 'application/json' ELSE '' END
    FROM sealed s
    WHERE w.id = s.waitpoint_id AND s.status IN ('COMPLETED', 'ABORTED') AND w.status = 'PENDING'
    RETURNING w.id
)
SELECT s.*, (SELECT count(*) FROM waitpoint) AS waitpoints_completed FROM sealed s
"""

# -- the seal-timeout reaper --------------------------------------------------------------------

# Takes the lease, or renews it for its holder; a row comes back only to the holder.
TAKE_LEASE = """
INSERT INTO runstore_leases AS l (name, holder, expires_at)
VALUES ($1, $2, now() + $3::interval)
ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
    WHERE l.holder = excluded.holder OR l.expires_at < now()
RETURNING holder
"""

RELEASE_LEASE = """
DELETE FROM runstore_leases WHERE name = $1 AND holder = $2
"""


def _fail_waitpoints(batches: str, code: str) -> str:
    """A CTE body: the PENDING waitpoints of `batches` (a CTE returning waitpoint_id and
    error_message) complete with the error `{"code": code, "message": error_message}`."""
    return f"""
    UPDATE waitpoints w SET status = 'COMPLETED', completed_at = now(), output_is_error = true,
        output = convert_to(
            json_build_object('code', '{code}', 'message', b.error_message)::text, 'UTF8'
        ),
        output_type = 'application/json'
    FROM {batches} b
    WHERE w.id = b.waitpoint_id AND w.status = 'PENDING'
    RETURNING w.id
"""


# Aborts up to $2 batches still unsealed $1 after creation and completes their waitpoints with
# the error. Conditional and SKIP LOCKED, so correct even without the lease: a batch being
# written is left for the next step, one aborted already no longer matches.
REAP_UNSEALED_BATCHES = f"""
WITH stale AS (
    SELECT id FROM batches
    WHERE status = 'PENDING' AND NOT sealed AND created_at < now() - $1::interval
    ORDER BY created_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
),
aborted AS (
    UPDATE batches b SET status = 'ABORTED', aborted_reason = 'SEAL_TIMEOUT',
        error_message = format(
            'batch was not sealed within %s of its creation: expected %s items, %s accepted',
            $1::interval, b.run_count, b.accepted_count
        ),
        updated_at = now()
    FROM stale s
    WHERE b.id = s.id AND b.status = 'PENDING' AND NOT b.sealed
    RETURNING b.id, b.waitpoint_id, b.error_message
),
waitpoint AS ({_fail_waitpoints("aborted", "BATCH_SEAL_TIMEOUT")})
SELECT a.id, (SELECT count(*) FROM waitpoint) AS waitpoints_completed FROM aborted a
"""

# -- the PROCESSING re-check --------------------------------------------------------------------

# Takes up to $2 sealed batches still waiting on runs (PROCESSING, PARTIAL_FAILED) whose last
# check (or seal) is older than $1, and stamps them checked: each is re-checked once per $1.
DUE_PROCESSING_BATCHES = """
WITH due AS (
    SELECT id FROM batches
    WHERE sealed AND status IN ('PROCESSING', 'PARTIAL_FAILED')
        AND coalesce(rechecked_at, sealed_at) < now() - $1::interval
    ORDER BY coalesce(rechecked_at, sealed_at)
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE batches b SET rechecked_at = now() FROM due WHERE b.id = due.id
RETURNING b.id
"""

# Of those batches, the uncounted items whose run is final here: they count now (a count that
# was lost or raced). Then, in SELECT_UNRESOLVED_ITEMS, what is left.
REPAIR_BATCH_COUNTS = f"""
WITH {
    _count_final_items(
        "SELECT i.run_id FROM batch_items i JOIN runs r ON r.id = i.run_id"
        f" WHERE i.batch_id = ANY($1::text[]) AND NOT i.run_final AND r.status IN {_FINAL}"
    )
}
SELECT (SELECT count(*) FROM items) AS items_counted,
    (SELECT count(*) FROM waitpoints_done) AS waitpoints_completed
"""

# Uncounted items of those batches whose run is not in this database (a link to the other one,
# or a run never written), at most $2.
SELECT_UNRESOLVED_ITEMS = """
SELECT i.batch_id, i.index, i.run_id FROM batch_items i
WHERE i.batch_id = ANY($1::text[]) AND NOT i.run_final
    AND NOT EXISTS (SELECT 1 FROM runs r WHERE r.id = i.run_id)
ORDER BY i.batch_id, i.index
LIMIT $2
"""

# Batches ($1) with items waiting on runs written nowhere ($2: the message naming them): the
# waitpoint completes with the error, so the parent resumes; the batch keeps its status (a run
# written later still counts) and says why in error_message.
FAIL_STUCK_BATCHES = f"""
WITH stuck AS (
    UPDATE batches b SET error_message = m.message, updated_at = now()
    FROM unnest($1::text[], $2::text[]) AS m(id, message)
    WHERE b.id = m.id AND b.sealed AND b.status IN ('PROCESSING', 'PARTIAL_FAILED')
    RETURNING b.id, b.waitpoint_id, b.error_message
),
waitpoint AS ({_fail_waitpoints("stuck", "BATCH_RUNS_MISSING")})
SELECT s.id, (SELECT count(*) FROM waitpoint) AS waitpoints_completed FROM stuck s
"""
