#!/usr/bin/env bash
# The part of the official postgres image's entrypoint contract that docker/compose.yaml uses,
# for the air-gapped stand-in (docker/airgap/postgres.Dockerfile):
#   - started as root: owns PGDATA and the socket directory, then re-runs itself as postgres;
#   - an empty PGDATA: initdb with POSTGRES_USER (superuser) / POSTGRES_PASSWORD, UTF-8,
#     local connections trusted and remote ones by scram-sha-256 from anywhere, listening on
#     all addresses; creates POSTGRES_DB; runs /docker-entrypoint-initdb.d/*.sh (executed if
#     executable, else sourced) and *.sql against a temporary server on the Unix socket only;
#   - then execs the command (`postgres -c ...`).
set -Eeo pipefail

: "${PGDATA:=/var/lib/postgresql/data}"
export PGDATA
if [ "${1:0:1}" = "-" ]; then
  set -- postgres "$@"
fi

if [ "$1" = postgres ] && [ "$(id -u)" = 0 ]; then
  mkdir -p "$PGDATA" /var/run/postgresql
  chown -R postgres:postgres "$PGDATA" /var/run/postgresql
  chmod 0700 "$PGDATA"
  exec gosu postgres "${BASH_SOURCE[0]}" "$@"
fi

if [ "$1" = postgres ] && [ ! -s "$PGDATA/PG_VERSION" ]; then
  : "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD must be set}"
  export POSTGRES_USER="${POSTGRES_USER:-postgres}"
  export POSTGRES_DB="${POSTGRES_DB:-$POSTGRES_USER}"
  initdb --username="$POSTGRES_USER" --pwfile=<(printf '%s\n' "$POSTGRES_PASSWORD") \
    --encoding=UTF8 --locale=C.UTF-8 --auth-local=trust --auth-host=scram-sha-256 >/dev/null
  echo "listen_addresses = '*'" >> "$PGDATA/postgresql.conf"
  echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
  pg_ctl --silent --wait --options "-c listen_addresses=''" start
  if [ "$POSTGRES_DB" != postgres ]; then
    psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres --quiet \
      --command "CREATE DATABASE \"$POSTGRES_DB\""
  fi
  for f in /docker-entrypoint-initdb.d/*; do
    case "$f" in
      *.sh)
        echo "entrypoint: running $f"
        if [ -x "$f" ]; then "$f"; else . "$f"; fi ;;
      *.sql)
        echo "entrypoint: running $f"
        psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" -f "$f" ;;
    esac
  done
  pg_ctl --silent --wait --mode fast stop
  echo "entrypoint: initialized $PGDATA"
fi

exec "$@"
