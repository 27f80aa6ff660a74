"""The import layers hold: what docs/architecture.md ("Layers") promises, checked on the code.

- import-linter's layers contract (``[tool.importlinter]`` in pyproject.toml): each module
  imports only from layers below its own, and the stages never import each other;
- no import inside a function, where a cycle or a layer breach would hide, except the
  optional heavy model runtime (torch, monai, and ``gateway.infer.segmentation``, which
  imports both at its top), each with a comment saying why: the gateway process and
  ``gateway --help`` never load torch; only the model runner processes do.  pyarrow too
  (0.44 s to import ``pyarrow.parquet``): only ``gateway findings export --format parquet``
  loads it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "gateway"
# the optional "models" extra (seconds to import), and our one module built on it at the top
HEAVY = frozenset({"torch", "monai", "gateway.infer.segmentation", "pyarrow"})


def test_the_import_layers_contract_is_kept() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run(
        [str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    report = proc.stdout[proc.stdout.find("Broken contracts") :] or proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    assert "Contracts: 1 kept, 0 broken." in proc.stdout


def _function_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            found += [n for n in ast.walk(node) if isinstance(n, ast.Import | ast.ImportFrom)]
    return found


def _roots(node: ast.Import | ast.ImportFrom) -> set[str]:
    """What an import loads: the top package, or the whole name of one of ours."""
    names = (
        [node.module or ""]
        if isinstance(node, ast.ImportFrom)
        else [alias.name for alias in node.names]
    )
    if isinstance(node, ast.ImportFrom) and node.level:
        return {"."}
    return {n if n.startswith("gateway") else n.split(".")[0] for n in names}


def test_no_imports_inside_functions_but_the_heavy_model_runtime() -> None:
    problems: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in _function_imports(ast.parse("\n".join(lines), str(path))):
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            roots = _roots(node)
            if not roots <= HEAVY:
                problems.append(f"{where}: imports {', '.join(sorted(roots))} inside a function")
                continue
            said = lines[node.lineno - 1] + (lines[node.lineno - 2] if node.lineno > 1 else "")
            if "#" not in said:
                problems.append(f"{where}: a lazy import of {', '.join(roots)} needs a comment")
    assert not problems, "\n".join(problems)


def test_the_checks_see_a_breach() -> None:
    """The AST check is not vacuous: it finds an import hidden in a function."""
    tree = ast.parse("def f():\n    from gateway.app import Gateway\n    import torch  # heavy\n")
    found = [sorted(_roots(n)) for n in _function_imports(tree)]
    assert found == [["gateway.app"], ["torch"]]
