"""What users of the ecosystem already set keeps working: W&B and Gradio environment variables,
command-line settings that the chosen presets do not read (an error, never silence), and quiet logs."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import ROOT, TINY, child_env, compose, run_cli

from softprompt.core.config import CONF_DIR
from softprompt.core.errors import UserError
from softprompt.track.records import read_run
from softprompt.track.wandb_run import chosen_mode, placement, resolve_mode, run_name
from softprompt.train.preflight import check_overrides, unused_overrides

# the smallest tiny job: 1 optimizer step, 2 new tokens for one prompt
QUICK = [o for o in TINY if not o.startswith(("training.max_steps", "eval."))] + [
    "training.max_steps=1", "eval.max_new_tokens=2", "eval.num_heldout_generations=1", "eval.prompts=[Hi]"]
WANDB_VARS = ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_TAGS", "WANDB_DIR", "WANDB_RUN_GROUP", "WANDB_NAME")


# --- W&B placement: the command line > the WANDB_* variables > our defaults ---------------------


@pytest.fixture
def no_wandb_vars(monkeypatch):
    for var in WANDB_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_placement_defaults_without_variables(no_wandb_vars, tmp_path):
    where = placement(compose(QUICK), tmp_path)
    assert where == {"project": "softprompt", "entity": None, "group": None, "tags": [], "dir": str(tmp_path)}


def test_placement_takes_the_variables(no_wandb_vars, tmp_path):
    no_wandb_vars.setenv("WANDB_PROJECT", "envproj")
    no_wandb_vars.setenv("WANDB_ENTITY", "envteam")
    no_wandb_vars.setenv("WANDB_TAGS", "a, b,,c")
    no_wandb_vars.setenv("WANDB_DIR", str(tmp_path / "w"))
    no_wandb_vars.setenv("WANDB_RUN_GROUP", "envgroup")
    where = placement(compose(QUICK), tmp_path / "run")
    assert where == {"project": "envproj", "entity": "envteam", "group": "envgroup", "tags": ["a", "b", "c"],
                     "dir": str(tmp_path / "w")}


def test_placement_command_line_beats_the_variables(no_wandb_vars, tmp_path):
    for var in WANDB_VARS:
        no_wandb_vars.setenv(var, "from-env")
    cfg = compose(QUICK + ["wandb.project=cli", "wandb.entity=team", "wandb.group=g", "wandb.tags=[]",
                           f"wandb.dir={tmp_path}/d"])
    assert placement(cfg, tmp_path / "run") == {"project": "cli", "entity": "team", "group": "g", "tags": [],
                                                "dir": f"{tmp_path}/d"}


# --- one precedence for every wandb.* key: command line > environment > preset > default -------


def test_a_preset_beats_defaults_and_the_environment_beats_a_preset(no_wandb_vars, tmp_path):
    """`experiment=offline` pins wandb.mode=offline and tags [offline]; a variable the user exported
    beats them, a key on the command line beats the variable."""
    preset = ["experiment=offline"]
    cfg = compose(preset)
    assert chosen_mode(cfg.wandb.mode, preset) == "offline"
    assert placement(cfg, tmp_path, preset)["tags"] == ["offline"]
    no_wandb_vars.setenv("WANDB_MODE", "disabled")
    no_wandb_vars.setenv("WANDB_TAGS", "mine")
    assert chosen_mode(cfg.wandb.mode, preset) == "disabled"
    assert resolve_mode(cfg.wandb.mode, preset) == "disabled"
    assert placement(cfg, tmp_path, preset)["tags"] == ["mine"]
    given = [*preset, "wandb.mode=offline", "wandb.tags=[cli]"]
    no_wandb_vars.setenv("WANDB_MODE", "online")
    cfg = compose(given)
    assert chosen_mode(cfg.wandb.mode, given) == "offline"
    assert placement(cfg, tmp_path, given)["tags"] == ["cli"]
    # the default mode (auto) takes the variable; wandb's spellings (dryrun, run) are understood
    for env, mode in (("online", "online"), ("dryrun", "offline"), ("run", "online"), ("", "auto")):
        no_wandb_vars.setenv("WANDB_MODE", env)
        assert chosen_mode("auto", []) == mode, env
    no_wandb_vars.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(UserError, match="^WANDB_MODE='sometimes' is not a W&B mode; set it to online, offline "
                                        "or disabled, or unset it$"):
        chosen_mode("auto", [])


def test_wandb_name_is_kept_unless_the_command_line_names_the_run(no_wandb_vars):
    cfg = compose(["training.learning_rate=0.01"])
    assert run_name(cfg, "vt4", ["training.learning_rate=0.01"]) == "vt4-ep6-lr0.01"
    no_wandb_vars.setenv("WANDB_NAME", "my-run")
    assert run_name(cfg, "vt4", ["training.learning_rate=0.01"]) == "my-run"
    cfg = compose(["wandb.name=cli-run"])
    assert run_name(cfg, "vt4", ["wandb.name=cli-run"]) == "cli-run"


def test_the_hydra_command_line_is_where_the_precedence_looks(no_wandb_vars):
    """Under `python train.py ...` the overrides come from Hydra's own record of the command line;
    `run(cfg)` called from Python has none, and then the config it was given counts as chosen."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    assert not HydraConfig.initialized()
    no_wandb_vars.setenv("WANDB_MODE", "disabled")
    for overrides, mode in ((["experiment=offline"], "disabled"),
                            (["experiment=offline", "wandb.mode=offline"], "offline")):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            job = hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(job)
        try:
            assert chosen_mode(job.wandb.mode) == mode, overrides
        finally:
            HydraConfig.instance().cfg = None
    assert chosen_mode("offline") == "offline"  # no Hydra job: the caller's config


def test_wandb_mode_disabled_beats_the_offline_preset_on_the_command_line(tmp_path):
    """`WANDB_MODE=disabled make run`: the run finishes and writes no W&B files."""
    job = [o for o in QUICK if not o.startswith("wandb.")]
    result = run_cli(["experiment=offline", *job, f"hydra.run.dir={tmp_path / 'run'}"],
                     env={"WANDB_MODE": "disabled"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.json").is_file()
    assert not (tmp_path / "run" / "wandb").exists() and "wandb: run" not in result.stdout


NOISE = re.compile(r"\[absl\]|Using default tokenizer|is_gradient_checkpointing|FutureWarning|DeprecationWarning")


def test_cli_run_goes_to_wandb_project_from_env_and_logs_quietly(tmp_path):
    """`WANDB_PROJECT=x python train.py ...`: the run is in project x, with the WANDB_TAGS tags, in
    WANDB_DIR; and stderr/stdout carry no third-party INFO or FutureWarning lines."""
    wandb_dir = tmp_path / "wandb-root"
    result = run_cli(QUICK + [f"hydra.run.dir={tmp_path / 'run'}"],
                     env={"WANDB_PROJECT": "x", "WANDB_TAGS": "env-tag,second", "WANDB_DIR": str(wandb_dir)})
    assert result.returncode == 0, result.stderr[-3000:]
    run = read_run(wandb_dir)
    assert (run.project, run.tags) == ("x", ["env-tag", "second"])
    assert run.path.is_relative_to(wandb_dir / "wandb")
    assert not (tmp_path / "run" / "wandb").exists()
    assert "project x" in result.stdout
    noise = [line for line in (result.stdout + result.stderr).splitlines() if NOISE.search(line)]
    assert noise == []


def test_command_line_project_beats_wandb_project(tmp_path, monkeypatch):
    from softprompt.train.run import run

    monkeypatch.setenv("WANDB_PROJECT", "x")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    run(compose(QUICK + ["wandb.project=y"]), run_dir=tmp_path)
    assert read_run(tmp_path).project == "y"


# --- the demo: --host/--port > GRADIO_SERVER_NAME/GRADIO_SERVER_PORT > 127.0.0.1:7860 ---------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_address_resolution(monkeypatch):
    from softprompt.serve.demo import server_address

    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    assert server_address(None, None) == ("127.0.0.1", 7860)
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    assert server_address(None, None) == ("0.0.0.0", 7999)
    assert server_address("127.0.0.1", 8001) == ("127.0.0.1", 8001)
    monkeypatch.setenv("GRADIO_SERVER_PORT", "http")
    with pytest.raises(UserError, match="GRADIO_SERVER_PORT='http' is not a port number"):
        server_address(None, None)


def test_demo_share_link_from_gradio_share(monkeypatch):
    from softprompt.serve.demo import share_link

    monkeypatch.delenv("GRADIO_SHARE", raising=False)
    assert share_link() is False
    for value, share in (("true", True), ("1", True), ("True", True), ("false", False), ("0", False), ("", False)):
        monkeypatch.setenv("GRADIO_SHARE", value)
        assert share_link() is share, value
    monkeypatch.setenv("GRADIO_SHARE", "maybe")
    with pytest.raises(UserError, match="^GRADIO_SHARE='maybe' is not true or false"):
        share_link()


def test_demo_serves_on_gradio_server_port(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    port = _free_port()
    env = child_env({"GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False"})
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts/demo.py"), str(run_dir)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, page = time.monotonic() + 240, None
        while page is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                    page = response.read().decode()
            except OSError:
                time.sleep(1)
        assert page is not None, proc.stdout.read() if proc.poll() is not None else "no answer in 240 s"
        assert "softprompt: base vs tuned" in page
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert f"on http://127.0.0.1:{port}" in out


def test_demo_refuses_a_bad_gradio_server_port(tmp_path):
    result = run_cli([str(tmp_path)], script="scripts/demo.py", env={"GRADIO_SERVER_PORT": "99999"}, timeout=60)
    assert result.returncode == 2
    assert result.stderr == "error: GRADIO_SERVER_PORT='99999' is not a port number; set it to e.g. 7860 or pass --port\n"


# --- command-line settings the composed config does not read -------------------------------------

PEFT_PRESETS = sorted(p.stem for p in (CONF_DIR / "peft").glob("*.yaml"))
# each method-specific key, and the presets that read it
READ_BY = {
    "peft.num_virtual_tokens=8": {"prompt_tuning", "p_tuning", "prefix_tuning"},
    "peft.init=random": {"prompt_tuning"},
    "peft.init_text=Hello": {"prompt_tuning"},
    "peft.encoder_hidden_size=64": {"p_tuning"},
    "peft.lora_r=4": {"lora"},
    "peft.lora_alpha=8": {"lora"},
    "peft.lora_dropout=0.1": {"lora"},
    "peft.lora_target_modules=[q_proj]": {"lora"},
    "training.fast_loss=false": {"prompt_tuning", "p_tuning"},
    "eval.nearest_tokens=3": {"prompt_tuning", "p_tuning"},
}


@pytest.mark.parametrize("preset", PEFT_PRESETS)
def test_every_peft_preset_refuses_the_keys_of_the_others(preset):
    assert PEFT_PRESETS == ["lora", "p_tuning", "prefix_tuning", "prompt_tuning"]
    for override, readers in READ_BY.items():
        overrides = [f"peft={preset}", override]
        cfg = compose(overrides)
        if preset in readers:
            check_overrides(cfg, overrides, multirun=False)
        else:
            key = override.split("=")[0]
            with pytest.raises(UserError, match=rf"^{re.escape(override)} is not used by this run: .*\(peft={preset}\)"):
                check_overrides(cfg, overrides, multirun=False)
            assert [o for o, _ in unused_overrides(cfg, overrides)] == [override], key


def test_init_text_without_text_init_and_schedule_keys():
    overrides = ["peft.init=random", "peft.init_text=Hello"]
    with pytest.raises(UserError, match="^peft.init_text=Hello is not used by this run: it is read only with "
                                        "peft.init=text, not peft.init=random;"):
        check_overrides(compose(overrides), overrides, multirun=False)
    # every schedule warms up over training.warmup_steps; only wsd reads training.decay_fraction
    for scheduler, used in (("constant", True), ("linear", True), ("cosine", True), ("wsd", True)):
        overrides = [f"training.lr_scheduler={scheduler}", "training.warmup_steps=3"]
        assert bool(unused_overrides(compose(overrides), overrides)) is not used, scheduler
    for scheduler, used in (("constant", False), ("linear", False), ("wsd", True)):
        overrides = [f"training.lr_scheduler={scheduler}", "training.decay_fraction=0.3"]
        assert bool(unused_overrides(compose(overrides), overrides)) is not used, scheduler


@pytest.mark.parametrize("model", sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")))
def test_every_model_preset_and_its_source_keys(model):
    source = compose([f"model={model}"]).model.source
    overrides = [f"model={model}", "model.gguf_file=x.gguf"]
    found = {o for o, _ in unused_overrides(compose(overrides), overrides)}
    assert found == (set() if source == "gguf_package" else {"model.gguf_file=x.gguf"})
    overrides = [f"model={model}", "model.tiny.hidden_size=32"]
    if source == "tiny":
        assert unused_overrides(compose(overrides), overrides) == []
    else:  # model.tiny is null outside the tiny presets: the override cannot compose, and the CLI says why
        with pytest.raises(AssertionError):
            compose(overrides)


def test_a_key_under_a_null_section_is_one_error_line():
    result = run_cli(["model=bloomz-560m", "model.tiny.hidden_size=32", "--cfg", "job"], timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: an override sets a key inside a section the chosen presets leave null")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize("dataset", sorted(p.stem for p in (CONF_DIR / "dataset").glob("*.yaml")))
def test_every_dataset_preset_and_hub_keys(dataset, tmp_path):
    overrides = [f"dataset={dataset}", "dataset.hub_id=someone/data"]
    found = unused_overrides(compose(overrides), overrides)
    bundled = dataset.endswith("_sample")
    assert [o for o, _ in found] == (["dataset.hub_id=someone/data"] if bundled else [])
    # a local file replaces the Hub for every preset
    overrides = [f"dataset={dataset}", f"dataset.path={tmp_path}/d.csv", "dataset.hub_split=test"]
    assert unused_overrides(compose(overrides), overrides) == [
        ("dataset.hub_split=test", f"dataset.path={tmp_path}/d.csv is read instead of the Hub")]


def test_cli_refuses_an_unused_setting_before_loading_anything():
    start = time.monotonic()
    result = run_cli(["peft=prompt_tuning", "peft.lora_r=4", "model=tiny-llama", "dataset=prompts_sample"], timeout=120)
    assert result.returncode == 2
    assert result.stderr == ("error: peft.lora_r=4 is not used by this run: peft.method=prompt_tuning does not read "
                             "it (only peft=lora does) "
                             "(peft=prompt_tuning model=tiny-llama dataset=prompts_sample); remove it or choose "
                             "the preset that reads it\n")
    assert time.monotonic() - start < 60


def test_multirun_over_methods_warns_once_per_job(tmp_path):
    """`-m peft=lora,prompt_tuning peft.num_virtual_tokens=8`: the LoRA job ignores the shared key
    and says so in one line instead of failing the sweep. (A missing data file then stops the
    multirun before any model loads: this checks the message, not training.)"""
    result = run_cli(["-m", "peft=lora,prompt_tuning", "peft.num_virtual_tokens=8", "model=tiny-llama",
                      f"dataset.path={tmp_path}/missing.csv", f"hydra.sweep.dir={tmp_path}/multi"], timeout=180)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: peft.num_virtual_tokens=8 is not used by this job: peft.method=lora does not read "
                        "it (only peft=prompt_tuning, peft=prefix_tuning, peft=p_tuning does) "
                        "(peft=lora model=tiny-llama)"]
    assert result.returncode == 2 and "does not exist" in result.stderr


# --- HF_HOME, HF_HUB_OFFLINE, XDG_CACHE_HOME: where the HF libraries look, we look --------------


def test_xdg_cache_home_places_the_softprompt_cache(monkeypatch, tmp_path):
    from softprompt.core.paths import cache_root

    monkeypatch.delenv("SOFTPROMPT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_root() == tmp_path / "softprompt"
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "own"))
    assert cache_root() == tmp_path / "own"


def test_hf_home_and_hf_hub_offline_decide_what_counts_as_cached(tmp_path):
    """With HF_HUB_OFFLINE=1 a Hub model passes the start-up check only if it is in the cache that
    huggingface_hub itself uses: $HF_HOME/hub (a fresh process: the libraries read HF_HOME once)."""
    snapshot = tmp_path / "hf" / "hub" / "models--someone--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    probe = ("import sys; from omegaconf import OmegaConf; from softprompt.core.errors import UserError; "
             "from softprompt.train.preflight import check_model\n"
             "try: check_model(OmegaConf.create(dict(source='pretrained', name_or_path=sys.argv[1], revision=None)))\n"
             "except UserError as e: print(e)\nelse: print('ok')")
    env = child_env({"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    env.pop("HF_HUB_CACHE", None)
    for repo, expected in (("someone/tiny", "ok"), ("someone/other", "the Hugging Face Hub is unreachable and "
                                                                   "model 'someone/other' is not in the local cache")):
        out = subprocess.run([sys.executable, "-c", probe, repo], env=env, capture_output=True, text=True, timeout=60)
        assert out.stdout.startswith(expected), out.stdout + out.stderr
