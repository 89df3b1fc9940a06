#!/bin/sh
# Point-in-time views of a Linux disk for patchdrill backups, and their removal.
#
#   linux_snapshot.sh probe PATH
#   linux_snapshot.sh lvm-create ID PATH SIZE        lvm-remove ID SNAPSHOT_LV MOUNT_DIR   lvm-check SNAPSHOT_LV
#   linux_snapshot.sh reflink-create ID PATH         reflink-remove ID PATH
#   linux_snapshot.sh freeze ID PATH LIMIT_SECONDS   thaw ID MOUNTPOINT                    freeze-check ID
#
# Output: key=value lines on stdout (read by tasks/backup/snapshot/take.py); errors on stderr.
# Exit codes: 0 done, 1 failed, 2 bad arguments, 3 the view no longer holds (snapshot
# invalidated, filesystem thawed early), 4 the method does not apply to this path.
# Every *-remove/thaw is idempotent: removing what is already gone succeeds.

set -u
# Tests point this elsewhere; on a host it stays on /run, a tmpfs no backup ever freezes.
STATE_DIR=${PATCHDRILL_STATE_DIR:-/run/patchdrill}

fail() { code=$1; shift; echo "linux_snapshot: $*" >&2; exit "$code"; }

check_id() {
    case $1 in
        ''|*[!a-z0-9]*) fail 2 "snapshot id '$1' must be lowercase letters and digits" ;;
    esac
}

check_value() {
    # Values go out as key=value lines: a newline in a path would forge a key.
    case $2 in
        *'
'*) fail 2 "$1 contains a newline" ;;
    esac
}

kind_of() {
    if [ -b "$1" ]; then echo block
    elif [ -f "$1" ]; then echo file
    elif [ -d "$1" ]; then echo directory
    else fail 1 "no such disk path: $1"
    fi
}

# The LV ("vg/lv") a block device is, or nothing.
lv_of_device() {
    command -v lvs >/dev/null 2>&1 || return 0
    lvs --noheadings --separator / -o vg_name,lv_name "$1" 2>/dev/null | tr -d ' '
}

# Sets KIND, REAL, MOUNT, FSTYPE, SOURCE, LV for the path $1.
probe_path() {
    check_value path "$1"
    KIND=$(kind_of "$1") || exit $?
    REAL=$(readlink -f -- "$1")
    if [ "$KIND" = block ]; then
        SOURCE=$REAL
        MOUNT=$(findmnt -n -o TARGET --source "$REAL" 2>/dev/null | head -n 1)
        FSTYPE=$(findmnt -n -o FSTYPE --source "$REAL" 2>/dev/null | head -n 1)
    else
        MOUNT=$(findmnt -n -o TARGET --target "$REAL" | head -n 1)
        FSTYPE=$(findmnt -n -o FSTYPE --target "$REAL" | head -n 1)
        # btrfs reports "/dev/sda2[/subvolume]"; the device is what LVM knows.
        SOURCE=$(findmnt -n -o SOURCE --target "$REAL" | head -n 1 | sed 's/\[.*\]$//')
    fi
    LV=""
    case $SOURCE in /dev/*) LV=$(lv_of_device "$SOURCE") ;; esac
}

cmd_probe() {
    [ $# -eq 1 ] || fail 2 "usage: probe PATH"
    probe_path "$1"
    echo "kind=$KIND"
    echo "real_path=$REAL"
    echo "mount=$MOUNT"
    echo "fstype=$FSTYPE"
    echo "source=$SOURCE"
    echo "lv=$LV"
}

cmd_lvm_create() {
    [ $# -eq 3 ] || fail 2 "usage: lvm-create ID PATH SIZE"
    id=$1; check_id "$id"; size=$3
    probe_path "$2"
    [ -n "$LV" ] || fail 4 "$2 is not on an LVM logical volume (device ${SOURCE:-unknown})"
    vg=${LV%%/*}
    snap="patchdrill-$id"
    # A thin origin takes a thin snapshot (no size; -K because thin snapshots skip activation).
    layout=$(lvs --noheadings -o lv_layout "$LV" 2>/dev/null | tr -d ' ')
    case $layout in
        *thin*) lvcreate -q -s -K -n "$snap" "$LV" >&2 || fail 1 "lvcreate of a thin snapshot of $LV failed" ;;
        *)
            case $size in
                *%*) lvcreate -q -s -n "$snap" -l "$size" "$LV" >&2 || fail 1 "lvcreate -s -l $size of $LV failed" ;;
                *) lvcreate -q -s -n "$snap" -L "$size" "$LV" >&2 || fail 1 "lvcreate -s -L $size of $LV failed" ;;
            esac ;;
    esac
    echo "snapshot_lv=$vg/$snap"
    if [ "$KIND" = block ]; then
        echo "mount_dir="
        echo "read_path=/dev/$vg/$snap"
        return 0
    fi
    mount_dir="$STATE_DIR/snap-$id"
    mkdir -p "$mount_dir" || fail 1 "cannot create $mount_dir"
    # XFS refuses a second filesystem with the same UUID unless told; ext4 replays its
    # journal into the (writable) snapshot device, never into the origin.
    options=ro
    [ "$FSTYPE" = xfs ] && options=ro,nouuid
    if ! mount -o "$options" "/dev/$vg/$snap" "$mount_dir" >&2; then
        lvremove -q -f "$vg/$snap" >&2
        rmdir "$mount_dir" 2>/dev/null
        fail 1 "cannot mount snapshot /dev/$vg/$snap at $mount_dir"
    fi
    relative=${REAL#"$MOUNT"}
    echo "mount_dir=$mount_dir"
    echo "read_path=$mount_dir${relative:+/${relative#/}}"
}

cmd_lvm_remove() {
    [ $# -eq 3 ] || fail 2 "usage: lvm-remove ID SNAPSHOT_LV MOUNT_DIR"
    check_id "$1"
    case $2 in */patchdrill-"$1") ;; *) fail 2 "refusing to remove $2: not patchdrill snapshot $1" ;; esac
    if [ -n "$3" ]; then
        if findmnt -n "$3" >/dev/null 2>&1; then
            umount "$3" >&2 || fail 1 "cannot unmount $3 (still in use?)"
        fi
        rmdir "$3" 2>/dev/null
    fi
    if lvs "$2" >/dev/null 2>&1; then
        lvremove -q -f "$2" >&2 || fail 1 "lvremove $2 failed"
        echo "removed=yes"
    else
        echo "removed=already-gone"
    fi
}

cmd_lvm_check() {
    [ $# -eq 1 ] || fail 2 "usage: lvm-check SNAPSHOT_LV"
    attr=$(lvs --noheadings -o lv_attr "$1" 2>/dev/null | tr -d ' ') || true
    [ -n "$attr" ] || fail 3 "snapshot $1 no longer exists"
    used=$(lvs --noheadings -o snap_percent "$1" 2>/dev/null | tr -d ' ')
    echo "used_percent=$used"
    # The fifth attribute letter is I when a snapshot overflowed and was invalidated.
    case $attr in ????I*) fail 3 "snapshot $1 overflowed (${used}% used) and is invalid: its data cannot be trusted" ;; esac
}

clone_dir() { echo "$(dirname -- "$1")/.patchdrill-snap-$2"; }

cmd_reflink_create() {
    [ $# -eq 2 ] || fail 2 "usage: reflink-create ID PATH"
    id=$1; check_id "$id"
    probe_path "$2"
    [ "$KIND" = file ] || fail 4 "$2 is a $KIND; a reflink clone is taken of one file"
    dir=$(clone_dir "$REAL" "$id")
    mkdir -p "$dir" || fail 1 "cannot create $dir"
    target="$dir/$(basename -- "$REAL")"
    # FICLONE holds both inodes locked while it shares the extents, so the clone is the file at
    # one instant. Freezing first would deadlock: the clone itself writes to this filesystem.
    if ! error=$(cp --reflink=always -- "$REAL" "$target" 2>&1); then
        rm -rf -- "$dir"
        case $error in
            *"not supported"*|*"Invalid cross-device"*|*"Operation not permitted"*)
                fail 4 "$FSTYPE at $MOUNT cannot clone $REAL: $error" ;;
        esac
        fail 1 "cannot clone $REAL: $error"
    fi
    echo "clone_dir=$dir"
    echo "read_path=$target"
}

cmd_reflink_remove() {
    [ $# -eq 2 ] || fail 2 "usage: reflink-remove ID PATH"
    check_id "$1"
    dir=$(clone_dir "$(readlink -f -- "$2")" "$1")
    if [ -e "$dir" ]; then
        rm -rf -- "$dir" || fail 1 "cannot remove $dir"
        echo "removed=yes"
    else
        echo "removed=already-gone"
    fi
}

cmd_freeze() {
    [ $# -eq 3 ] || fail 2 "usage: freeze ID PATH LIMIT_SECONDS"
    id=$1; check_id "$id"; limit=$3
    case $limit in ''|*[!0-9.]*) fail 2 "freeze limit '$limit' must be a number of seconds" ;; esac
    probe_path "$2"
    [ "$KIND" != block ] || fail 4 "$2 is a block device: freeze the filesystem that uses it, or use LVM"
    [ "$MOUNT" != / ] || fail 4 "refusing to freeze the root filesystem: every writer on the host, sshd included, would hang"
    mkdir -p "$STATE_DIR" || fail 1 "cannot create $STATE_DIR"
    rm -f "$STATE_DIR/freeze-$id.thawed"
    echo "$MOUNT" > "$STATE_DIR/freeze-$id.mount"
    fsfreeze --freeze "$MOUNT" || fail 1 "fsfreeze --freeze $MOUNT failed"
    # The safety thaw: if patchdrill never comes back, the host thaws itself after the limit
    # rather than hang its writers forever. It leaves a mark, so the backup can tell.
    # shellcheck disable=SC2016 # the watchdog's own shell expands its positional arguments
    setsid sh -c 'sleep "$1"; fsfreeze --unfreeze "$2" && date -u +%FT%TZ > "$3"' patchdrill-thaw-watchdog \
        "$limit" "$MOUNT" "$STATE_DIR/freeze-$id.thawed" </dev/null >/dev/null 2>&1 &
    echo $! > "$STATE_DIR/freeze-$id.watchdog"
    echo "mount=$MOUNT"
    echo "read_path=$REAL"
}

cmd_freeze_check() {
    [ $# -eq 1 ] || fail 2 "usage: freeze-check ID"
    check_id "$1"
    if [ -f "$STATE_DIR/freeze-$1.thawed" ]; then
        fail 3 "the safety timer thawed the filesystem at $(cat "$STATE_DIR/freeze-$1.thawed") while it was being read"
    fi
    echo "frozen=yes"
}

cmd_thaw() {
    [ $# -eq 2 ] || fail 2 "usage: thaw ID MOUNTPOINT"
    id=$1; check_id "$id"; mount=$2
    watchdog="$STATE_DIR/freeze-$id.watchdog"
    if [ -f "$watchdog" ]; then
        # The watchdog is a session leader (setsid): end its whole group, sleep included.
        kill -- "-$(cat "$watchdog")" 2>/dev/null
        rm -f "$watchdog"
    fi
    if ! error=$(fsfreeze --unfreeze "$mount" 2>&1); then
        # EINVAL means it was not frozen: already thawed, which is what we want.
        case $error in *"Invalid argument"*) ;; *) fail 1 "fsfreeze --unfreeze $mount failed: $error" ;; esac
    fi
    rm -f "$STATE_DIR/freeze-$id.mount"
    if [ -f "$STATE_DIR/freeze-$id.thawed" ]; then
        echo "thawed_early=$(cat "$STATE_DIR/freeze-$id.thawed")"
        rm -f "$STATE_DIR/freeze-$id.thawed"
    fi
    echo "thawed=yes"
}

[ $# -ge 1 ] || fail 2 "usage: linux_snapshot.sh probe|lvm-create|lvm-remove|lvm-check|reflink-create|reflink-remove|freeze|freeze-check|thaw ..."
action=$1; shift
case $action in
    probe) cmd_probe "$@" ;;
    lvm-create) cmd_lvm_create "$@" ;;
    lvm-remove) cmd_lvm_remove "$@" ;;
    lvm-check) cmd_lvm_check "$@" ;;
    reflink-create) cmd_reflink_create "$@" ;;
    reflink-remove) cmd_reflink_remove "$@" ;;
    freeze) cmd_freeze "$@" ;;
    freeze-check) cmd_freeze_check "$@" ;;
    thaw) cmd_thaw "$@" ;;
    *) fail 2 "unknown action '$action'" ;;
esac
