#!/usr/bin/env bash
# Makes the `sandbox` tier (the default isolation) runnable: bubblewrap (bwrap), pasta (Debian's passt,
# for `network: egress`), setpriv and prlimit (util-linux), newuidmap (uidmap) and mkfs.ext4
# (e2fsprogs, for the workspace size limit), ip (iproute2, for the tests). Installs the Debian packages
# that are missing.
set -euo pipefail
missing=()
command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)
command -v pasta >/dev/null 2>&1 || missing+=(passt)
command -v newuidmap >/dev/null 2>&1 || missing+=(uidmap)
command -v setpriv >/dev/null 2>&1 || missing+=(util-linux)
command -v mkfs.ext4 >/dev/null 2>&1 || missing+=(e2fsprogs)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)   # the egress tests' network namespaces
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "ensure-sandbox: missing ${missing[*]} and not root; install them, or choose isolation: docker" >&2
  exit 0
fi
echo "ensure-sandbox: installing Debian's ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
