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
    # the first importing file of each kind is named; which one it is depends on the tree
    assert len(found) == 3, found
    assert re.fullmatch(r"yaml \(pyyaml\): imported by src/softprompt/\S+\.py but not in \[project\] dependencies "
                        r"or a feature extra", found[0]), found[0]
    assert re.fullmatch(r"yaml \(pyyaml\): imported by tests/test_\w+\.py but not declared \(tests and scripts: "
                        r"the dev extra\)", found[1]), found[1]
    assert found[2] == ("evaluate: declared in dependencies but nothing imports it; drop it (or say in "
                        "NOT_IMPORTED why it is needed)")


def test_an_extra_imported_at_module_level_is_reported(tmp_path):
    """A package of a feature extra may only be imported inside the function that needs it: PyYAML
    moved into the `report` extra is reported for each of src's module-level `import yaml`."""
    text = (ROOT / "pyproject.toml").read_text()
    text = re.sub(r'\n\s*"PyYAML[^"]*",', "", text, count=1)
    text = text.replace('report = ["matplotlib>=3.9"]', 'report = ["matplotlib>=3.9", "PyYAML>=6.0"]')
    (tmp_path / "pyproject.toml").write_text(text)
    found = check_deps.problems(tmp_path / "pyproject.toml")
    assert len(found) == 1, found
    assert re.fullmatch(r"yaml \(pyyaml\): imported at module level by src/softprompt/\S+\.py, but it is only in the "
                        r"report extra; import it inside the function that needs it", found[0]), found[0]


def test_the_extras_are_one_per_feature_and_dev_holds_them_all():
    decl = check_deps.declared()
    assert {"sweeps", "matplotlib"} & decl["dependencies"] == set()  # `python train.py` needs neither
    assert (decl["sweeps"], decl["report"], decl["demo"]) == ({"sweeps"}, {"matplotlib"}, {"gradio"})
    assert decl["all"] == (decl["sweeps"] | decl["report"] | decl["demo"] | decl["dashboard"] | decl["slurm"]
                           | decl["quantization"])
    assert decl["all"] <= decl["dev"]


def test_sweeps_imports_without_warnings():
    """The pinned `sweeps` release imports without a warning reaching the user."""
    import warnings

    from softprompt.experiments.sweep import _sweeps

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _sweeps().next_run is not None
    assert [str(w.message) for w in caught] == []
