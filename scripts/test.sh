#!/usr/bin/env bash
# README command 2: install what is missing and run every test (unit and integration; the
# integration tests start their own nats-server and Postgres on free loopback ports).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
cargo test --workspace --locked "$@"
