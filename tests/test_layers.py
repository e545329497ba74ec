"""The layer contract in pyproject.toml holds: import-linter finds no import that reaches up a layer,
no serving module that reaches training or tracking, and no run-time use of the `.wandb` reader."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def _lint_imports() -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    env = os.environ | {"PYTHONPATH": str(ROOT / "src")}  # this checkout's package, not an installed one
    return subprocess.run([exe, "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_layer_contracts_are_kept():
    result = _lint_imports()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout
    kept = int(result.stdout.split("Contracts: ")[1].split(" kept")[0])
    assert kept >= 3  # layers, serving, the .wandb reader as a tool


def test_every_subpackage_is_in_the_layer_contract():
    import tomllib

    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    named = {name.strip() for layer in contract["layers"] for name in layer.split("|")}
    packages = {p.name for p in (ROOT / "src" / "softprompt").iterdir()
                if (p / "__init__.py").is_file()} | {"cli", "__main__"}
    assert packages == named
