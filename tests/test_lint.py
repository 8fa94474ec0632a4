"""The code passes the linter configured in pyproject.toml ([tool.ruff]), so CI keeps it that way."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_code_passes_ruff():
    try:
        import ruff  # noqa: F401
    except ImportError:
        raise AssertionError("ruff is not installed; it is part of the test extra: pip install -e '.[test]'") from None
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "lawa_suite", "tests", "benchmarks"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_test_files_share_helpers_only_through_helpers_and_conftest():
    # a helper another test file imports lives in tests/helpers.py (or is a conftest fixture), once; the child
    # scripts a test launches (_fsdp_child.py, ...) are imported by their own test for what both processes define
    import ast

    importing = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            importing += [f"{path.name} imports {n}" for n in names if n.startswith("test_")]
    assert importing == []
