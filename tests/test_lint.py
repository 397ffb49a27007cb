"""The code passes ruff (pyflakes and pycodestyle rules, 100 columns) and mypy."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_finds_nothing():
    """No unused import, undefined name or style error in the product, tests and scripts."""
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or "ruff"
    result = subprocess.run([ruff, "check", "ticker", "simulator", "tests", "scripts"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_finds_nothing():
    """ticker/ and simulator/ type-check with the settings of [tool.mypy] in pyproject.toml
    (check_untyped_defs and the strict flags the code passes; its cache is under .venv)."""
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
