#!/usr/bin/env bash
# README command 2: install what is missing and run every test (unit and integration; the
# integration tests start their own nats-server and Postgres on free loopback ports).
# Ends with one line totalling every test binary: "N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
ensure_browser_tools
say "node: $(node --version), $(chromium --version 2>/dev/null)"
policies/build.sh
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --locked "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
awk '/^test result:/ { passed += $4; failed += $6 } END { printf "%d passed, %d failed\n", passed, failed }' "$log"
exit "$status"
