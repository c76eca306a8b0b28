#!/usr/bin/env bash
# Make a Docker Engine answer on this machine: install Debian's docker.io when dockerd is
# missing, start dockerd in the background when `docker info` fails, wait until it answers.
# Compose (for docker-compose.yml and its test) comes along: Debian's docker-compose when neither
# `docker compose` nor `docker-compose` is here; without it only the compose test is skipped.
# gVisor: when Debian's runsc is installed (or can be), it is registered with dockerd as the
# runtime `runsc` (/etc/docker/daemon.json `runtimes.runsc`, with `--network=host`) and dockerd
# reloads its config on SIGHUP, without a restart; `isolation: gvisor` needs it.
# Works as root without systemd (CI, containers, fresh VMs). Idempotent: a no-op when Docker
# already answers.
#
# Environment:
#   DOCKERD_LOG         where dockerd logs (default /var/log/toolserver-dockerd.log)
#   DOCKER_WAIT_SECONDS how long to wait for the daemon (default 60)
#   DOCKER_DAEMON_JSON  dockerd's config file (default /etc/docker/daemon.json)
set -euo pipefail

log() { echo "ensure-docker: $*" >&2; }

DOCKERD_LOG=${DOCKERD_LOG:-/var/log/toolserver-dockerd.log}
WAIT=${DOCKER_WAIT_SECONDS:-60}
SUDO=""
if [ "$(id -u)" != 0 ]; then
    SUDO="sudo"
fi

docker_answers() {
    # `docker version` negotiates the API version, so a newer client talks to an older daemon.
    docker version --format '{{.Server.Version}}' >/dev/null 2>&1
}

ensure_compose() {
    if docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null 2>&1; then
        return 0
    fi
    log "no compose: installing Debian's docker-compose (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    { $SUDO apt-get update -q && $SUDO apt-get install -y -q --no-install-recommends docker-compose; } \
        >/tmp/toolserver-compose-install.log 2>&1 \
        || log "could not install docker-compose (see /tmp/toolserver-compose-install.log); the compose test will skip"
}

has_runsc() {
    docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q '"runsc"'
}

# runsc registered with the running dockerd (installed first when missing); never fatal: without
# it only the gvisor tier is unavailable (its tests skip, saying so).
ensure_runsc() {
    if has_runsc; then
        return 0
    fi
    if ! command -v runsc >/dev/null 2>&1; then
        log "no runsc: installing Debian's runsc (apt-get)"
        export DEBIAN_FRONTEND=noninteractive
        { $SUDO apt-get update -q && $SUDO apt-get install -y -q --no-install-recommends runsc; } \
            >/tmp/toolserver-runsc-install.log 2>&1 \
            || { log "could not install runsc (see /tmp/toolserver-runsc-install.log); the gvisor tier is unavailable"; return 0; }
    fi
    local conf=${DOCKER_DAEMON_JSON:-/etc/docker/daemon.json} runsc
    runsc=$(command -v runsc)
    log "registering $runsc as dockerd's runtime runsc in $conf, then SIGHUP (config reload, no restart)"
    $SUDO mkdir -p "$(dirname "$conf")"
    $SUDO python3 - "$conf" "$runsc" <<'PY'
import json, os, sys
path, runsc = sys.argv[1], sys.argv[2]
conf = {}
if os.path.exists(path) and os.path.getsize(path):
    with open(path) as fh:
        conf = json.load(fh)
conf.setdefault("runtimes", {})["runsc"] = {"path": runsc, "runtimeArgs": ["--network=host"]}
with open(path + ".tmp", "w") as fh:
    json.dump(conf, fh, indent=2)
    fh.write("\n")
os.replace(path + ".tmp", path)
PY
    $SUDO kill -HUP "$(pgrep -xo dockerd)"
    for _ in $(seq 1 20); do
        if has_runsc; then
            log "dockerd lists runtime runsc"
            return 0
        fi
        sleep 0.5
    done
    log "dockerd did not pick up runsc after SIGHUP (see $DOCKERD_LOG); the gvisor tier is unavailable"
}

if command -v docker >/dev/null 2>&1 && docker_answers; then
    log "Docker Engine $(docker version --format '{{.Server.Version}}') answers already"
    ensure_compose
    ensure_runsc
    exit 0
fi

# one of us at a time (two `make test` at once must not start two daemons)
exec 9>/tmp/toolserver-ensure-docker.lock
flock 9
if docker_answers; then
    log "Docker Engine $(docker version --format '{{.Server.Version}}') answers already"
    ensure_compose
    ensure_runsc
    exit 0
fi

if ! command -v dockerd >/dev/null 2>&1; then
    log "dockerd missing: installing Debian's docker.io (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q --no-install-recommends docker.io iptables ca-certificates
fi

if ! docker_answers; then
    if pgrep -x dockerd >/dev/null 2>&1; then
        log "dockerd is running but does not answer yet; waiting"
    else
        # A stale pid file from a killed daemon stops dockerd from starting.
        if [ -f /var/run/docker.pid ] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
            $SUDO rm -f /var/run/docker.pid
        fi
        log "starting dockerd in the background (log: $DOCKERD_LOG)"
        $SUDO mkdir -p "$(dirname "$DOCKERD_LOG")"
        # setsid: the daemon outlives this script and the make/CI step that ran it; it must not
        # inherit the lock (fd 9).
        $SUDO sh -c 'exec setsid nohup dockerd >>"$1" 2>&1 </dev/null 9>&-' sh "$DOCKERD_LOG" 9>&- &
    fi
    for _ in $(seq 1 "$((WAIT * 2))"); do
        if docker_answers; then
            break
        fi
        sleep 0.5
    done
fi

if ! docker_answers; then
    log "Docker Engine did not answer within ${WAIT}s; last lines of $DOCKERD_LOG:"
    tail -n 30 "$DOCKERD_LOG" >&2 || true
    exit 1
fi

# The client (maybe newer than the daemon, e.g. client 28 vs Debian's dockerd 20.10) and
# aiodocker both negotiate the API version; say which one is in use.
log "Docker Engine $(docker version --format '{{.Server.Version}}') answers" \
    "(API $(docker version --format '{{.Server.APIVersion}}'), client $(docker version --format '{{.Client.Version}}'))"
ensure_compose
ensure_runsc
