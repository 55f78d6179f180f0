"""The house rules of pipeline/ (docs: development/layout.md), read from the source with ast:
no import cycle, training never reaches the compare step or the CLI, and the digest that
decides whether a finished run is reused covers every module, subpackages included."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

from runs_helpers import REPO_ROOT

PACKAGE = REPO_ROOT / "pipeline"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, tuple[set[str], set[str]]]:
    """{module: (the pipeline modules it imports, the outside packages it imports)}."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        ours, theirs = set(), set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    (ours if alias.name.startswith("pipeline") else theirs).add(alias.name)
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    (ours if (node.module or "").startswith("pipeline") else theirs).add(
                        node.module or "")
                    continue
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:  # `from . import train`: a module, if there is one
                    candidate = f"{target}.{alias.name}"
                    ours.add(candidate if candidate in modules else target)
        # Importing any submodule imports the package first: an edge to it is Python's, not
        # a design dependency (its only code is code_version and the lazy watch export).
        graph[name] = ({m for m in ours if m in modules and m not in (name, "pipeline")},
                       {m.split(".")[0] for m in theirs})
    return graph


def _reach(graph, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for m in graph[todo.pop()][0]:
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


def test_no_module_imports_itself_through_others():
    graph = _imports()
    cycles = [m for m in graph if m in _reach(graph, m)]
    assert not cycles, f"import cycles through: {sorted(cycles)}"


def test_training_reaches_neither_compare_nor_the_cli_nor_imports_pandas_or_click():
    graph = _imports()
    reached = _reach(graph, "pipeline.train") | {"pipeline.train"}
    steps = {"pipeline.compare", "pipeline.summary", "pipeline.param_diff", "pipeline.workflow",
             "pipeline.sweep", "pipeline.cli", "pipeline.stats"}
    assert not reached & steps, sorted(reached & steps)
    # query, the one reader that training shares with the steps, returns tables as pandas
    # DataFrames (MLflow imports pandas whatever we do); training's own modules use neither.
    direct = {m: sorted(graph[m][1] & {"pandas", "click"}) for m in reached - {"pipeline.query"}}
    assert not any(direct.values()), {m: d for m, d in direct.items() if d}


def test_the_pure_logic_imports_no_torch_and_no_mlflow():
    graph = _imports()
    for module in ("pipeline.health", "pipeline.names", "pipeline.config", "pipeline.console"):
        assert not graph[module][1] & {"torch", "mlflow", "pandas", "click"}, module


def test_the_code_version_changes_when_a_subpackage_module_changes(tmp_path):
    copy = tmp_path / "pipeline"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))

    def digest() -> str:
        return subprocess.run([sys.executable, "-c", "import pipeline; print(pipeline.code_version())"],
                              cwd=tmp_path, capture_output=True, text=True, check=True,
                              env={"PYTHONPATH": str(tmp_path), "PATH": ""}).stdout.strip()

    before = digest()
    assert before == digest()  # the same source, the same digest
    with open(copy / "tracking" / "run.py", "a") as f:
        f.write("\n# an edit deep in the package\n")
    assert digest() != before
