#!/usr/bin/env python3
"""The workspace's layout rules, checked on the source tree (no build needed).

- No two source files import each other, except inside one module folder (a
  folder's files and its `mod.rs`). A crate root that only declares modules and
  re-exports (a facade) is not an import target.
- No source file outside tests is longer than MAX_LINES.

Exits 1 and names every violation; prints a one-line summary otherwise.
"""
import itertools
import os
import re
import sys

MAX_LINES = 1300
ROOT = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else ".")


def crates():
    """(name, src dir) of every crate of the workspace, the root package included."""
    for entry in sorted(os.listdir(ROOT)):
        src = os.path.join(ROOT, entry, "src")
        if os.path.isfile(os.path.join(ROOT, entry, "Cargo.toml")) and os.path.isdir(src):
            yield entry, src
    yield ".", os.path.join(ROOT, "src")


def module_path(src, path):
    parts = os.path.relpath(path, src)[:-3].split("/")
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return tuple(parts)


def code_of(path):
    text = open(path, encoding="utf-8").read()
    tests = re.search(r"#\[cfg\(test\)\]\s*mod tests\s*\{", text)
    if tests:
        text = text[: tests.start()]
    return re.sub(r"//.*", "", text)


def is_facade(code):
    """Only `mod`, `use` and attributes: nothing a module could depend on."""
    return not re.search(r"^\s*(pub(\([^)]*\))?\s+)?(fn|struct|enum|const|static|trait|impl|type|macro_rules!)\b", code, re.M)


def imports(files, module, code):
    """The modules (files) that `module`'s code names through crate::, super::, self:: or a child."""
    found = set()

    def resolve(segments):
        for n in range(len(segments), -1, -1):
            if tuple(segments[:n]) in files:
                return tuple(segments[:n])
        return None

    def add(path):
        segments = path.split("::")
        if segments[0] == "crate":
            current, segments = [], segments[1:]
        elif segments[0] in ("self", "super"):
            current = list(module)
            if segments[0] == "self":
                segments = segments[1:]
            while segments and segments[0] == "super":
                current, segments = current[:-1], segments[1:]
        elif module + (segments[0],) in files:  # `use child::…`
            current = list(module)
        else:
            return
        target = resolve(current + [s for s in segments if s not in ("*", "")])
        if target is not None and target != module:
            found.add(target)

    for prefix, group in re.findall(r"\b((?:crate|super|self)(?:::\w+)*)::\{([^;]*?)\}\s*;", code, re.S):
        for inner in re.findall(r"(\w+)::\{", group):
            add(f"{prefix}::{inner}")
        for item in re.split(r"[,\s]+", re.sub(r"\w+::\{[^}]*\}", "", group)):
            if item and item != "as":
                add(f"{prefix}::{item}")
    for path in re.findall(r"\b(?:crate|super|self)(?:::\w+)+", code):
        add(path)
    for head, rest in re.findall(r"\buse\s+(\w+)::([^;]*);", code):
        if head not in ("crate", "super", "self", "std", "core", "alloc"):
            add(f"self::{head}")
    return found


def same_folder(a, b):
    da, db = os.path.dirname(a), os.path.dirname(b)
    if da == db:
        return os.path.basename(os.path.dirname(da)) != "" and not da.endswith("/src")
    return (db.startswith(da + "/") and os.path.basename(a) == "mod.rs") or (
        da.startswith(db + "/") and os.path.basename(b) == "mod.rs"
    )


def main():
    problems = []
    pairs = 0
    for _, src in crates():
        files = {}
        for folder, _, names in os.walk(src):
            for name in names:
                if name.endswith(".rs"):
                    path = os.path.join(folder, name)
                    files[module_path(src, path)] = path
        codes = {m: code_of(p) for m, p in files.items()}
        deps = {m: set() if is_facade(codes[m]) else imports(files, m, codes[m]) for m in files}
        for a, b in itertools.combinations(files, 2):
            if b in deps[a] and a in deps[b]:
                pairs += 1
                if not same_folder(files[a], files[b]):
                    ra, rb = (os.path.relpath(files[x], ROOT) for x in (a, b))
                    problems.append(f"{ra} and {rb} import each other")
        for path in files.values():
            rel = os.path.relpath(path, ROOT)
            if rel.endswith("/tests.rs") or "/tests/" in rel:
                continue
            lines = sum(1 for _ in open(path, encoding="utf-8"))
            if lines > MAX_LINES:
                problems.append(f"{rel} has {lines} lines (at most {MAX_LINES} outside tests)")
    for p in problems:
        print(f"check-layout: {p}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"check-layout: no import cycles across folders ({pairs} inside module folders), no file over {MAX_LINES} lines")


if __name__ == "__main__":
    main()
