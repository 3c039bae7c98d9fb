#!/usr/bin/env bash
# Builds link-limit.wasm from link_limit.c with the C SDK's build script, which runs the
# SDK's unit tests and this rule's vectors.json natively first:
#   examples/link-limit-c/build.sh [OUT.wasm]     (default: link-limit.wasm beside this file)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "$HERE/../../sdk-c/build.sh" "$HERE/link_limit.c" "${1:-$HERE/link-limit.wasm}" \
    "$HERE/vectors.json"
