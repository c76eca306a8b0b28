#!/usr/bin/env bash
# Makes tmux available for the terminal tests (they drive `toolserver shell` inside a tmux server of
# their own: type keys, read the screen). Installs Debian's tmux package when it is missing.
set -euo pipefail
if command -v tmux >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "ensure-tmux: tmux not found and not root; the tmux terminal tests will be skipped" >&2
  exit 0
fi
echo "ensure-tmux: installing Debian's tmux package"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends tmux >/dev/null
