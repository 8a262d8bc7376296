#!/bin/bash
# A streaming replica that bootstraps itself: on first start it clones the primary with pg_basebackup
# (-R writes primary_conninfo and standby.signal), then runs as a hot standby.
set -euo pipefail
: "${PRIMARY_HOST:?}" "${PGPASSWORD:?}"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    until pg_basebackup --host="$PRIMARY_HOST" --port="${PRIMARY_PORT:-5432}" --username=replicator --pgdata="$PGDATA" \
        --write-recovery-conf --slot=replica1 --wal-method=stream --checkpoint=fast --no-password; do
        echo "replica: waiting for the primary at $PRIMARY_HOST"
        rm -rf "${PGDATA:?}"/*
        sleep 1
    done
    chmod 0700 "$PGDATA"
fi
exec postgres -c hot_standby=on
