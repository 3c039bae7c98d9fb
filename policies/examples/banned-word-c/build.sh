#!/usr/bin/env bash
# Builds banned-word.wasm from banned_word.c with clang and LLVM's wasm-ld (no libc, no WASI):
#   examples/banned-word-c/build.sh [OUT.wasm]     (default: banned-word.wasm beside this file)
# Installs clang-22 and lld-22 from Debian's packages when they are missing (bookworm-security
# carries LLVM 22, which policies/build.sh installs for Rust anyway). Does nothing when the
# module is newer than its source and this script.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${1:-$HERE/banned-word.wasm}"
CLANG=/usr/bin/clang-22
WASM_LD=/usr/lib/llvm-22/bin/wasm-ld # what clang-22 runs as its linker (package lld-22)

if [ ! -x "$CLANG" ] || [ ! -x "$WASM_LD" ]; then
    "$HERE/../../tools/apt-install.sh" clang-22 lld-22
fi

if [ -f "$OUT" ] && [ "$OUT" -nt "$HERE/banned_word.c" ] && [ "$OUT" -nt "$HERE/build.sh" ]; then
    exit 0
fi

mkdir -p "$(dirname "$OUT")"
# -mcpu=mvp plus the four features policies/ABI.md allows; every export named explicitly
# (the functions also carry export_name attributes); --strip-all drops the names section.
"$CLANG" --target=wasm32 -nostdlib -ffreestanding -O2 -Wall -Wextra -Werror \
    -mcpu=mvp -mbulk-memory -msign-ext -mmutable-globals -mmultivalue \
    -Wl,--no-entry \
    -Wl,--export=hotpath_abi_version -Wl,--export=hotpath_alloc -Wl,--export=hotpath_validate \
    -Wl,--strip-all \
    -o "$OUT.tmp.$$" "$HERE/banned_word.c"
mv -f "$OUT.tmp.$$" "$OUT"
