"""The run store: runs, batches, batch items and waitpoints across the LEGACY and NEW databases
(spec §3). `store.RunTables` is the data layer of one database; `sql` holds its statements."""
