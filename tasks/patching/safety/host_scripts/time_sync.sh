# Which time-sync service runs on this host and whether it says the clock is synchronised,
# one key=value a line (read by tasks/patching/safety/clock.py). Reads only; a tool that is
# missing or fails prints nothing.
if command -v systemctl >/dev/null 2>&1; then
    for unit in chrony chronyd systemd-timesyncd ntpsec ntp ntpd; do
        state=$(systemctl is-active "$unit" 2>/dev/null)
        [ -n "$state" ] && echo "unit.$unit=$state"
    done
fi
if command -v chronyc >/dev/null 2>&1; then
    # -c: comma-separated; the 14th field is the leap status ("Normal" once synchronised).
    echo "chrony.leap=$(chronyc -c tracking 2>/dev/null | cut -d, -f14)"
fi
if command -v timedatectl >/dev/null 2>&1; then
    echo "timedatectl.synchronized=$(timedatectl show -p NTPSynchronized --value 2>/dev/null)"
fi
exit 0
