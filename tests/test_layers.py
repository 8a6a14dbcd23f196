"""The architecture as a test: every folder of the package is one layer, and imports only point down.

Layers, bottom to top (docs/architecture.md draws them):

    0  utils, _openmp                 atomic writes, PNG grids; OpenMP's wait policy, set before torch loads
    1  core, nets, data               process, predictions, denoiser, grids, mixture; backbones; data sets
    2  samplers, objectives, likelihood, guidance   the algorithms, on objects of core
    3  inverse                        posterior samplers for inverse problems (built on samplers)
    4  names                          the one table from strings to objects
    5  training, evaluation, interop  runs, measurements, other libraries
    6  app                            command line, demo, plots, load
    7  torchdiffusion/__init__.py, __main__.py (the facade)

A module may import from its own folder and from lower layers, never from a higher layer nor from another
folder of its own layer; and no set of modules imports itself around a cycle. Every import counts, those
inside functions too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "torchdiffusion"

LAYERS = {
    "utils": 0,
    "_openmp": 0,
    "core": 1,
    "nets": 1,
    "data": 1,
    "samplers": 2,
    "objectives": 2,
    "likelihood": 2,
    "guidance": 2,
    "inverse": 3,
    "names": 4,
    "training": 5,
    "evaluation": 5,
    "interop": 5,
    "app": 6,
    "__init__": 7,
    "__main__": 7,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _target(name: str, known: set[str]) -> str | None:
    """The module of the package that ``name`` (dotted, relative to the package) refers to, if any."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that module ``name`` imports (anywhere in its body)."""
    is_pkg = path.name == "__init__.py" and name != "__init__"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
                mod = "torchdiffusion." + ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            # ``from pkg import sub`` depends on the submodule ``sub``; ``from pkg import name`` on pkg itself
            names = [f"{mod}.{a.name}" for a in node.names]
            names = [n if n.removeprefix("torchdiffusion.") in known else mod for n in names]
        else:
            continue
        for n in names:
            if n == "torchdiffusion" or n.startswith("torchdiffusion."):
                t = _target(n.removeprefix("torchdiffusion").lstrip("."), known)
                if t is not None and t != name:
                    found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(name, path, known) for name, path in mods.items()}


def folder(name: str) -> str:
    return name.split(".")[0]


def violations(g: dict[str, set[str]]) -> list[str]:
    """Imports that point up a layer or sideways into another folder of the same layer."""
    bad = []
    for src, targets in g.items():
        for dst in targets:
            a, b = folder(src), folder(dst)
            if a == b:
                continue
            if LAYERS[b] > LAYERS[a]:
                bad.append(f"{src} -> {dst}: up from layer {LAYERS[a]} ({a}) to {LAYERS[b]} ({b})")
            elif LAYERS[b] == LAYERS[a]:
                bad.append(f"{src} -> {dst}: sideways within layer {LAYERS[a]} ({a} and {b})")
    return sorted(bad)


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan 1972)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
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
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_every_module_is_in_a_layer():
    unplaced = sorted(name for name in modules() if folder(name) not in LAYERS)
    assert not unplaced, f"modules outside the layers of tests/test_layers.py: {unplaced}"


def test_imports_point_down():
    bad = violations(graph())
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, f"import cycles: {found}"


def test_the_checks_catch_what_they_look_for():
    """The checkers flag an upward import, a sideways one and a cycle (else the tests above prove nothing)."""
    g = {"core.process": {"samplers.ddim"}, "samplers.ddim": set(), "nets.mlp": {"data.toy"}, "data.toy": set()}
    assert len(violations(g)) == 2
    assert cycles({"training.loop": {"training.step"}, "training.step": {"training.loop"}}) == [
        ["training.loop", "training.step"]
    ]
    g = graph()  # and the real graph has edges to check: the resolver sees the package's imports
    assert "core.process" in g["core.processes"] and "core.denoiser" in g["samplers"]
