#!/bin/sh
# A whole read-only apt assessment in one SSH session: list refresh, upgrade simulation(s) and
# the reboot check, each step's stdout, stderr and exit code framed for
# tasks.patching.linux.parse_assessment_sections. Every session costs the host a process tree
# (and a fork of sshd), so one session instead of five is most of an assessment's host CPU.
#
# It runs after linux_facts.sh in the same shell (patchdrill sends both as one script on stdin),
# so the facts JSON comes first and $package_manager is already known. Hosts with another
# package manager get the facts alone; their commands run one by one from Python.
#
# Arguments, all written by tasks/patching/linux.py so the commands live in one place:
#   $1 marker   start of every frame line
#   $2 refresh  the list refresh command, or "" to read the host's cached lists
#   $3 simulate the upgrade simulation
#   $4 secure   the same simulation preferring security suites
#   $5 suites   extended regular expression for a security suite's archive or codename
#   $6 reboot   the reboot-required check (its exit code is the answer)
set -u

marker=$1 refresh=$2 simulate=$3 secure=$4 suites=$5 reboot=$6

frame() {
    # The blank line keeps the frame on a line of its own after output without a final newline;
    # the parser drops it again.
    printf '\n%s %s %s\n' "$marker" "$1" "$2"
}

[ "$package_manager" = "apt" ] || { frame end 0; exit 0; }

work=$(mktemp -d "${TMPDIR:-/tmp}/patchdrill-assess.XXXXXX") || exit 1
trap 'rm -rf "$work"' EXIT

# step NAME COMMAND: run it, frame its stdout and stderr with its exit code; stop at a failure,
# as the caller would have stopped running commands one by one.
step() {
    sh -c "$2" >"$work/$1.out" 2>"$work/$1.err"
    code=$?
    frame "$1.stdout" "$code"
    cat "$work/$1.out"
    frame "$1.stderr" "$code"
    cat "$work/$1.err"
    if [ "$code" -ne 0 ]; then
        frame end "$code"
        exit 0
    fi
}

# True when a package the simulation upgrades or keeps back has a version from a security suite
# that is newer than the installed one and is not apt's candidate: only then can the
# security-preferring simulation answer differently from the plain one (a superseded security
# fix). `apt-cache policy` lists the package files with their release (a=archive, n=codename)
# and, given packages, each one's version table (newest first, the installed one marked ***).
security_alternative() {
    packages=$(awk '
        /^Inst / { print $2; next }
        /^The following packages have been kept back:/ { kept = 1; next }
        kept && /^  / { for (i = 1; i <= NF; i++) print $i; next }
        { kept = 0 }' "$work/simulation.out" | sort -u)
    [ -n "$packages" ] || return 1
    # shellcheck disable=SC2086 # package names are words without blanks
    { LC_ALL=C apt-cache policy; echo "$marker versions"; LC_ALL=C apt-cache policy $packages; } 2>/dev/null |
    awk -v marker="$marker" -v suites="$suites" '
        function source(line) { sub(/^ *-?[0-9]+ /, "", line); return line }
        $1 == marker && $2 == "versions" { tables = 1; next }
        !tables && /^ *-?[0-9]+ / { file = source($0); next }
        !tables && $1 == "release" {
            sub(/^ *release /, "")
            n = split($0, fields, ",")
            for (i = 1; i <= n; i++)
                if (fields[i] ~ /^[an]=/ && substr(fields[i], 3) ~ suites) security[file] = 1
            next
        }
        !tables { next }
        /^[^ ]/ { candidate = ""; newer = 1; version = ""; next }
        /^  Candidate: / { candidate = $2; next }
        /^ \*\*\* / { newer = 0; next }
        /^     [^ ]/ { version = $1; next }
        /^        [^ ]/ && newer && version != candidate && (source($0) in security) { found = 1 }
        END { exit found ? 0 : 1 }'
}

if [ -n "$refresh" ]; then
    step refresh "$refresh"
fi
step simulation "$simulate"
if security_alternative; then
    step security "$secure"
else
    # Nothing a security suite offers differs from the candidates: the security-preferring
    # simulation would print the plain one's answer.
    frame security.same 0
fi
sh -c "$reboot" >/dev/null 2>&1
frame reboot "$?"
frame end 0
