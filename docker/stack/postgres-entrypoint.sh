#!/bin/sh
# PostgreSQL of the stack: a cluster in /var/lib/postgresql/data made on first start, with the
# role "toolserver" (password from $POSTGRES_PASSWORD_FILE, a Docker secret) owning the database
# "toolserver"; password logins only, from the stack's network.
set -eu
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | tail -1)
DATA=/var/lib/postgresql/data
PASSWORD=$(head -n1 "${POSTGRES_PASSWORD_FILE:?set POSTGRES_PASSWORD_FILE}")
if [ ! -s "$DATA/PG_VERSION" ]; then
    umask 077
    printf '%s\n' "$PASSWORD" > /tmp/pw
    "$PGBIN/initdb" -D "$DATA" -U toolserver --pwfile=/tmp/pw --auth-local=trust --auth-host=scram-sha-256 -E UTF8
    rm -f /tmp/pw
    echo "host all all 0.0.0.0/0 scram-sha-256" >> "$DATA/pg_hba.conf"
    "$PGBIN/pg_ctl" -D "$DATA" -o "-c listen_addresses='' -k /tmp" -w start
    "$PGBIN/psql" -h /tmp -U toolserver -d postgres -c "CREATE DATABASE toolserver OWNER toolserver"
    "$PGBIN/pg_ctl" -D "$DATA" -m fast -w stop
fi
exec "$PGBIN/postgres" -D "$DATA" -c listen_addresses='*' -k /tmp
