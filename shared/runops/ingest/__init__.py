"""The batch ingest service's contract (`v1/`, generated) and, beside it, its client library."""
