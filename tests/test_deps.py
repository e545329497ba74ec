"""pyproject's dependencies against what src/, tests/ and scripts/ import (scripts/check_deps.py)."""

from __future__ import annotations

import importlib.util
import re

from conftest import ROOT

spec = importlib.util.spec_from_file_location("check_deps", ROOT / "scripts" / "check_deps.py")
check_deps = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_deps)


def test_declared_dependencies_match_the_imports():
    assert check_deps.problems() == []


def test_an_undeclared_import_and_an_unused_dependency_are_reported(tmp_path):
    text = (ROOT / "pyproject.toml").read_text()
    text = re.sub(r'\n\s*"PyYAML[^"]*",', "", text, count=1)  # src imports yaml
    text = text.replace('dependencies = [', 'dependencies = [\n    "evaluate>=0.4",', 1)  # nothing imports it
    (tmp_path / "pyproject.toml").write_text(text)
    found = check_deps.problems(tmp_path / "pyproject.toml")
    assert found == [
        "yaml (pyyaml): imported by src/softprompt/experiments/report.py but not in [project] dependencies "
        "or a feature extra",
        "yaml (pyyaml): imported by tests/test_sweeps.py but not declared (tests and scripts: the dev extra)",
        "evaluate: declared in dependencies but nothing imports it; drop it (or say in NOT_IMPORTED why it is needed)",
    ]


def test_sweeps_imports_without_warnings():
    """The pinned `sweeps` release imports without a warning reaching the user."""
    import warnings

    from softprompt.experiments.sweep import _sweeps

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _sweeps().next_run is not None
    assert [str(w.message) for w in caught] == []
