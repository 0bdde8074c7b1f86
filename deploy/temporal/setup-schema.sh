#!/bin/sh
# Create or upgrade Temporal's two schemas on temporal-postgres (compose service temporal-schema,
# image temporalio/admin-tools). Idempotent: on a database already set up, update-schema alone
# runs (and applies whatever a newer Temporal version adds); otherwise the database is created
# if missing, its version table set up, then every versioned script applied.
set -eu
: "${POSTGRES_SEEDS:?}" "${POSTGRES_USER:?}" "${SQL_PASSWORD:?}" "${DB_PORT:=5432}"
SCHEMA_ROOT=/etc/temporal/schema/postgresql/v12

echo "waiting for ${POSTGRES_SEEDS}:${DB_PORT}"
tries=0
until nc -z "${POSTGRES_SEEDS}" "${DB_PORT}"; do
  tries=$((tries + 1))
  [ "$tries" -lt 60 ] || { echo "PostgreSQL did not open its port"; exit 1; }
  sleep 1
done

sqltool() {
  temporal-sql-tool --plugin postgres12 --ep "${POSTGRES_SEEDS}" -p "${DB_PORT}" \
    -u "${POSTGRES_USER}" "$@"
}

setup() {
  db="$1"
  dir="$2"
  if sqltool --db "$db" update-schema -d "$dir"; then
    echo "$db: schema up to date"
    return
  fi
  echo "$db: first setup"
  sqltool --db "$db" create || echo "$db: database exists"
  sqltool --db "$db" setup-schema -v 0.0
  sqltool --db "$db" update-schema -d "$dir"
}

setup temporal "${SCHEMA_ROOT}/temporal/versioned"
setup temporal_visibility "${SCHEMA_ROOT}/visibility/versioned"
echo "Temporal schemas ready"
