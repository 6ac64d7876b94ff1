#!/usr/bin/env python3
"""Import circles between the modules of a Rust source tree (issue 30).

    scripts/import-circles.py actors/src
    scripts/import-circles.py src

Reads `use crate::…`, `use super::…` and `crate::…` paths per file (line
comments and `#[cfg(test)] mod tests` left out), resolves each to the
longest module path that exists, and prints every strongly connected
component of more than one module with its edges. No output: no circle.
A child using its parent is not counted (a folder and its rooms).
"""
import collections
import os
import re
import sys

USE = re.compile(r"\buse\s+((?:crate|super|self)(?:::[A-Za-z_0-9]+)*)(?:::\{([^;]*)\})?")
PATH = re.compile(r"\b((?:crate|super)(?:::[A-Za-z_0-9]+)+)")


def modules(root):
    """Module path ("a::b", "" for the crate root) -> its file."""
    mods = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            if not f.endswith(".rs"):
                continue
            path = os.path.join(dirpath, f)
            parts = os.path.relpath(path, root)[:-3].split("/")
            if parts[-1] in ("mod", "lib", "main"):
                parts = parts[:-1]
            mods["::".join(parts)] = path
    return mods


def resolve(mods, cur, segs):
    """The longest existing module that path `segs`, used in module `cur`
    (a list of segments), names; None for a path outside the crate."""
    if segs[0] == "crate":
        base, segs = [], segs[1:]
    elif segs[0] == "super":
        base = cur[:]
        while segs and segs[0] == "super":
            base, segs = base[:-1], segs[1:]
    elif segs[0] == "self":
        base, segs = cur[:], segs[1:]
    else:
        return None
    for i in range(len(segs), -1, -1):
        m = "::".join(base + segs[:i])
        if m in mods:
            return m
    return None


def used_paths(src):
    """Every crate-relative path a source (tests and line comments left out) uses."""
    src = re.split(r"#\[cfg\(test\)\]\s*mod tests", src)[0]
    src = "\n".join(line for line in src.split("\n") if not line.strip().startswith("//"))
    for u in USE.finditer(src):
        segs = u.group(1).split("::")
        if not u.group(2):
            yield segs
            continue
        for item in u.group(2).split(","):
            item = item.strip().split(" as ")[0]
            if item:
                yield segs + [s for s in item.replace("{", "").replace("}", "").split("::") if s and s != "self"]
    for u in PATH.finditer(src):
        yield u.group(1).split("::")


def edges_of(mods):
    edges = collections.defaultdict(set)
    for m, path in mods.items():
        cur = m.split("::") if m else []
        with open(path) as f:
            src = f.read()
        for segs in used_paths(src):
            r = resolve(mods, cur, segs)
            if r and r != m and not m.startswith(r + "::"):
                edges[m].add(r)
    return edges


def components(nodes, edges):
    """Tarjan's strongly connected components of more than one node."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    sys.setrecursionlimit(10000)
    for v in nodes:
        if v not in index:
            visit(v)
    return out


def main():
    mods = modules(sys.argv[1])
    edges = edges_of(mods)
    for comp in components(list(mods), edges):
        print("CYCLE:", sorted(comp))
        for a in comp:
            for b in edges[a]:
                if b in comp:
                    print("   ", a, "->", b)


if __name__ == "__main__":
    main()
