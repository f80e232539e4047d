"""The package's layers (ARCHITECTURE.md): a module imports only from its own layer or lower
ones — absolute, relative (``from .x import``, ``from .. import``) and ``from dpface import
x`` imports alike, at module level or inside functions."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Low to high.
LAYERS = [
    ["dpface.registry", "dpface.schema", "dpface.io", "dpface.seeding", "dpface.rundir"],
    ["dpface.distributed", "dpface.ops"],
    ["dpface.models", "dpface.losses", "dpface.data"],
    ["dpface.heads"],
    ["dpface.eval", "dpface.cluster"],
    ["dpface.config", "dpface.restore", "dpface.cluster.embed"],
    ["dpface.engine"],
    ["dpface.cli", "dpface.commands", "dpface.__main__", "dpface.cluster.self_train"],
]


def layer(mod: str) -> int | None:
    best = None
    for i, names in enumerate(LAYERS):
        for p in names:
            if (mod == p or mod.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    return None if best is None else best[0]


def modules() -> dict[str, Path]:
    out = {}
    for f in sorted((ROOT / "dpface").rglob("*.py")):
        mod = ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        out[mod] = f
    return out


def imported(mod: str, path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every dpface import in ``path``, relative ones resolved."""
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target))
            # `from dpface import ops` / `from . import x`: the names may be submodules
            out += [(node.lineno, f"{target}.{a.name}") for a in node.names]
    return [(line, t) for line, t in out if t == "dpface" or t.startswith("dpface.")]


def test_relative_imports_are_resolved():
    got = [t for _, t in imported("dpface.eval.ijb", ROOT / "dpface" / "eval" / "ijb.py")]
    assert "dpface.eval.verification" in got  # `from .verification import …`
    got = dict((t, line) for line, t in imported("dpface.eval", ROOT / "dpface" / "eval" / "__init__.py"))
    assert "dpface.eval.bin_sets" in got  # `from .bin_sets import …` in a package __init__


def test_no_module_imports_from_a_layer_above_it():
    mods = modules()
    bad, unplaced = [], []
    for mod, f in mods.items():
        me = layer(mod)
        if me is None:
            if mod != "dpface":
                unplaced.append(mod)
            continue
        for line, target in imported(mod, f):
            target = _owner(target, mods)  # a name imported from a module is judged by its module
            lv = layer(target)
            if lv is not None and lv > me:
                bad.append(f"{f.relative_to(ROOT)}:{line}: {mod} imports {target}")
    assert not unplaced, f"modules in no layer (add them to LAYERS and ARCHITECTURE.md): {unplaced}"
    assert not bad, "imports up the layers:\n" + "\n".join(sorted(set(bad)))


def _owner(target: str, mods) -> str:
    """The module a dotted import target names (a name imported from a module is its module)."""
    while target not in mods and "." in target:
        target = target.rpartition(".")[0]
    return target


def test_no_import_cycle():
    """No two modules import each other, directly or through others, whether the import runs
    at load time or inside a function (a lazy import hides a cycle, it does not remove it).
    A package's ``__init__`` is not part of its submodules' imports."""
    mods = modules()
    graph = {m: set() for m in mods}
    for mod, f in mods.items():
        for _, target in imported(mod, f):
            t = _owner(target, mods)
            if t in mods and t != mod and not mod.startswith(t + "."):
                graph[mod].add(t)
    # Tarjan's strongly connected components: any component of 2+ modules is a cycle.
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


RUN_DIR_NAMES = ("metrics.jsonl", "final_metrics.json", "wandb_run_id", "MODEL_CARD.md", "model_card.json",
                 "meta.json", "config.yaml", "checkpoints", "plots", "step-")


def _docstrings(tree) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def test_only_rundir_spells_the_run_directory_layout():
    """RunDir (dpface/rundir.py) owns every name under a run directory; code elsewhere asks
    it instead of formatting `checkpoints/step-…`, `metrics.jsonl`, … itself."""
    bad = []
    for mod, f in modules().items():
        if mod == "dpface.rundir":
            continue
        tree = ast.parse(f.read_text())
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                text = node.value
                hit = [n for n in RUN_DIR_NAMES if text == n or (n == "step-" and text.startswith(n))
                       or text.endswith("/" + n)]
                if hit:
                    bad.append(f"{f.relative_to(ROOT)}:{node.lineno}: {text!r}")
    assert not bad, "run-directory names spelled outside dpface/rundir.py:\n" + "\n".join(bad)
