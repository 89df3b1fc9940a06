#!/bin/sh
# Enrollment facts of a Linux host as one JSON object on stdout:
# os-release identity, kernel, package manager, time zone, boot id and how to detect a pending
# reboot. POSIX sh and coreutils only, so it runs on any distribution patchdrill enrolls.
set -u

json_string() {
    # Backslashes first, then quotes; newlines cannot occur in the values read below.
    printf '"%s"' "$(printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g' | tr -d '\r\n')"
}

ID="" VERSION_ID="" PRETTY_NAME="" VARIANT=""
for release in /etc/os-release /usr/lib/os-release; do
    if [ -r "$release" ]; then
        # os-release is specified to be shell-compatible assignments.
        . "$release"
        break
    fi
done

package_manager=""
reboot_detection=""
if command -v apt-get >/dev/null 2>&1; then
    package_manager="apt" reboot_detection="reboot-required-file"
elif command -v dnf >/dev/null 2>&1; then
    package_manager="dnf" reboot_detection="needs-restarting"
elif command -v yum >/dev/null 2>&1; then
    package_manager="yum" reboot_detection="needs-restarting"
elif command -v zypper >/dev/null 2>&1; then
    package_manager="zypper" reboot_detection="zypper-exit-code"
fi

timezone=""
if command -v timedatectl >/dev/null 2>&1; then
    timezone=$(timedatectl show -p Timezone --value 2>/dev/null || true)
fi
if [ -z "$timezone" ] && [ -r /etc/timezone ]; then
    timezone=$(head -n 1 /etc/timezone)
fi
if [ -z "$timezone" ] && [ -L /etc/localtime ]; then
    timezone=$(readlink /etc/localtime | sed -n 's|.*zoneinfo/||p')
fi
[ -n "$timezone" ] || timezone="UTC"

boot_id=$(cat /proc/sys/kernel/random/boot_id 2>/dev/null || true)

printf '{'
printf '"os_family": "linux", '
printf '"os_id": %s, ' "$(json_string "$ID")"
printf '"os_name": %s, ' "$(json_string "$PRETTY_NAME")"
printf '"os_version": %s, ' "$(json_string "$VERSION_ID")"
printf '"variant": %s, ' "$(json_string "$VARIANT")"
printf '"kernel": %s, ' "$(json_string "$(uname -r)")"
printf '"package_manager": %s, ' "$(json_string "$package_manager")"
printf '"reboot_detection": %s, ' "$(json_string "$reboot_detection")"
printf '"timezone": %s, ' "$(json_string "$timezone")"
printf '"boot_id": %s' "$(json_string "$boot_id")"
printf '}\n'
