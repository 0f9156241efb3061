-- Items linked to a run that is not final yet. A link to a run of the OTHER database is counted
-- when that run completes (the service tells this database), and the reaper re-checks these in
-- case that second write was lost (a crash between the two databases' commits).
CREATE INDEX batch_items_linked_pending ON batch_items (run_id) WHERE linked AND NOT run_final;
