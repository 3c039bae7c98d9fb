#!/usr/bin/env bash
# Builds a policy written with the C SDK (hotpath_policy.h) into a module:
#   sdk-c/build.sh SOURCE.c OUT.wasm [VECTORS.json]
# clang-22 for wasm32 and LLVM's wasm-ld, no libc, no WASI; installs clang-22 and lld-22 from
# Debian's packages when they are missing. First it runs the SDK's own unit tests natively
# (test/sdk_test.c, with the host's C compiler, AddressSanitizer and UndefinedBehaviorSanitizer
# where it has them); given VECTORS.json, it then runs the policy's test vectors natively
# (sdk-c/vectors.c, compiled with the policy and the same sanitizers). Each step does nothing
# when its output is newer than its inputs (the source, the header, the vectors and this
# script).
set -euo pipefail
SDK="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
POLICIES="$(dirname "$SDK")"
CLANG=/usr/bin/clang-22
WASM_LD=/usr/lib/llvm-22/bin/wasm-ld # what clang-22 runs as its linker (package lld-22)

if [ $# -lt 2 ] || [ $# -gt 3 ]; then
    echo "usage: $0 SOURCE.c OUT.wasm [VECTORS.json]" >&2
    exit 2
fi
SOURCE="$(realpath "$1")"
OUT="$2"
VECTORS="${3:-}"
[ -f "$SOURCE" ] || { echo "$0: no such file: $1" >&2; exit 2; }
[ -z "$VECTORS" ] || [ -f "$VECTORS" ] || { echo "$0: no such file: $VECTORS" >&2; exit 2; }

if [ ! -x "$CLANG" ] || [ ! -x "$WASM_LD" ]; then
    "$POLICIES/tools/apt-install.sh" clang-22 lld-22
fi

newer_than_inputs() { # OUTPUT INPUT...
    local output="$1" input
    shift
    [ -f "$output" ] || return 1
    for input in "$@"; do
        [ "$output" -nt "$input" ] || return 1
    done
}

# The host's C compiler and the flags native runs use: sanitizers where it has them.
host_compiler() {
    HOST_CC="$(command -v cc || echo "$CLANG")"
    FLAGS=(-std=c11 -O1 -g -Wall -Wextra -Werror)
    if echo 'int main(void){return 0;}' |
        "$HOST_CC" -x c -fsanitize=address,undefined -o "$POLICIES/target/sdk-c/probe.$$" - 2>/dev/null; then
        FLAGS+=(-fsanitize=address,undefined -fno-sanitize-recover=all)
    else
        FLAGS+=(-fsanitize=undefined -fsanitize-trap=undefined)
    fi
    rm -f "$POLICIES/target/sdk-c/probe.$$"
}

# The SDK's unit tests. The binary is kept only once it has passed, so it doubles as the
# record that the current header passed them.
TEST_BIN="$POLICIES/target/sdk-c/sdk-test"
if ! newer_than_inputs "$TEST_BIN" "$SDK/hotpath_policy.h" "$SDK/test/sdk_test.c" "$SDK/build.sh"; then
    mkdir -p "$(dirname "$TEST_BIN")"
    host_compiler
    "$HOST_CC" "${FLAGS[@]}" -o "$TEST_BIN.tmp.$$" "$SDK/test/sdk_test.c"
    if ! "$TEST_BIN.tmp.$$" >&2; then
        rm -f "$TEST_BIN.tmp.$$"
        echo "$0: the C SDK's unit tests failed" >&2
        exit 1
    fi
    mv -f "$TEST_BIN.tmp.$$" "$TEST_BIN"
fi

# The policy's test vectors, natively; the runner is kept only once they have passed.
if [ -n "$VECTORS" ]; then
    RUNNER="$POLICIES/target/sdk-c/vectors-$(basename "$SOURCE" .c)"
    if ! newer_than_inputs "$RUNNER" "$SOURCE" "$VECTORS" "$SDK/hotpath_policy.h" \
        "$SDK/vectors.c" "$SDK/build.sh"; then
        mkdir -p "$(dirname "$RUNNER")"
        host_compiler
        "$HOST_CC" "${FLAGS[@]}" -I "$SDK" -DHP_POLICY_SOURCE="\"$SOURCE\"" \
            -o "$RUNNER.tmp.$$" "$SDK/vectors.c"
        if ! "$RUNNER.tmp.$$" "$VECTORS"; then
            rm -f "$RUNNER.tmp.$$"
            echo "$0: $(basename "$SOURCE") fails its test vectors" >&2
            exit 1
        fi
        mv -f "$RUNNER.tmp.$$" "$RUNNER"
    fi
fi

if newer_than_inputs "$OUT" "$SOURCE" "$SDK/hotpath_policy.h" "$SDK/build.sh"; then
    exit 0
fi
mkdir -p "$(dirname "$OUT")"
# -mcpu=mvp plus the four features policies/ABI.md allows; every export named explicitly;
# 2 MiB of initial memory, like the Rust SDK's modules, so the bump heap serves an ordinary
# message without growing memory (ABI.md, "Limits"); --strip-all drops the names section.
"$CLANG" --target=wasm32 -nostdlib -ffreestanding -O2 -Wall -Wextra -Werror -I "$SDK" \
    -mcpu=mvp -mbulk-memory -msign-ext -mmutable-globals -mmultivalue \
    -Wl,--no-entry \
    -Wl,--export=hotpath_abi_version -Wl,--export=hotpath_alloc -Wl,--export=hotpath_validate \
    -Wl,--initial-memory=2097152 -Wl,--strip-all \
    -o "$OUT.tmp.$$" "$SOURCE"
mv -f "$OUT.tmp.$$" "$OUT"
