"""The package's architecture, tested: the import graph has no cycle, every unit imports only
the units below it (the data path's order), the trainer is layered within, and one CG matvec of
the implicit backward reaches a kernel through at most six files."""

import ast
import sys
from pathlib import Path

import torch

import imaml_kernels as ik
from imaml_kernels.nets import OmniglotConv

ROOT = Path(ik.__file__).parent

# The library's units, lowest first: each may import only units before it. The path of a
# meta-step reads upwards: kernels (triton, ops) -> dispatch -> CG / HVP / engine -> objective
# -> inner solvers -> the implicit op -> query forward and meta-step; then data and the trainer.
LAYERS = ("_ext", "_atomic", "reference", "triton", "ops", "dispatch", "layout", "lam", "parallel", "cg", "minres", "hvp", "engine", "nets", "objective",
          "inner", "adapted", "arguments", "plan", "implicit", "query", "step", "graphs", "data", "selfcheck", "trainer")
# The trainer's modules in layer order (the evaluation never imports the loop or the command line).
TRAINER_LAYERS = ("presets", "builders", "checkpoint", "lam", "runs", "distributed", "plots", "_cli_util", "evaluate",
                  "loop", "cli", "__main__")


def _modules():
    """``{dotted name: path}`` of every module of the package (a package by its ``__init__``)."""
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _edges(mods):
    """``{module: set of package modules it imports}``, every import statement counted (those
    inside functions too: a lazy import still ties the two together). ``from m import x`` counts
    as an import of ``m.x`` when that is a module, else of ``m``; the native extension is not a
    module here."""
    edges = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in mods else module
                           for a in node.names if not a.name.startswith("_C")]
            else:
                continue
            for t in targets:
                while t not in mods and "." in t:
                    t = t.rpartition(".")[0]
                if t in mods and t != name:
                    found.add(t)
        edges[name] = found
    return edges


def _cycles(edges):
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in edges:
        if v not in index:
            visit(v)
    return out


def _unit(name):
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the package's own __init__


def test_the_import_graph_has_no_cycle():
    edges = _edges(_modules())
    assert len(edges) > 40
    assert _cycles(edges) == []
    # The test sees a cycle when there is one.
    planted = {**edges, "imaml_kernels.ops": edges["imaml_kernels.ops"] | {"imaml_kernels.dispatch"}}
    assert ["imaml_kernels.dispatch", "imaml_kernels.ops"] in _cycles(planted)


def test_every_unit_imports_only_the_units_below_it():
    mods = _modules()
    units = {_unit(m) for m in mods} - {None}
    assert units == set(LAYERS), units ^ set(LAYERS)
    for name, targets in _edges(mods).items():
        unit = _unit(name)
        if unit is None:
            continue
        allowed = set(LAYERS[: LAYERS.index(unit) + 1])
        used = {_unit(t) for t in targets}
        assert None not in used, f"{name} imports the package's __init__ (runs back up to the top)"
        assert used <= allowed, f"{name} imports {sorted(used - allowed)}, above its layer {unit!r}"


def test_the_trainer_is_layered_and_the_library_never_imports_it():
    edges = _edges(_modules())
    for name, targets in edges.items():
        trainer = {t for t in targets if _unit(t) == "trainer"}
        if _unit(name) != "trainer":
            assert not trainer, (name, trainer)
        elif name.count(".") == 2:
            mod = name.split(".")[2]
            allowed = {f"imaml_kernels.trainer.{m}" for m in TRAINER_LAYERS[: TRAINER_LAYERS.index(mod)]}
            assert trainer - {"imaml_kernels.trainer"} <= allowed, (name, trainer - allowed)
    assert {p.stem for p in (ROOT / "trainer").glob("*.py")} == {*TRAINER_LAYERS, "__init__"}


def test_a_cg_matvec_reaches_a_kernel_through_at_most_six_files():
    """Every Python call made while a matvec of the implicit backward runs (the fused engine,
    the C++ kernels) is traced; the chain of package files from ``implicit.py``'s ``matvec`` to
    the call, the kernel's launcher included, spans at most 6 distinct files."""
    torch.manual_seed(0)
    model = OmniglotConv(5, channels=4)
    xs, ys = torch.randn(2, 5, 1, 28, 28), torch.arange(5).repeat(2, 1)
    phi = ik.implicit_adapt(model, dict(model.named_parameters()), (xs, ys), lam=2.0, inner=ik.GD(1, 0.1), solve=ik.CG(1))
    loss = ik.query_logits(model, phi, xs).sum()
    root, chains = str(ROOT), set()

    def profile(frame, event, arg):
        if event not in ("call", "c_call"):
            return
        files, f = [], frame
        while f is not None:
            path = f.f_code.co_filename
            if path.startswith(root):
                rel = path[len(root) + 1:]
                if not files or files[-1] != rel:
                    files.append(rel)
                if f.f_code.co_name == "matvec" and rel == "implicit.py":
                    chains.add(tuple(reversed(files)))
                    return
            f = f.f_back

    sys.setprofile(profile)
    try:
        loss.backward()
    finally:
        sys.setprofile(None)
    deepest = max(chains, key=lambda c: len(set(c)))
    assert any("engine/layers.py" in c and any(p.startswith("ops/") for p in c) for c in chains), chains
    assert len(set(deepest)) <= 6, " > ".join(deepest)
