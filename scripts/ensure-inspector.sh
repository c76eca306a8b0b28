#!/usr/bin/env bash
# Installs the pinned MCP Inspector from the npm registry into build/inspector, for
# tests/mcp/test_inspector.py (which then runs it offline, against 127.0.0.1 only).
# Without Node.js/npm it says so and succeeds: that test skips with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${MCP_INSPECTOR_VERSION:-2.12.0}"
DEST=build/inspector
PKG="$DEST/node_modules/@modelcontextprotocol/inspector/package.json"
if ! command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then
  echo "ensure-inspector: Node.js/npm not found; the MCP Inspector test will skip"
  exit 0
fi
if [ -f "$PKG" ] && grep -q "\"version\": \"$VERSION\"" "$PKG"; then
  exit 0
fi
mkdir -p "$DEST"
echo "ensure-inspector: installing @modelcontextprotocol/inspector@$VERSION into $DEST"
npm install --prefix "$DEST" --no-save --no-audit --no-fund --loglevel=error \
  "@modelcontextprotocol/inspector@$VERSION"
