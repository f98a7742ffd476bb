"""The dependency ladder (docs/ARCHITECTURE.md): imports run one way, down these rungs, and no module
imports another's private names. Read from the source with `ast`, nested imports included (an import
inside a function is still a dependency), so the rule holds without importing anything.

    definitions.py > assets/ > resources/ > pipeline/cli > pipeline/serve, pipeline/deploy > release
    > eval > train > data > the flat core (pipeline/*.py)
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNGS = {  # package (dotted prefix) -> rung; a module takes the rung of its longest matching prefix
    "pipeline": 0,
    "pipeline.data": 1,
    "pipeline.train": 2,
    "pipeline.eval": 3,
    "pipeline.release": 4,
    "pipeline.serve": 5,
    "pipeline.deploy": 5,
    "pipeline.cli": 6,
    "resources": 7,
    "assets": 8,  # an asset names the resources it takes
    "definitions": 9,
}


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str | None:
    """The RUNGS key a module belongs to, or None for anything outside kiln."""
    best = None
    for prefix in RUNGS:
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best)):
            best = prefix
    return best


def kiln_modules(root: Path) -> dict[str, Path]:
    files = [*root.glob("pipeline/**/*.py"), *root.glob("assets/*.py"), *root.glob("resources/*.py")]
    files += [root / "definitions.py"] if (root / "definitions.py").is_file() else []
    return {module_name(f, root): f for f in files}


def imports_of(module: str, path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, imported names) for every import in the file, at any depth."""
    found = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:  # a relative import, resolved against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            found.append((node.lineno, target, [alias.name for alias in node.names]))
    return found


def violations(root: Path) -> list[str]:
    """Every import that points up the ladder or across a rung, every private name imported from
    another module, every import of dagster under pipeline/, and every cycle among kiln's modules."""
    modules = kiln_modules(root)
    found, edges = [], {m: set() for m in modules}
    for module, path in sorted(modules.items()):
        own = package_of(module)
        where = path.relative_to(root)
        for line, target, names in imports_of(module, path):
            if own and own.startswith("pipeline") and target.split(".")[0] == "dagster":
                found.append(f"{where}:{line}: pipeline/ imports dagster")
            other = package_of(target)
            if other is None:
                continue
            # `from pipeline import hub` names a module: count it as that module
            targets = [f"{target}.{n}" if f"{target}.{n}" in modules else target for n in names] or [target]
            for t in {*targets}:
                t_pkg = package_of(t)
                if t != module and t in modules:
                    edges[module].add(t)
                up = RUNGS[t_pkg] > RUNGS[own]
                across = RUNGS[t_pkg] == RUNGS[own] and t_pkg != own and RUNGS[own] > 0
                if up or across:
                    found.append(f"{where}:{line}: {module} (rung {RUNGS[own]}) imports {t} (rung {RUNGS[t_pkg]})")
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            private = [n for n in private if f"{target}.{n}" not in modules]  # a private module is named, not taken
            if private and target != module:
                found.append(f"{where}:{line}: {module} imports private {', '.join(private)} from {target}")
    found += [f"import cycle: {' -> '.join(c)}" for c in cycles(edges)]
    return found


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of modules that import each other (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return groups


def test_kiln_imports_run_down_the_ladder():
    found = violations(ROOT)
    assert not found, "imports against docs/ARCHITECTURE.md's ladder:\n" + "\n".join(found)


def test_every_module_has_a_rung():
    unplaced = [m for m in kiln_modules(ROOT) if package_of(m) is None]
    assert not unplaced
    assert len(kiln_modules(ROOT)) > 80


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_the_check_finds_an_upward_import_a_private_name_a_cycle_and_dagster(tmp_path):
    root = _write(tmp_path, {
        "pipeline/__init__.py": "",
        "pipeline/config.py": "from pipeline.data.ingest import Source\n",  # core -> data: up
        "pipeline/data/__init__.py": "",
        "pipeline/data/ingest.py": "from pipeline.train.tok import _kind\nSource = 1\n",  # up, and private
        "pipeline/train/__init__.py": "",
        "pipeline/train/tok.py": "def _kind(): ...\nfrom pipeline import config\n",
        "pipeline/serve/__init__.py": "",
        "pipeline/serve/a.py": "def f():\n    from pipeline.serve.b import g\n",  # a cycle through a nested import
        "pipeline/serve/b.py": "from pipeline.serve import a\nimport dagster\ng = 1\n",
        "pipeline/deploy/__init__.py": "",
        "pipeline/deploy/up.py": "from ..serve.a import f\n",  # across a rung, written relative
    })  # fmt: skip
    found = "\n".join(violations(root))
    assert "pipeline.config (rung 0) imports pipeline.data.ingest (rung 1)" in found
    assert "pipeline.data.ingest (rung 1) imports pipeline.train.tok (rung 2)" in found
    assert "imports private _kind from pipeline.train.tok" in found
    assert "import cycle: pipeline.serve.a -> pipeline.serve.b" in found
    assert "pipeline/serve/b.py:2: pipeline/ imports dagster" in found
    assert "pipeline.deploy.up (rung 5) imports pipeline.serve.a (rung 5)" in found
    assert "pipeline.train.tok (rung 2) imports pipeline.config" not in found  # down the ladder is fine


def test_the_check_passes_a_tree_that_keeps_the_ladder(tmp_path):
    root = _write(tmp_path, {
        "pipeline/__init__.py": "",
        "pipeline/io.py": "import json\n",
        "pipeline/data/__init__.py": "",
        "pipeline/data/clean.py": "from pipeline.io import json\nfrom pipeline.data import ingest\n",
        "pipeline/data/ingest.py": "from pipeline import io\n",
        "assets/__init__.py": "",
        "assets/corpus.py": "import dagster\nfrom pipeline.data.clean import json\n",
    })  # fmt: skip
    assert violations(root) == []
