#!/usr/bin/env bash
# Runs once, from /docker-entrypoint-initdb.d, when the official postgres image initializes an
# empty data directory (after primary-init.sh). Creates the two least-privilege login roles of
# the runops database POSTGRES_DB (the same as shared/runops/localstack/postgres.py ROLES_SQL):
#   - MIGRATOR_USER (runops_migrator): runs the migrations and owns the tables they create;
#   - SERVICE_USER (runops_service): what the services connect as; may only read and write the
#     rows of the migrator's tables and sequences (default privileges), not change the schema.
# Neither is a superuser nor may create databases, roles or replicate. POSTGRES_USER stays the
# cluster's superuser, for operators only.
set -Eeo pipefail  # no -u: the image may source (not execute) this file

: "${MIGRATOR_USER:=runops_migrator}"
: "${SERVICE_USER:=runops_service}"
: "${MIGRATOR_PASSWORD:?MIGRATOR_PASSWORD must be set}"
: "${SERVICE_PASSWORD:?SERVICE_PASSWORD must be set}"

psql -v ON_ERROR_STOP=1 \
    --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v migrator="$MIGRATOR_USER" -v migrator_password="$MIGRATOR_PASSWORD" \
    -v service="$SERVICE_USER" -v service_password="$SERVICE_PASSWORD" <<'SQL'
CREATE ROLE :"migrator" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION
    PASSWORD :'migrator_password';
CREATE ROLE :"service" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION
    PASSWORD :'service_password';
GRANT USAGE, CREATE ON SCHEMA public TO :"migrator";
GRANT USAGE ON SCHEMA public TO :"service";
ALTER DEFAULT PRIVILEGES FOR ROLE :"migrator" IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO :"service";
ALTER DEFAULT PRIVILEGES FOR ROLE :"migrator" IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO :"service";
SQL
