"""The package's import graph is layered and acyclic, with internal imports at module top.

Layers, bottom to top (docs/architecture.md): runtime < folders < config, tracking < distributed < data, models <
losses < methods < train < eval < pretrain, export < sweep < report < cli, the package's __init__ < __main__.
A module imports only from lower layers
or from its own package; two packages of one layer (data, models) do not import each other.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1] / "mocov3"

LAYERS = [
    ["runtime", "version", "cpus"], ["folders"], ["config", "tracking", "commands"], ["distributed"],
    ["data", "models", "reference"],
    ["losses", "schedules"], ["methods"], ["train"],
    ["eval"], ["pretrain", "export", "submit"], ["sweep"], ["report"], ["cli", "__init__"], ["entry"], ["__main__"],
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _imports(path: Path) -> list[tuple[str, bool]]:
    """Internal modules imported by ``path``: (module, at_module_top)."""
    tree = ast.parse(path.read_text())
    me = _module_name(path).split(".") if _module_name(path) != "__init__" else []
    pkg = me if _is_package(path) else me[:-1]
    top_level = set(map(id, tree.body))
    out = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)] if node.level > 1 else pkg
                mod = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.startswith("mocov3"):
                mod = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:  # ``from . import distributed`` names a module
                cand = ROOT.joinpath(*mod, alias.name)
                targets.append(mod + [alias.name] if cand.with_suffix(".py").is_file() or cand.is_dir() else mod)
        elif isinstance(node, ast.Import):
            targets = [a.name.split(".")[1:] for a in node.names if a.name.startswith("mocov3")]
        for t in targets:
            out.append((".".join(t) or "__init__", id(node) in top_level))
    return out


def _graph() -> dict[str, set[str]]:
    g = {}
    for path in ROOT.rglob("*.py"):
        g.setdefault(_module_name(path), set())
        for mod, _ in _imports(path):
            g[_module_name(path)].add(mod)
    return g


def _layer(module: str) -> int:
    head = module.split(".")[0]
    for i, names in enumerate(LAYERS):
        if head in names:
            return i
    raise AssertionError(f"module {module} has no layer: add it to LAYERS and docs/architecture.md")


def test_every_module_has_a_layer():
    for m in _graph():
        _layer(m)


def test_imports_respect_the_layers():
    bad = []
    for m, deps in _graph().items():
        for d in deps:
            same_package = m.split(".")[0] == d.split(".")[0]
            if not same_package and _layer(d) >= _layer(m) and m not in ("__init__",):
                bad.append(f"{m} -> {d}")
    assert not bad, "imports against the layering: " + ", ".join(sorted(bad))


def _find_cycle(g: dict[str, set[str]]):
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(g.get(n, ())):
            if d == n or d not in g:
                continue
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                c = visit(d)
                if c:
                    return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state:
            c = visit(n)
            if c:
                return c
    return None


def test_no_import_cycles():
    g = _graph()
    # a package's __init__ re-exports its modules: an edge into a package means into its __init__
    cycle = _find_cycle(g)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


#: The two deliberate exceptions: the console entry and the package's ``__init__`` import the rest only when it is
#: used, so that ``mocov3 --version`` / ``--help`` and ``import mocov3.version`` do not import torch.
LAZY = {"entry": {"cli"}, "__init__": {"export"}}


def test_internal_imports_sit_at_module_top():
    inner = [f"{_module_name(p)} imports {m} inside a function"
             for p in ROOT.rglob("*.py") for m, top in _imports(p)
             if not top and m not in LAZY.get(_module_name(p), ())]
    assert not inner, "; ".join(inner)


@pytest.mark.parametrize("name", ["layer_groups", "count_params"])
def test_dead_code_stays_gone(name):
    from mocov3.models import vit

    assert not hasattr(vit, name) and not hasattr(vit.VisionTransformer, name)


def _calls(path: Path) -> list[tuple[str, int]]:
    """(name, line) of every call in ``path``: ``f(...)`` and ``x.f(...)`` both give ``f``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            out.append((name, node.lineno))
    return out


#: What sets a run up, and the one module that may call it (besides the modules that define it).
RUN_SETUP = {"init_from_env", "resolve_device", "resolve_precision", "set_device", "init_process_group"}
RUN_MODULE = "train/run.py"
DEFINERS = {"runtime.py", "distributed.py"}


def _setup_calls_outside_the_run_module(root: Path) -> list[str]:
    return [f"{p.relative_to(root)}:{line} calls {name}" for p in sorted(root.rglob("*.py"))
            if str(p.relative_to(root)) not in DEFINERS | {RUN_MODULE}
            for name, line in _calls(p) if name in RUN_SETUP]


def test_only_the_run_module_sets_up_process_group_device_and_precision():
    assert not _setup_calls_outside_the_run_module(ROOT)


def test_the_setup_check_finds_a_stray_call(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "run.py").write_text("init_from_env('cpu')\n")
    (tmp_path / "eval.py").write_text("import torch\ntorch.cuda.set_device(0)\nx = resolve_precision('auto', d)\n")
    assert _setup_calls_outside_the_run_module(tmp_path) == ["eval.py:2 calls set_device",
                                                             "eval.py:3 calls resolve_precision"]


def test_no_trainer_has_its_own_loop():
    """One loop (train/loop.py: the only code that iterates ``batches.epoch``); the trainers are short tables
    of contents that hand it a step and hooks."""
    loops = [f"{p.relative_to(ROOT)}:{line}" for p in ROOT.rglob("*.py") if p.relative_to(ROOT).parts[0] != "data"
             and str(p.relative_to(ROOT)) != "train/loop.py" for name, line in _calls(p) if name == "epoch"]
    assert not loops, loops
    for trainer in ("pretrain.py", "eval/finetune.py", "eval/linear.py"):
        n = len((ROOT / trainer).read_text().splitlines())
        assert n <= 260, f"{trainer} has {n} lines: move what is not its table of contents into a module of its own"
        assert any(name == "fit" for name, _ in _calls(ROOT / trainer)), f"{trainer} does not train through fit"


def _kind_branches(root: Path) -> list[str]:
    """Reads of a set's kind (``.sharded`` / ``.in_memory`` of an ImageData) outside the data package."""
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if rel.parts[0] == "data":
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("sharded", "in_memory") \
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                out.append(f"{rel}:{node.lineno} reads .{node.attr}")
    return out


def test_only_the_data_package_tells_the_kinds_of_set_apart():
    """Trainers and evaluations ask mocov3/data/sources.py (batches, evaluation order, identity); they never
    branch on whether a set is in memory, streamed or sharded."""
    assert not _kind_branches(ROOT)


def test_the_kind_check_finds_a_branch(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "x.py").write_text("def f(data):\n    return 1 if data.sharded else data.in_memory\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "y.py").write_text("z = d.sharded\n")
    assert _kind_branches(tmp_path) == ["eval/x.py:2 reads .sharded", "eval/x.py:2 reads .in_memory"]
