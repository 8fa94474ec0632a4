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
