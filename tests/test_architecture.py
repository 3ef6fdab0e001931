"""The package's import structure, read from the source with ``ast`` (nothing is imported):

- ``fastjepa_kernels`` never imports ``fastjepa`` (a timm user needs only torch and triton);
- imports run one way: config -> masks -> models -> data -> train; ``io`` (encoder loading, conversion)
  depends only on config and models (and the optimizer's parameter groups); ``eval`` on io, data, models;
  the leaf modules (optim, schedules, flops, memory) on nothing first-party;
- no import cycle between modules;
- first-party imports inside functions only where they stand for an optional dependency or keep
  ``import fastjepa`` light (listed in ``LAZY_ALLOWED``).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
MODULES = {".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): p for p in SRC.rglob("*.py")}

# component -> the components it may import (a component: the first name after ``fastjepa.``)
LEAVES = {"optim", "schedules", "flops", "memory", "bench_report", "plot"}  # bench_report, plot: JSON in, a table or picture out
ALLOWED = {
    "config": set(),
    "masks": {"config"},
    "models": {"config", "masks"},
    "data": {"config", "masks", "models"},
    "io": {"config", "models", "optim"},
    "train": {"config", "masks", "models", "data", "io"} | LEAVES,
    "eval": {"config", "data", "models", "io", "train"},  # train.launch only: which ranks share an extraction
    "export": {"config", "models", "io", "train"},  # `fastjepa export`: run folders and ZeRO-3 shards -> one encoder
    **{leaf: set() for leaf in LEAVES},
}
TOP = {"__init__", "__main__", "cli"}  # the package's faces: they may import anything
# (module, imported module): lazy first-party imports that stand for an optional dependency or a light import
LAZY_ALLOWED = {
    ("fastjepa", "fastjepa.io.encoder"),  # `import fastjepa` stays light: torch comes with load_encoder
    ("fastjepa.train.backend", "fastjepa.train.deepspeed_backend"),  # DeepSpeed is optional
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path) -> list[tuple[str, bool]]:
    """``(absolute module imported, at module level?)`` for every import statement of a file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:  # `from pkg import module` imports the module; `from m import f`, m
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in MODULES else target, id(node) in top_level))
    return found




def resolve(target: str) -> str | None:
    """The first-party module an import names (``from x import function`` names module x), or None."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def component(module: str) -> str:
    parts = module.split(".")
    if parts[-1] == "__main__":
        return "__main__"
    return parts[1] if len(parts) > 1 else "__init__"


def edges():
    for name, path in MODULES.items():
        for target, top_level in imports(path):
            resolved = resolve(target)
            if resolved and resolved != name:
                yield name, resolved, top_level


def test_kernels_never_import_the_trainer():
    bad = [(a, b) for a, b, _ in edges() if a.startswith("fastjepa_kernels") and b.split(".")[0] == "fastjepa"]
    assert not bad, bad


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.split(".")[0] == "fastjepa"))
def test_imports_run_one_way(module):
    mine = component(module)
    if mine in TOP:
        return
    assert mine in ALLOWED, f"{module}: component '{mine}' has no rule in ALLOWED"
    for a, b, _ in edges():
        if a != module or b.split(".")[0] != "fastjepa":
            continue
        theirs = component(b)
        assert theirs == mine or theirs in ALLOWED[mine], f"{module} imports {b}: {mine} may not depend on {theirs}"


def test_no_import_cycles():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for a, b, top_level in edges():
        if top_level and not b.startswith(a + "."):  # a package importing its own submodules is not a cycle
            graph[a].add(b)
    seen, on_path, cycles = set(), [], []

    def visit(node):
        if node in on_path:
            cycles.append(on_path[on_path.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        on_path.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        on_path.pop()

    for m in sorted(graph):
        visit(m)
    assert not cycles, cycles


def test_lazy_first_party_imports_only_where_listed():
    lazy = {(a, b) for a, b, top_level in edges() if not top_level and a.split(".")[0] == "fastjepa"
            and b.split(".")[0] in ("fastjepa", "fastjepa_kernels") and component(a) not in {"cli", "__main__"}}
    assert lazy <= LAZY_ALLOWED, sorted(lazy - LAZY_ALLOWED)


def test_the_rules_see_the_imports():
    """The parser finds what is there: the trainer imports the step, io.convert the optimizer."""
    found = {(a, b) for a, b, _ in edges()}
    assert ("fastjepa.train.trainer", "fastjepa.train.step") in found
    assert ("fastjepa.io.convert", "fastjepa.optim") in found
    assert ("fastjepa.train.backend", "fastjepa.train.deepspeed_backend") in found
