#!/usr/bin/env bash
# Makes PostgreSQL's server binaries available for the PostgreSQL tests (they start their own
# throwaway server on 127.0.0.1). Installs Debian's postgresql package when initdb is missing.
set -euo pipefail
if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "ensure-postgres: initdb not found and not root; PostgreSQL tests will be skipped" >&2
  exit 0
fi
echo "ensure-postgres: installing Debian's postgresql package"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends postgresql >/dev/null
# the package starts a cluster of its own on some systems; the tests do not need it
pg_ctlcluster --help >/dev/null 2>&1 && pg_lsclusters -h 2>/dev/null | while read -r ver name _; do
  pg_ctlcluster "$ver" "$name" stop 2>/dev/null || true
done
exit 0
