#!/bin/sh
# pre_script for backing up a running PostgreSQL cluster's data directory with a point-in-time
# snapshot (snapshot_method: fsfreeze or lvm). Connects with libpq's environment: PGHOST,
# PGPORT, PGUSER (a superuser, or a role with pg_checkpoint and pg_read_all_settings).
#
# Why a snapshot plus CHECKPOINT, and not pg_backup_start/pg_backup_stop: PostgreSQL's manual
# (Backup and Restore, "File System Level Backup") says a frozen snapshot of the volume holding
# the data directory "will work even while the database server is running": the copy starts as
# after a crash and replays its WAL, so it must contain pg_wal, and "you can perform a CHECKPOINT
# before taking the snapshot to reduce recovery time". pg_backup_stop instead returns the
# backup_label only after the copy, which a snapshot-based backup has no place to put back into.
#
# The manual's condition is that the snapshot is one instant of every file the cluster writes:
# this script refuses (exit 1, so the point is not called application-consistent) when pg_wal or
# a tablespace lives on another file system than the data directory.
set -eu

sql() { psql -X -q -A -t -v ON_ERROR_STOP=1 -d "${PGDATABASE:-postgres}" -c "$1"; }

data=$(sql 'SHOW data_directory')
device=$(stat -L -c %d "$data")
for path in "$data/pg_wal" "$data"/pg_tblspc/*; do
    [ -e "$path" ] || continue
    if [ "$(stat -L -c %d "$path")" != "$device" ]; then
        echo "pre-backup: $path is on another file system than $data: one snapshot cannot hold both" >&2
        exit 1
    fi
done
sql 'CHECKPOINT'
echo "pre-backup: checkpoint done in $data"
