#!/usr/bin/env bash
# apt-get install the given Debian packages, for the policy build scripts: as root, or through
# sudo when not root; waits for another apt/dpkg run to finish instead of failing on its lock;
# refreshes the package lists (`apt-get update`) only when the install fails without it.
set -euo pipefail

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_get() {
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 "$@"
}

install() {
    apt_get install -y -qq --no-install-recommends "$@" >/dev/null
}

printf '[policies] apt-get install %s\n' "$*" >&2
if ! install "$@"; then
    printf '[policies] apt-get update, then install again\n' >&2
    apt_get update -qq
    install "$@"
fi
