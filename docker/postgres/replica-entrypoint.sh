#!/usr/bin/env bash
# Entrypoint of a streaming read replica built on the official postgres image.
#
# On an empty data directory it waits for the writer, clones it with
#   pg_basebackup -R -X stream -S <slot>
# (-R writes standby.signal and primary_conninfo/primary_slot_name), then starts postgres as a
# hot standby. On later starts the existing data directory is reused and replication resumes.
#
# Environment: PRIMARY_HOST, PRIMARY_PORT (5432), REPLICATION_USER, REPLICATION_PASSWORD,
# REPLICATION_SLOT (replica_1), PGDATA (the image's default). Extra arguments go to postgres.
set -Eeuo pipefail

: "${PRIMARY_HOST:?PRIMARY_HOST must be set}"
: "${PRIMARY_PORT:=5432}"
: "${REPLICATION_USER:?REPLICATION_USER must be set}"
: "${REPLICATION_PASSWORD:?REPLICATION_PASSWORD must be set}"
: "${REPLICATION_SLOT:=replica_1}"
: "${PGDATA:=/var/lib/postgresql/data}"

# The image starts us as root; postgres refuses to run as root. Fix ownership, then re-exec
# this script as the postgres user.
if [ "$(id -u)" = "0" ]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chown -R postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 0700 "$PGDATA"
    exec gosu postgres "$BASH" "$0" "$@"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    echo "replica: waiting for writer ${PRIMARY_HOST}:${PRIMARY_PORT}"
    until pg_isready --quiet --host "$PRIMARY_HOST" --port "$PRIMARY_PORT" \
        --username "$REPLICATION_USER"; do
        sleep 1
    done
    echo "replica: cloning ${PRIMARY_HOST}:${PRIMARY_PORT} with pg_basebackup"
    # A previous attempt may have left a partial copy behind.
    find "$PGDATA" -mindepth 1 -delete
    export PGPASSWORD="$REPLICATION_PASSWORD"
    pg_basebackup \
        --host "$PRIMARY_HOST" --port "$PRIMARY_PORT" --username "$REPLICATION_USER" \
        --pgdata "$PGDATA" \
        --write-recovery-conf --wal-method stream --slot "$REPLICATION_SLOT" \
        --checkpoint fast --no-password --progress
    unset PGPASSWORD
    chmod 0700 "$PGDATA"
    echo "replica: clone complete, starting as hot standby"
fi

exec postgres -c hot_standby=on -c hot_standby_feedback=on "$@"
