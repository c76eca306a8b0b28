#!/usr/bin/env bash
# Build the node image (docker/node.Dockerfile) on this machine, with or without a reachable
# registry. A no-op when the image exists and was built from the same sources.
#
#   1. hash the sources (src/, pyproject.toml, the Dockerfile, this script); done if the image
#      carries that hash in its toolserver.source-hash label
#   2. pick the base image: BASE_IMAGE when present or pullable, else toolserver-base:bookworm,
#      made once from Debian packages with mmdebstrap + docker import (no registry needed)
#   3. wheels on the host: toolserver's own, and its dependencies (once per pyproject.toml)
#   4. docker build with the wheels as the context (pip install --no-index inside)
#
# Environment:
#   NODE_IMAGE    tag to build            (default toolserver-node:latest)
#   BASE_IMAGE    preferred base image    (default python:3.11-slim-bookworm)
#   FALLBACK_BASE tag of the Debian base  (default toolserver-base:bookworm)
#   PYTHON        host python for wheels  (default .venv/bin/python, else python3)
#   WHEEL_PYTHON_VERSION  the oldest Python the image may have (default 3.11.2, Debian bookworm)
#   FORCE=1       rebuild even if up to date;  NO_PULL=1  never try to pull BASE_IMAGE
set -euo pipefail
cd "$(dirname "$0")/.."

NODE_IMAGE=${NODE_IMAGE:-toolserver-node:latest}
BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim-bookworm}
FALLBACK_BASE=${FALLBACK_BASE:-toolserver-base:bookworm}
DEBIAN_SUITE=bookworm
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_SECURITY=${DEBIAN_SECURITY:-http://deb.debian.org/debian-security}
HASH_LABEL=toolserver.source-hash
WHEEL_PYTHON_VERSION=${WHEEL_PYTHON_VERSION:-3.11.2}
WHEELS=build/wheels
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

step() { echo "==> node-image: $*" >&2; }
die() { echo "node-image: error: $*" >&2; exit 1; }
image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

docker version --format '{{.Server.Version}}' >/dev/null 2>&1 \
    || die "the Docker Engine does not answer; run 'bash scripts/ensure-docker.sh' (make docker-ready)"

# one build at a time in this tree (several `make test` may run at once)
mkdir -p build
exec 9>build/.node-image.lock
if ! flock -n 9; then
    step "another build of the node image runs in this tree: waiting for it"
    flock 9
fi

# --- 1. up to date?
source_hash() {
    {
        find src -type f ! -path '*/__pycache__/*' ! -name '*.pyc' ! -path '*.egg-info/*' -print0 \
            | LC_ALL=C sort -z | xargs -0 sha256sum
        sha256sum pyproject.toml docker/node.Dockerfile scripts/build-node-image.sh
        echo "base=$BASE_IMAGE fallback=$FALLBACK_BASE python=$WHEEL_PYTHON_VERSION"
    } | sha256sum | cut -c1-32
}
HASH=$(source_hash)
if [ "${FORCE:-0}" != 1 ] && image_exists "$NODE_IMAGE"; then
    current=$(docker image inspect "$NODE_IMAGE" --format "{{ index .Config.Labels \"$HASH_LABEL\" }}" 2>/dev/null || true)
    # the wheels stay in build/wheels for the manager image (docker-compose.yml): they count too
    wheels=$(cat "$WHEELS/.source-hash" 2>/dev/null || true)
    if [ "$current" = "$HASH" ] && [ "$wheels" = "$HASH" ]; then
        step "$NODE_IMAGE is up to date (source hash $HASH)"
        exit 0
    fi
    if [ "$current" = "$HASH" ]; then
        step "$NODE_IMAGE is up to date but $WHEELS is not: rebuilding the wheels (the image build is cached)"
    else
        step "$NODE_IMAGE is stale (built from ${current:-unknown}, sources now $HASH): rebuilding"
    fi
else
    step "building $NODE_IMAGE (source hash $HASH)"
fi

# --- 2. base image
make_debian_base() {
    step "making $FALLBACK_BASE from Debian packages (mmdebstrap, about a minute)"
    if ! command -v mmdebstrap >/dev/null 2>&1; then
        step "installing mmdebstrap (apt-get)"
        [ "$(id -u)" = 0 ] || die "mmdebstrap is missing and installing it needs root"
        DEBIAN_FRONTEND=noninteractive apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends mmdebstrap
    fi
    local tar
    tar=$(mktemp --suffix=.tar)
    # minbase + python3 (3.11 in bookworm), venv, CA certificates, useradd; no docs/man/locales.
    mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates,passwd \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
        "$DEBIAN_SUITE" "$tar" \
        "deb $DEBIAN_MIRROR $DEBIAN_SUITE main" \
        "deb $DEBIAN_MIRROR $DEBIAN_SUITE-updates main" \
        "deb $DEBIAN_SECURITY $DEBIAN_SUITE-security main" \
        || { rm -f "$tar"; die "mmdebstrap failed"; }
    step "importing the root filesystem as $FALLBACK_BASE"
    docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' \
        "$tar" "$FALLBACK_BASE" >/dev/null
    rm -f "$tar"
}

if image_exists "$BASE_IMAGE"; then
    BASE=$BASE_IMAGE
elif [ "${NO_PULL:-0}" != 1 ] && step "trying to pull $BASE_IMAGE" \
    && timeout 120 docker pull -q "$BASE_IMAGE" >/dev/null 2>&1; then
    BASE=$BASE_IMAGE
else
    step "$BASE_IMAGE cannot be pulled: using $FALLBACK_BASE"
    image_exists "$FALLBACK_BASE" || make_debian_base
    BASE=$FALLBACK_BASE
fi
step "base image: $BASE"

# --- 3. wheels, built on the host (it reaches PyPI). Dependencies are fetched as binary wheels for
# the base's Python (bookworm's python3 is 3.11.2; newer releases of some packages need >= 3.11.5).
mkdir -p "$WHEELS/deps" "$WHEELS/app"
step "building the toolserver wheel into $WHEELS/app"
rm -rf "$WHEELS/app" build/lib build/bdist.* && mkdir -p "$WHEELS/app"   # no stale modules from build/lib
"$PYTHON" -m pip wheel -q --disable-pip-version-check --no-deps . -w "$WHEELS/app" >build/pip-wheel.log 2>&1 \
    || { cat build/pip-wheel.log >&2; die "pip wheel failed (log above)"; }
rm -rf build/lib build/bdist.*
# the notebook extra (numpy, pandas, matplotlib) is what the node's kernel imports; the postgres
# extra (asyncpg) rides along, so that the manager image built from the same wheels
# (docker/manager.Dockerfile) can use a PostgreSQL database_url
DEPS_EXTRAS=postgres,notebook
deps_hash=$( (sha256sum pyproject.toml; echo "$WHEEL_PYTHON_VERSION $DEPS_EXTRAS") | sha256sum | cut -c1-32)
if [ "$(cat "$WHEELS/deps/.deps-hash" 2>/dev/null || true)" != "$deps_hash" ]; then
    step "downloading dependency wheels for Python $WHEEL_PYTHON_VERSION into $WHEELS/deps (pip download)"
    rm -rf "$WHEELS/deps" && mkdir -p "$WHEELS/deps"
    "$PYTHON" -m pip download -q --disable-pip-version-check --only-binary=:all: \
        --python-version "$WHEEL_PYTHON_VERSION" --implementation cp \
        -d "$WHEELS/deps" "$(echo "$WHEELS"/app/toolserver-*.whl)[$DEPS_EXTRAS]"
    rm -f "$WHEELS"/deps/toolserver-*.whl
    echo "$deps_hash" >"$WHEELS/deps/.deps-hash"
else
    step "dependency wheels are up to date ($(find "$WHEELS/deps" -name '*.whl' | wc -l) wheels)"
fi

echo "$HASH" >"$WHEELS/.source-hash"

# --- 4. the image (legacy builder: works with any daemon, no buildx needed; no network inside)
step "docker build -f docker/node.Dockerfile (base $BASE)"
DOCKER_BUILDKIT=0 docker build --force-rm \
    --file docker/node.Dockerfile \
    --build-arg "BASE_IMAGE=$BASE" \
    --build-arg "DEPS_HASH=$deps_hash" \
    --label "$HASH_LABEL=$HASH" \
    --network none \
    --tag "$NODE_IMAGE" \
    "$WHEELS" 2>&1 | grep -v -E '^(DEPRECATED: The legacy builder| {8,}\S|$)' >&2 || true
image_exists "$NODE_IMAGE" \
    && [ "$(docker image inspect "$NODE_IMAGE" --format "{{ index .Config.Labels \"$HASH_LABEL\" }}")" = "$HASH" ] \
    || die "docker build failed"
# drop what earlier builds left: replaced node images, dependency stages of older wheel sets
docker image prune -f --filter "label=$HASH_LABEL" >/dev/null 2>&1 || true
docker image prune -f --filter "label=toolserver.stage=deps" --filter "label!=toolserver.deps-hash=$deps_hash" \
    >/dev/null 2>&1 || true
step "built $NODE_IMAGE ($(docker image inspect "$NODE_IMAGE" --format '{{.Size}}' | awk '{printf "%.0f MB", $1/1e6}'))"
