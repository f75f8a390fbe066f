#!/usr/bin/env bash
# Install the Debian packages the test suite runs as real services, if missing.
#
# The tests start their own instances (their own config files, ports on
# 127.0.0.1, temp paths under pytest's tmp_path), so the packages' system
# daemons must neither run now nor start at boot and take port 80: while
# installing, a policy-rc.d forbids starting them (unless the machine already
# has one), and afterwards every init script and systemd unit the install
# added is stopped and disabled.
#
# Needs root (apt-get) only when something is missing; a machine that has
# every package does nothing.  Usage: tools/install-services.sh (make services).
set -euo pipefail

# One package per word; add to this list only.
PACKAGES="nginx-light haproxy redis-server chromium chromium-driver postgresql"

POLICY=/usr/sbin/policy-rc.d

# The packages of $PACKAGES that are not installed, on one line.
missing_packages() {
    local pkg missing=()
    for pkg in $PACKAGES; do
        if ! dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
            missing+=("$pkg")
        fi
    done
    echo "${missing[*]}"
}

# The services this machine has: init scripts and systemd units, one per line.
list_services() {
    ls /etc/init.d 2>/dev/null || true
    ls /lib/systemd/system 2>/dev/null | sed -n 's/\.service$//p' || true
}

# Forbid starting services until the script exits (removes only a policy it wrote).
forbid_service_starts() {
    if [ ! -e "$POLICY" ]; then
        printf '#!/bin/sh\n# written by tools/install-services.sh while it installs\nexit 101\n' >"$POLICY"
        chmod 755 "$POLICY"
        trap 'rm -f "$POLICY"' EXIT
    fi
}

# Stop and disable each named service (all were added by this install).
disable_services() {
    local name
    for name in "$@"; do
        echo "install-services: stopping and disabling the system daemon '$name'"
        if [ -d /run/systemd/system ]; then
            systemctl disable --now "$name" || true
            continue
        fi
        if [ -x "/etc/init.d/$name" ]; then
            "/etc/init.d/$name" stop >/dev/null 2>&1 || true
            update-rc.d "$name" disable >/dev/null 2>&1 || true
        fi
        if command -v systemctl >/dev/null; then
            systemctl disable "$name" >/dev/null 2>&1 || true  # offline: removes the links
        fi
    done
}

main() {
    local missing=() before added
    read -r -a missing <<<"$(missing_packages)"
    if [ "${#missing[@]}" -eq 0 ]; then
        echo "install-services: already installed: $PACKAGES"
        return 0
    fi
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-services: missing ${missing[*]}; run this script as root" >&2
        return 1
    fi
    echo "install-services: installing ${missing[*]}"
    before=$(list_services | sort -u)
    forbid_service_starts
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
    added=$(comm -13 <(echo "$before") <(list_services | sort -u))
    # shellcheck disable=SC2086  # one word per service
    disable_services $added
}

main "$@"
