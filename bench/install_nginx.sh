#!/usr/bin/env bash
# Install Debian's nginx for the proxy benchmark (bench/proxy.py), unless it is already there.
# The package's service is never started: the benchmark runs its own nginx on a 127.0.0.1 port
# with a config in a temp dir. Needs root (apt-get).
set -euo pipefail

log() { echo "install-nginx: $*" >&2; }

if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
    log "nginx is installed: $(/usr/sbin/nginx -v 2>&1)"
    exit 0
fi
[ "$(id -u)" = 0 ] || { log "nginx is missing and installing it needs root"; exit 1; }

# Keep the package's init script from starting a system nginx on port 80: policy-rc.d exit 101
# means "no service may start". Only add one for the install when the machine has none.
POLICY=/usr/sbin/policy-rc.d
ADDED_POLICY=0
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$POLICY"
    chmod 0755 "$POLICY"
    ADDED_POLICY=1
fi
cleanup() { if [ "$ADDED_POLICY" = 1 ]; then rm -f "$POLICY"; fi; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
log "apt-get update"
apt-get update -q >/dev/null
log "apt-get install nginx"
apt-get install -y -q --no-install-recommends nginx >/dev/null
log "installed: $(/usr/sbin/nginx -v 2>&1)"
