"""The package's structure: no import cycles (module level or inside functions), no private
names imported across modules, the IR declares every field it carries, and nothing points
outside the repository."""
from __future__ import annotations

import ast
import os
import re

import torch

import fxprune

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"fxprune": os.path.join(ROOT, "fxprune"), "fxprune.passes": os.path.join(ROOT, "passes")}


def modules() -> dict[str, str]:
    """Module name -> file, for every module of fxprune and fxprune.passes."""
    out = {}
    for pkg, folder in PACKAGES.items():
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = [d for d in dirnames if not d.startswith((".", "__")) and d != "passes"]
            rel = os.path.relpath(dirpath, folder)
            prefix = pkg if rel == "." else pkg + "." + rel.replace(os.sep, ".")
            for f in filenames:
                if f.endswith(".py"):
                    out[prefix if f == "__init__.py" else f"{prefix}.{f[:-3]}"] = os.path.join(dirpath, f)
    return out


def imports_of(name: str, path: str, known: dict) -> list[tuple[str, list[str]]]:
    """(imported fxprune module, names taken from it) for every import anywhere in the file."""
    is_pkg = path.endswith("__init__.py")
    tree = ast.parse(open(path).read())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name in known]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target not in known:
                continue
            taken = []
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in known:
                    out.append((sub, []))
                else:
                    taken.append(a.name)
            if taken:
                out.append((target, taken))
    return out


def test_no_import_cycles():
    known = modules()
    edges = {m: sorted({t for t, _ in imports_of(m, p, known) if t != m}) for m, p in known.items()}
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = 1
        for t in edges[m]:
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(known):
        if m not in state:
            visit(m, [m])
    assert len(known) > 40
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_private_names_imported_across_modules():
    known = modules()
    bad = [f"{m} imports {n} from {t}" for m, p in known.items() for t, names in imports_of(m, p, known)
           for n in names if n.startswith("_") and n != "__future__"]
    assert bad == []


def test_the_ir_declares_every_field_it_carries():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    graph = fxprune.analyze(net, (torch.randn(1, 3, 8, 8),))
    fresh = fxprune.ChannelGraph(graph.module, {}, graph.channel_of, {}, {}, ())
    fxprune.make_plan(graph, {"0": torch.arange(8.0)}, ratio=0.5)  # the planner fills its cache field
    assert set(vars(graph)) == set(vars(fresh))


def test_nothing_points_outside_the_repository():
    outside = re.compile(r"\b(DESIGN|METHODS|FX_NOTES)\.md\b|" + "shared" + "/|" + "seeds" + "/")
    found = []
    for folder in ("fxprune", "passes", "tests", "tools", "docs"):
        for dirpath, _, filenames in os.walk(os.path.join(ROOT, folder)):
            for f in filenames:
                if f.endswith((".py", ".md")):
                    text = open(os.path.join(dirpath, f)).read()
                    found += [f"{f}: {m.group(0)}" for m in outside.finditer(text)]
    assert found == []
