#!/usr/bin/env bash
# README command 1: install what is missing, build, and run the whole system locally.
# Arguments are passed to `hotpath up` (e.g. --listen 127.0.0.1:9000 --data-dir /tmp/hp).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
policies/build.sh
cargo build --release -p hotpath
exec target/release/hotpath up "$@"
