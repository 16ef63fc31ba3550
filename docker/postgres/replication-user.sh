#!/bin/sh
# Run once by the postgres image when it creates the primary's data directory
# (/docker-entrypoint-initdb.d): a role that a replica's pg_basebackup and streaming
# replication log in as, with the password from REPLICATION_PASSWORD. The image restarts the
# server after its init scripts, which loads the pg_hba.conf line.
set -e

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
     -v role="$REPLICATION_USER" -v password="$REPLICATION_PASSWORD" <<'SQL'
CREATE ROLE :"role" WITH REPLICATION LOGIN PASSWORD :'password';
SQL
# The image's own last line, "host all all all scram-sha-256", does not cover replication.
echo "host replication $REPLICATION_USER all scram-sha-256" >> "$PGDATA/pg_hba.conf"
