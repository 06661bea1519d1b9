#!/usr/bin/env bash
# Start (idempotently) a local PostgreSQL on 127.0.0.1:5432 for the storage tests and print ONLY its URL on
# stdout; everything else goes to stderr. `.ci/run` does: AUTOPRUNE_PG_URL=$(bash .ci/postgres.sh)
#
# Works with the Debian package `postgresql` (binaries under /usr/lib/postgresql/<version>/bin):
#   1. a server already answering on 127.0.0.1:5432 is used as is;
#   2. as root with a Debian cluster (pg_lsclusters), that cluster is started with pg_ctlcluster;
#   3. otherwise a private cluster is created in $AUTOPRUNE_PG_DATA (default /var/tmp/autoprune-pg) and
#      started with pg_ctl, owned by `postgres` when run as root, by the current user otherwise.
# Then a role and a database are created if missing (role/password autoprune, database autoprune_test;
# override with AUTOPRUNE_PG_USER, AUTOPRUNE_PG_PASSWORD, AUTOPRUNE_PG_DB).
set -euo pipefail
exec 3>&1 1>&2  # fd 3 is the real stdout: only the URL goes there (closed for the server, which
                 # would otherwise hold the caller's $(...) pipe open forever)

HOST=127.0.0.1
PORT=${AUTOPRUNE_PG_PORT:-5432}
PGU=${AUTOPRUNE_PG_USER:-autoprune}
PGP=${AUTOPRUNE_PG_PASSWORD:-autoprune}
PGD=${AUTOPRUNE_PG_DB:-autoprune_test}
DATA=${AUTOPRUNE_PG_DATA:-/var/tmp/autoprune-pg}

BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$BIN" ] || [ ! -x "$BIN/pg_ctl" ]; then
  echo "postgres.sh: PostgreSQL is not installed (apt-get install postgresql)" >&2
  exit 1
fi
export PATH="$BIN:$PATH"

as_owner() {  # run a command as the cluster's owner
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
ready() { pg_isready -q -h "$HOST" -p "$PORT" >/dev/null 2>&1; }

ADMIN=()  # how to reach the server as a superuser
if ready; then
  echo "postgres.sh: a server already answers on $HOST:$PORT" >&2
elif [ "$(id -u)" = 0 ] && command -v pg_lsclusters >/dev/null && pg_lsclusters -h 2>/dev/null | awk -v p="$PORT" '$3==p {f=1} END {exit !f}'; then
  read -r VER NAME _ < <(pg_lsclusters -h | awk -v p="$PORT" '$3==p {print $1, $2; exit}')
  echo "postgres.sh: starting Debian cluster $VER/$NAME" >&2
  pg_ctlcluster "$VER" "$NAME" start 3>&- || true
else
  if [ ! -s "$DATA/PG_VERSION" ]; then
    echo "postgres.sh: creating a cluster in $DATA" >&2
    mkdir -p "$DATA"
    [ "$(id -u)" = 0 ] && chown postgres:postgres "$DATA"
    chmod 700 "$DATA"
    as_owner initdb -D "$DATA" -U postgres --auth-local=trust --auth-host=scram-sha-256 >/dev/null
  fi
  as_owner pg_ctl -D "$DATA" -l "$DATA/server.log" -w -t 60 \
    -o "-c listen_addresses=$HOST -p $PORT -c unix_socket_directories=$DATA" start 3>&- >/dev/null || true
  ADMIN=(-h "$DATA" -p "$PORT" -U postgres)
fi

for _ in $(seq 1 60); do ready && break; sleep 0.5; done
if ! ready; then
  echo "postgres.sh: PostgreSQL did not come up on $HOST:$PORT" >&2
  exit 1
fi

psql_admin() { as_owner psql "${ADMIN[@]}" -d postgres -v ON_ERROR_STOP=1 -qtAX "$@"; }
if [ "$(psql_admin -c "SELECT 1 FROM pg_roles WHERE rolname = '$PGU'")" != 1 ]; then
  psql_admin -c "CREATE ROLE \"$PGU\" LOGIN PASSWORD '$PGP'"
fi
if [ "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '$PGD'")" != 1 ]; then
  psql_admin -c "CREATE DATABASE \"$PGD\" OWNER \"$PGU\""
fi

echo "postgresql+psycopg2://$PGU:$PGP@$HOST:$PORT/$PGD" >&3
