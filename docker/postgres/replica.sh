#!/bin/sh
# Entrypoint of a streaming replica (docker/compose.yaml, shard2-replica), run as the
# postgres user. The first time, when its data directory is empty, it copies the primary
# with pg_basebackup (which also writes the standby's recovery settings), through a
# replication slot so that the primary keeps the WAL the replica has not received yet. Then,
# and on every later start, it hands over to the postgres image's own entrypoint, which finds
# the data directory and starts the server as a hot standby.
#
#   PRIMARY_HOST, REPLICATION_USER, REPLICATION_PASSWORD, REPLICATION_SLOT
set -eu

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    export PGPASSWORD="$REPLICATION_PASSWORD"
    until pg_isready -q -h "$PRIMARY_HOST" -U "$REPLICATION_USER" -d postgres; do
        echo "replica: waiting for $PRIMARY_HOST" >&2
        sleep 1
    done
    # The slot outlives a replica whose volume was removed: reuse it then.
    exists=$(psql -X -A -t -h "$PRIMARY_HOST" -U "$REPLICATION_USER" -d postgres \
        -c "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '$REPLICATION_SLOT'")
    create_slot="--create-slot"
    if [ "$exists" = "1" ]; then
        create_slot=""
    fi
    echo "replica: copying $PRIMARY_HOST with pg_basebackup" >&2
    # shellcheck disable=SC2086  # create_slot is one option or none
    pg_basebackup -h "$PRIMARY_HOST" -U "$REPLICATION_USER" -D "$PGDATA" \
        --wal-method=stream --write-recovery-conf --checkpoint=fast \
        --slot="$REPLICATION_SLOT" $create_slot
    chmod 0700 "$PGDATA"
fi

exec docker-entrypoint.sh "$@"
