#!/usr/bin/env bash
# Build the images of the Swarm stack (docker/stack/stack.yml) on this machine, no registry needed:
#
#   toolserver-node:latest       the node image            (scripts/build-node-image.sh)
#   toolserver-manager:stack     the manager               (docker/manager.Dockerfile, same wheels)
#   toolserver-postgres:stack    PostgreSQL                (Debian's postgresql, mmdebstrap rootfs)
#   toolserver-lb:stack          the load balancer         (Debian's nginx-light, mmdebstrap rootfs)
#
# The Debian root filesystems are made once with mmdebstrap and `docker import`ed (as the node
# image's fallback base is); the images are then built with --network none. Load them on the
# other hosts with `docker save IMAGE... | ssh HOST docker load` (the ids stay the same, which the
# swarm runtime relies on: it runs the node image by id).
#
# Environment: NODE_IMAGE, MANAGER_IMAGE, POSTGRES_IMAGE, LB_IMAGE (tags above), DEBIAN_MIRROR,
# FORCE=1 (remake the root filesystems too).
set -euo pipefail
cd "$(dirname "$0")/.."

NODE_IMAGE=${NODE_IMAGE:-toolserver-node:latest}
MANAGER_IMAGE=${MANAGER_IMAGE:-toolserver-manager:stack}
POSTGRES_IMAGE=${POSTGRES_IMAGE:-toolserver-postgres:stack}
LB_IMAGE=${LB_IMAGE:-toolserver-lb:stack}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
FALLBACK_BASE=${FALLBACK_BASE:-toolserver-base:bookworm}

step() { echo "==> stack-images: $*" >&2; }
die() { echo "stack-images: error: $*" >&2; exit 1; }
image_exists() { docker image inspect "$1" >/dev/null 2>&1; }
build() {  # build TAG DOCKERFILE CONTEXT [ARGS...]
    local tag=$1 file=$2 context=$3
    shift 3
    DOCKER_BUILDKIT=0 docker build -q --force-rm --network none --file "$file" --tag "$tag" "$@" "$context" >/dev/null \
        || die "docker build of $tag failed"
    step "built $tag"
}

# 1. the node image and the wheels the manager image installs
NODE_IMAGE=$NODE_IMAGE bash scripts/build-node-image.sh
base=python:3.11-slim-bookworm
image_exists "$base" || base=$FALLBACK_BASE
image_exists "$base" || die "no base image ($base); scripts/build-node-image.sh makes it"

# 2. the manager, from the same wheels
build "$MANAGER_IMAGE" docker/manager.Dockerfile build/wheels --build-arg "BASE_IMAGE=$base"

# 3. Debian root filesystems with the packages the stack needs
rootfs() {  # rootfs TAG PACKAGES
    local tag=$1 packages=$2 tar
    if image_exists "$tag" && [ "${FORCE:-0}" != 1 ]; then
        return
    fi
    command -v mmdebstrap >/dev/null 2>&1 || die "mmdebstrap is missing (apt-get install mmdebstrap)"
    step "making $tag from Debian packages: $packages"
    tar=$(mktemp --suffix=.tar)
    mmdebstrap --variant=minbase --include="$packages" \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
        bookworm "$tar" "deb $DEBIAN_MIRROR bookworm main" "deb $DEBIAN_MIRROR bookworm-updates main" \
        || { rm -f "$tar"; die "mmdebstrap failed"; }
    docker import --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' "$tar" "$tag" >/dev/null
    rm -f "$tar"
}
rootfs toolserver-stack-postgres-rootfs:bookworm postgresql
rootfs toolserver-stack-lb-rootfs:bookworm nginx-light

# 4. the stack's own images on them
build "$POSTGRES_IMAGE" docker/stack/postgres.Dockerfile docker/stack
build "$LB_IMAGE" docker/stack/lb.Dockerfile docker/stack
step "done: $NODE_IMAGE $MANAGER_IMAGE $POSTGRES_IMAGE $LB_IMAGE"
