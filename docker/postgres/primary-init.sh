#!/usr/bin/env bash
# Runs once, from /docker-entrypoint-initdb.d, when the official postgres image initializes an
# empty data directory. Prepares the writer for a streaming replica:
#   - a REPLICATION role (REPLICATION_USER / REPLICATION_PASSWORD),
#   - a physical replication slot (REPLICATION_SLOT) so the writer keeps the WAL the replica
#     still needs (bounded by max_slot_wal_keep_size on the command line),
#   - a pg_hba.conf line allowing replication connections with a password.
# wal_level=replica etc. are set on the server command line (compose.yaml).
set -Eeo pipefail  # no -u: the image may source (not execute) this file

: "${REPLICATION_USER:?REPLICATION_USER must be set}"
: "${REPLICATION_PASSWORD:?REPLICATION_PASSWORD must be set}"
: "${REPLICATION_SLOT:=replica_1}"

psql -v ON_ERROR_STOP=1 \
    --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v repl_user="$REPLICATION_USER" \
    -v repl_password="$REPLICATION_PASSWORD" \
    -v repl_slot="$REPLICATION_SLOT" <<'SQL'
CREATE ROLE :"repl_user" WITH REPLICATION LOGIN PASSWORD :'repl_password';
SELECT pg_create_physical_replication_slot(:'repl_slot')
WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = :'repl_slot');
SQL

# "all" in the database column does not match replication connections: add an explicit line.
echo "host replication ${REPLICATION_USER} all scram-sha-256" >> "$PGDATA/pg_hba.conf"
