"""Every third-party module the app imports is a declared runtime dependency.

`./webui.sh` installs only `[project] dependencies`; `./test.sh` also installs the test extras. A module the app
imports but only the test extras provide passes every test and still breaks for a user, so check the declaration.
"""

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def _optional_nodes(tree: ast.AST) -> set[int]:
    """Nodes inside `try: ... except ImportError` blocks: optional extras such as xformers."""
    optional: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError", "Exception")
            for h in node.handlers
        ):
            optional.update(id(inner) for stmt in node.body for inner in ast.walk(stmt))
    return optional


def _imported_top_modules() -> set[str]:
    files = [ROOT / "webui.py", *sorted((ROOT / "app").rglob("*.py"))]
    found: set[str] = set()
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        optional = _optional_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found


def _declared(section: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower().replace("_", "-") for req in section}


def test_app_imports_only_declared_runtime_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    runtime = _declared(project["dependencies"])
    dists = packages_distributions()
    missing = []
    for module in sorted(_imported_top_modules()):
        if module == "app" or module in sys.stdlib_module_names:
            continue
        owners = {d.lower().replace("_", "-") for d in dists.get(module, [])}
        assert owners, f"app imports {module!r}, which no installed distribution provides"
        if not owners & runtime:
            missing.append(f"{module} (from {', '.join(sorted(owners))})")
    assert not missing, f"imported by the app but not in [project] dependencies: {missing}"
