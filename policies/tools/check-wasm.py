#!/usr/bin/env python3
"""Checks that each given .wasm is a policy module by policies/ABI.md's letter: no imports, and
exactly the exports `memory` (a memory) and `hotpath_abi_version: () -> i32`,
`hotpath_alloc: (i32) -> i32`, `hotpath_validate: (i32, i32) -> i64`. Prints one line per
module; exits 1 if any fails. No dependencies beyond Python 3."""

import sys

EXPECTED_FUNCS = {
    "hotpath_abi_version": ((), (0x7F,)),
    "hotpath_alloc": ((0x7F,), (0x7F,)),
    "hotpath_validate": ((0x7F, 0x7F), (0x7E,)),
}
VALTYPE = {0x7F: "i32", 0x7E: "i64", 0x7D: "f32", 0x7C: "f64", 0x7B: "v128", 0x70: "funcref", 0x6F: "externref"}
KIND = {0: "func", 1: "table", 2: "memory", 3: "global", 4: "tag"}


class Reader:
    def __init__(self, data, pos=0, end=None):
        self.data, self.pos, self.end = data, pos, len(data) if end is None else end

    def byte(self):
        if self.pos >= self.end:
            raise ValueError("truncated module")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def uleb(self):
        result = shift = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return result

    def name(self):
        n = self.uleb()
        if self.pos + n > self.end:
            raise ValueError("truncated name")
        s = self.data[self.pos:self.pos + n].decode("utf-8")
        self.pos += n
        return s


def limits(body):
    flags = body.byte()
    body.uleb()
    if flags & 1:
        body.uleb()


def sig(types):
    return "(" + ", ".join(VALTYPE.get(t, hex(t)) for t in types) + ")"


def check(path):
    data = open(path, "rb").read()
    if data[:8] != b"\0asm\x01\0\0\0":
        return ["not a WebAssembly 1.0 module"]
    r = Reader(data, 8)
    types, func_types, imports, exports = [], [], [], []
    imported_func_types = []
    while r.pos < r.end:
        section, size = r.byte(), r.uleb()
        body = Reader(data, r.pos, r.pos + size)
        r.pos += size
        if section == 1:  # types
            for _ in range(body.uleb()):
                if body.byte() != 0x60:
                    raise ValueError("unsupported type form")
                params = tuple(body.byte() for _ in range(body.uleb()))
                results = tuple(body.byte() for _ in range(body.uleb()))
                types.append((params, results))
        elif section == 2:  # imports
            for _ in range(body.uleb()):
                module, field, kind = body.name(), body.name(), body.byte()
                imports.append(f"{module}.{field}")
                if kind == 0:  # a function: its type, so that function indices line up
                    imported_func_types.append(body.uleb())
                elif kind == 1:  # table: reftype, limits
                    body.byte()
                    limits(body)
                elif kind == 2:  # memory: limits
                    limits(body)
                elif kind == 3:  # global: valtype, mutability
                    body.byte()
                    body.byte()
                elif kind == 4:  # tag: attribute, type
                    body.byte()
                    body.uleb()
                else:
                    raise ValueError(f"unknown import kind {kind}")
        elif section == 3:  # functions
            func_types = [body.uleb() for _ in range(body.uleb())]
        elif section == 7:  # exports
            for _ in range(body.uleb()):
                name, kind, index = body.name(), body.byte(), body.uleb()
                exports.append((name, kind, index))
    problems = []
    if imports:
        problems.append(f"imports {', '.join(imports)} (a policy may import nothing)")
    names = {name for name, _, _ in exports}
    for name, kind, index in exports:
        if name == "memory":
            if kind != 2:
                problems.append(f"export memory is a {KIND.get(kind, kind)}, not a memory")
        elif name in EXPECTED_FUNCS:
            if kind != 0:
                problems.append(f"export {name} is a {KIND.get(kind, kind)}, not a function")
                continue
            all_funcs = imported_func_types + func_types  # imported functions come first
            got = types[all_funcs[index]]
            want = EXPECTED_FUNCS[name]
            if got != want:
                problems.append(f"{name} is {sig(got[0])} -> {sig(got[1])}, not {sig(want[0])} -> {sig(want[1])}")
        else:
            problems.append(f"unexpected export {name} ({KIND.get(kind, kind)})")
    for name in ["memory", *EXPECTED_FUNCS]:
        if name not in names:
            problems.append(f"missing export {name}")
    return problems


def main():
    failed = False
    for path in sys.argv[1:]:
        try:
            problems = check(path)
        except (ValueError, IndexError, UnicodeDecodeError) as error:
            problems = [f"unreadable: {error}"]
        if problems:
            failed = True
            print(f"  {path}: FAILED: {'; '.join(problems)}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
