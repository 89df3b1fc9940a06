#!/bin/sh
# Run on a restored copy of a data directory before starting PostgreSQL on it (a drill's start
# step): usage prepare-copy.sh DATA_DIRECTORY.
#
# The copy holds the primary's postmaster.pid and postmaster.opts, which pg_basebackup leaves
# out of its backups for a reason: a server refuses to start while the PID in postmaster.pid is
# alive, and on a DR target (or on the primary's own machine) that PID may well be. Nothing else
# is changed: the server replays the copy's WAL when it starts.
set -eu
data=${1:?usage: prepare-copy.sh DATA_DIRECTORY}
[ -f "$data/PG_VERSION" ] || { echo "prepare-copy: $data is not a PostgreSQL data directory" >&2; exit 1; }
rm -f -- "$data/postmaster.pid" "$data/postmaster.opts"
