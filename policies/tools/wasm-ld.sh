#!/bin/sh
# The linker for the policies' wasm32 build (.cargo/config.toml): LLVM's wasm-ld from lld-22
# (Debian's rustc-web ships no rust-lld). rustc asks it to export `__heap_base` and
# `__data_end` as well; the ABI wants exactly `memory` and the three `hotpath_*` functions, so
# those two flags are dropped here.
for arg do
    shift
    case "$arg" in
        --export=__heap_base | --export=__data_end) ;;
        *) set -- "$@" "$arg" ;;
    esac
done
exec /usr/bin/wasm-ld-22 "$@"
