"""The layer contract in pyproject.toml holds: import-linter finds no import that reaches up a layer,
no serving module that reaches training or tracking, no run-time use of the `.wandb` reader, and
the Hydra plugin (a root package of its own) stays below the CLI and out of softprompt's imports."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def _lint_imports(root: Path = ROOT) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    env = os.environ | {"PYTHONPATH": str(root / "src")}  # this checkout's package, not an installed one
    return subprocess.run([exe, "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_layer_contracts_are_kept():
    result = _lint_imports()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout
    kept = int(result.stdout.split("Contracts: ")[1].split(" kept")[0])
    assert kept >= 5  # layers, serving, the .wandb reader as a tool, the plugin both ways
    assert "Analyzed 2 files" not in result.stdout


def test_the_hydra_plugin_is_checked_too(tmp_path):
    """A plugin import of the CLI layer breaks its contract (so lint-imports reads the plugin)."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    plugin = tmp_path / "src" / "hydra_plugins" / "softprompt_packed_launcher" / "packed_launcher.py"
    plugin.write_text(plugin.read_text() + "\n\ndef _bad():\n    import softprompt.experiments.report  # noqa\n")
    result = _lint_imports(tmp_path)
    out = " ".join(result.stdout.split())  # lint-imports wraps its lines at the terminal width
    assert result.returncode == 1
    assert "hydra_plugins.softprompt_packed_launcher.packed_launcher -> softprompt.experiments.report" in out
    assert "Contracts: 4 kept, 1 broken." in out


def test_every_subpackage_is_in_the_layer_contract():
    import tomllib

    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    named = {name.strip() for layer in contract["layers"] for name in layer.split("|")}
    packages = {p.name for p in (ROOT / "src" / "softprompt").iterdir()
                if (p / "__init__.py").is_file()} | {"cli", "__main__"}
    assert packages == named
