#!/usr/bin/env bash
# Makes Debian's chromium available for the dashboard's browser test (Playwright drives it through
# executable_path; no browser is ever downloaded). Installs the package when it is missing.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "ensure-chromium: chromium not found and not root; the dashboard's browser test will be skipped" >&2
  exit 0
fi
echo "ensure-chromium: installing Debian's chromium package"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium >/dev/null
