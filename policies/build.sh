#!/usr/bin/env bash
# Builds every policy module into policies/dist/, with its test vectors beside it:
#   dist/schema.wasm        dist/schema.vectors.json          (the shipped policies, Rust)
#   dist/authz.wasm         dist/authz.vectors.json
#   dist/banned-word-c.wasm dist/banned-word-c.vectors.json   (the C example, no SDK)
#   dist/link-limit-c.wasm  dist/link-limit-c.vectors.json    (a rule written with sdk-c/)
# then checks that each module imports nothing and exports exactly what policies/ABI.md asks.
#
# Idempotent, and quick when nothing changed. On a fresh Debian 12 machine it first installs
# Debian's Rust toolchain for WebAssembly (rustc-web >= 1.96 with the standard library's
# source, LLVM 22's wasm-ld) and clang-22. That toolchain is used instead of rustup's, which
# has no wasm32 standard library here: the std is built from source (-Zbuild-std, hence
# RUSTC_BOOTSTRAP), and PATH is cut down so rustup's shims in ~/.cargo/bin cannot win.
set -euo pipefail

POLICIES="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DIST="$POLICIES/dist"
WASM_OUT="$POLICIES/target/wasm32-unknown-unknown/release"
RUST_PACKAGES=(rustc-web cargo-web rust-web-src rust-web-llvm lld-22)
MIN_RUSTC=1.96

say() { printf '[policies] %s\n' "$*" >&2; }

installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]
}

toolchain_ready() {
    local package version
    for package in "${RUST_PACKAGES[@]}"; do
        installed "$package" || return 1
    done
    version="$(dpkg-query -W -f='${Version}' rustc-web)"
    dpkg --compare-versions "$version" ge "$MIN_RUSTC" || return 1
    [ -x /usr/bin/rustc ] && [ -x /usr/bin/cargo ] && [ -x /usr/bin/wasm-ld-22 ] &&
        [ -d /usr/lib/rustlib/src/rust/library/std ]
}

if ! toolchain_ready; then
    "$POLICIES/tools/apt-install.sh" "${RUST_PACKAGES[@]}"
    toolchain_ready || {
        say "rustc-web >= $MIN_RUSTC with rust-web-src and lld-22 is needed; apt did not provide it"
        exit 1
    }
fi
if ! command -v python3 >/dev/null 2>&1; then
    "$POLICIES/tools/apt-install.sh" python3-minimal
fi

# The Rust policies. /usr/bin/cargo is cargo-web's binary (`dpkg -L cargo-web`). Variables
# that would send the output elsewhere or replace .cargo/config.toml's flags are dropped.
started=$SECONDS
(
    cd "$POLICIES"
    env -u RUSTFLAGS -u CARGO_ENCODED_RUSTFLAGS -u CARGO_TARGET_DIR -u CARGO_BUILD_TARGET_DIR \
        -u RUSTC_WRAPPER -u RUSTC_WORKSPACE_WRAPPER -u CARGO_BUILD_RUSTC_WRAPPER \
        PATH=/usr/bin:/bin RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 \
        /usr/bin/cargo build --release --target wasm32-unknown-unknown \
        -Zbuild-std=std,panic_abort
)

# The C examples (link-limit-c's build runs the C SDK's unit tests first).
"$POLICIES/examples/banned-word-c/build.sh" "$POLICIES/target/banned-word-c/banned-word.wasm"
"$POLICIES/examples/link-limit-c/build.sh" "$POLICIES/target/link-limit-c/link-limit.wasm"

# Into dist/, touching only what changed (a rename, so a reader never sees half a file).
mkdir -p "$DIST"
publish() {
    local from="$1" to="$DIST/$2"
    if ! cmp -s "$from" "$to"; then
        cp "$from" "$to.tmp.$$"
        chmod 644 "$to.tmp.$$"
        mv -f "$to.tmp.$$" "$to"
    fi
}
publish "$WASM_OUT/schema.wasm" schema.wasm
publish "$WASM_OUT/authz.wasm" authz.wasm
publish "$POLICIES/target/banned-word-c/banned-word.wasm" banned-word-c.wasm
publish "$POLICIES/target/link-limit-c/link-limit.wasm" link-limit-c.wasm
publish "$POLICIES/schema/vectors.json" schema.vectors.json
publish "$POLICIES/authz/vectors.json" authz.vectors.json
publish "$POLICIES/examples/banned-word-c/vectors.json" banned-word-c.vectors.json
publish "$POLICIES/examples/link-limit-c/vectors.json" link-limit-c.vectors.json

MODULES=("$DIST/schema.wasm" "$DIST/authz.wasm" "$DIST/banned-word-c.wasm" "$DIST/link-limit-c.wasm")
# Operators' own rules: policies/rules/<name>/ → dist/<name>.wasm (+ vectors).
for rule in "$POLICIES"/rules/*/; do
    [ -f "$rule/Cargo.toml" ] || continue
    name="$(basename "$rule")"
    publish "$WASM_OUT/${name//-/_}.wasm" "$name.wasm"
    if [ -f "$rule/vectors.json" ]; then publish "$rule/vectors.json" "$name.vectors.json"; fi
    MODULES+=("$DIST/$name.wasm")
done
python3 "$POLICIES/tools/check-wasm.py" "${MODULES[@]}" || {
    say "a module breaks the ABI (see above)"
    exit 1
}
for module in "${MODULES[@]}"; do
    say "$(printf '%-20s %8d bytes' "$(basename "$module")" "$(stat -c %s "$module")")"
done
say "built in $((SECONDS - started)) s; no imports, exports exactly memory + hotpath_{abi_version,alloc,validate}"
