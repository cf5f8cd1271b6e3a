"""The package's layers, as ../shared/DESIGN.md draws them, checked on the source's import statements.

Every `import` and `from ... import` in src/alignkit is read with `ast` (those inside functions too,
so a lazy import cannot hide an edge). Rules:
- layers: a module imports only its own layer or lower ones (table `LAYERS`, bottom first);
- `ops/` and `losses/` import nothing but torch, the standard library and each other (losses on
  ops, never ops on losses): no models, no model configs, no transformers;
- `data/` knows nothing of models (no `alignkit.models`, no transformers model classes);
- trainers never import each other (a stage's module with `run(config)`), stages reach trainers
  only through their `run`;
- the import graph has no cycles.
`test_a_forbidden_import_is_caught` shows that each rule fails on a planted violation.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = "alignkit"

# Bottom first: a module may import modules of its own layer or of the layers before it.
LAYERS: list[tuple[str, ...]] = [
    ("alignkit.errors", "alignkit.console", "alignkit.atomic", "alignkit.config"),
    ("alignkit.ops",),
    ("alignkit.losses",),
    ("alignkit.data", "alignkit.models", "alignkit.feedback", "alignkit.rewards", "alignkit.tasks"),
    ("alignkit.rollout", "alignkit.accel"),
    ("alignkit.trainers", "alignkit.stages"),
    ("alignkit.worlds",),
    ("alignkit.pipeline", "alignkit.pipeline_cache", "alignkit.report", "alignkit.report_html",
     "alignkit.report_plots", "alignkit.cli", "alignkit"),
]
# The stage table (module paths as strings) sits in alignkit.stages/__init__; trainer modules are
# the ones with a `run(config)`.
PURE = ("alignkit.ops", "alignkit.losses")
PURE_ALLOWED = ("torch", "__future__", "math", "typing", "dataclasses", "collections", "functools")


def module_name(path: Path, root: Path = SRC) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str, modules: set[str] | None = None) -> list[tuple[str, int]]:
    """(imported module, line) of every import statement in the file, relative imports resolved.

    `from package import submodule` is an import of the submodule (as `from package.submodule import
    name` is not one of the package's `__init__`), when `modules` says that it is one.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append((sub if modules is not None and sub in modules else base, node.lineno))
    return out


def graph(root: Path = SRC) -> dict[str, list[tuple[str, int]]]:
    """Module -> the alignkit modules it imports (only names that are modules of the package)."""
    files = {module_name(p, root): p for p in (root / PACKAGE).rglob("*.py")}
    out = {}
    for name, path in files.items():
        edges = [(t, line) for t, line in imports_of(path, name, set(files)) if t in files and t != name]
        out[name] = sorted(set(edges))
    return out


def layer_of(module: str) -> int:
    best, rank = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    if rank < 0:
        raise AssertionError(f"{module} is in no layer of LAYERS: add it")
    return rank


def is_trainer(module: str, root: Path = SRC) -> bool:
    """A stage's module: in trainers/ or stages/ and defining `run(config)`."""
    if not module.startswith(("alignkit.trainers.", "alignkit.stages.")):
        return False
    path = root / (module.replace(".", "/") + ".py")
    return path.is_file() and any(isinstance(n, ast.FunctionDef) and n.name == "run"
                                  for n in ast.parse(path.read_text()).body)


def violations(root: Path = SRC) -> list[str]:
    g = graph(root)
    found = []
    for module, edges in g.items():
        for target, line in edges:
            where = f"{module} (line {line}) imports {target}"
            if layer_of(target) > layer_of(module):
                found.append(f"layer: {where}")
            if module.startswith(("alignkit.data.", "alignkit.data")) and target.startswith("alignkit.models"):
                found.append(f"data knows no models: {where}")
            if is_trainer(module, root) and is_trainer(target, root) and module.startswith("alignkit.trainers."):
                found.append(f"trainers never import each other: {where}")
        if module.startswith(PURE):
            path = root / (module.replace(".", "/") + ".py")
            if not path.is_file():
                path = root / module.replace(".", "/") / "__init__.py"
            for target, line in imports_of(path, module):
                top = target.split(".")[0]
                if top == PACKAGE:
                    ok = target.startswith("alignkit.ops") or (module.startswith("alignkit.losses")
                                                               and target.startswith("alignkit.losses"))
                else:
                    ok = top in PURE_ALLOWED or top in sys.stdlib_module_names and top not in ("importlib",)
                if not ok:
                    found.append(f"pure (torch only): {module} (line {line}) imports {target}")
    found += [f"cycle: {' -> '.join(c)}" for c in cycles(g)]
    return found


def cycles(g: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w, _ in g.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return components


def test_the_package_keeps_its_layers():
    assert violations() == []


@pytest.mark.parametrize("module, line, rule", [
    ("ops/masking.py", "from alignkit.models.reward_model import hf_model", "pure"),
    ("ops/masking.py", "import transformers", "pure"),
    ("losses/sft.py", "from alignkit.rollout.types import Rollout", "layer"),
    ("data/collate.py", "from alignkit.models.load import load_tokenizer", "data knows no models"),
    ("models/save.py", "from alignkit.trainers.loop import TrainLoop", "layer"),
    ("trainers/dpo.py", "from alignkit.trainers.sft import SFTConfig", "trainers never import each other"),
    ("trainers/sft.py", "from alignkit.cli import main", "layer"),
    ("rollout/types.py", "from alignkit.rollout.generate import sample", "cycle"),
])
def test_a_forbidden_import_is_caught(tmp_path, module, line, rule):
    import shutil

    shutil.copytree(SRC / PACKAGE, tmp_path / PACKAGE)
    target = tmp_path / PACKAGE / module
    source = target.read_text()
    head, sep, rest = source.partition("from __future__ import annotations\n")
    target.write_text(head + sep + line + "\n" + rest)
    found = violations(tmp_path)
    assert any(v.startswith(rule) for v in found), found
