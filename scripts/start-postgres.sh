#!/usr/bin/env bash
# Start a throwaway PostgreSQL cluster on 127.0.0.1 for the test suite.
#
#   eval "$(bash scripts/start-postgres.sh)"      # exports POSTGRES_TEST_URL and PGTEST_DIR
#   bash scripts/start-postgres.sh --stop DIR      # stops the cluster started in DIR and deletes it
#
# Needs Debian's `postgresql` package (apt-get install -y postgresql). Runs the server as the
# `postgres` system user when invoked as root (PostgreSQL refuses to run as root). Prints only
# `export ...` lines on stdout; progress goes to stderr.
set -euo pipefail

PG_BIN="${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}"
DB_NAME="${PG_DB_NAME:-quantbot_test}"
DB_USER="${PG_DB_USER:-quantbot}"
DB_PASSWORD="${PG_DB_PASSWORD:-quantbot}"

as_pg() {
  if [ "$(id -u)" = "0" ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

if [ "${1:-}" = "--stop" ]; then
  dir="${2:?usage: start-postgres.sh --stop DIR}"
  as_pg "$PG_BIN/pg_ctl" -D "$dir/data" -m fast -w stop >&2 || true
  rm -rf "$dir"
  exit 0
fi

if [ -z "$PG_BIN" ] || [ ! -x "$PG_BIN/initdb" ]; then
  echo "PostgreSQL binaries not found; install them with: apt-get install -y postgresql" >&2
  exit 1
fi

PORT="${PG_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
DIR="$(mktemp -d /tmp/quantbot-pg.XXXXXX)"
chmod 755 "$DIR"
if [ "$(id -u)" = "0" ]; then chown postgres:postgres "$DIR"; fi

as_pg "$PG_BIN/initdb" -D "$DIR/data" -U postgres --auth=trust --encoding=UTF8 --no-locale >&2
as_pg "$PG_BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 \
  -o "-h 127.0.0.1 -p $PORT -k $DIR -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=100" \
  start >&2
as_pg "$PG_BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -q \
  -c "CREATE ROLE $DB_USER LOGIN CREATEDB PASSWORD '$DB_PASSWORD'" \
  -c "CREATE DATABASE $DB_NAME OWNER $DB_USER" >&2

echo "PostgreSQL ${PG_BIN%/bin} listening on 127.0.0.1:$PORT (data in $DIR)" >&2
echo "export PGTEST_DIR=$DIR"
echo "export POSTGRES_TEST_URL=postgresql+asyncpg://$DB_USER:$DB_PASSWORD@127.0.0.1:$PORT/$DB_NAME"
