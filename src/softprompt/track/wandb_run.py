"""Weights & Biases: one run per training job, in the run directory, always finished.

`wandb.mode=auto` logs online when there is a login and the service answers, else offline (and
says so in one line); it never fails a run. `online` fails early with an `error:` line when the
service is not usable. Offline runs write the same records and can be uploaded with `wandb sync`.
Every `wandb.*` setting has one precedence (`setting`): the command line > the variable W&B users
export (WANDB_MODE, WANDB_PROJECT, ...) > a preset or the YAML default > W&B's own default.
What a run logs, key by key, is in docs/wandb.md; `python -m softprompt.track.records RUN_DIR` reads
it back (a tool for tests and dashboards: nothing here imports it).
"""

from __future__ import annotations

import copy
import netrc
import os
import socket
import struct
import time
import zlib
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

from omegaconf import DictConfig

from softprompt.core import keys
from softprompt.core.errors import UserError
from softprompt.core.grid import point_id

DEFAULT_BASE_URL = "https://api.wandb.ai"
DEFAULT_PROJECT = "softprompt"


# --- settings: the command line > the user's environment > a preset or default --------------------

# each wandb.* key and the variable W&B users export for it (wandb.init reads the same ones)
ENV_VARS = {"mode": "WANDB_MODE", "project": "WANDB_PROJECT", "entity": "WANDB_ENTITY", "group": "WANDB_RUN_GROUP",
            "tags": "WANDB_TAGS", "name": "WANDB_NAME", "dir": "WANDB_DIR"}
# WANDB_MODE as wandb spells it -> wandb.mode
ENV_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline", "disabled": "disabled"}


def hydra_overrides() -> list[str] | None:
    """The task overrides of the current Hydra job; None outside one (`run()` called directly)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None
    except Exception:  # noqa: BLE001 - settings and naming must never fail a run
        return None


def command_line_keys(overrides: list[str] | None = None) -> set[str] | None:
    """The config keys a command line sets (`wandb.mode=offline` -> `wandb.mode`).

    `overrides`: a job's command line where Hydra did not parse it (scripts/sweep.py, a pack's
    jobs); None: the current Hydra job's. None back when there is no command line at all (`run(cfg)`
    from Python): nothing then tells a preset from a choice, so every value the config holds counts
    as chosen by the caller.
    """
    if overrides is None:
        overrides = hydra_overrides()
        if overrides is None:
            return None
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides}


def choose(key: str, value: Any, overrides: list[str] | None = None) -> tuple[Any, str]:
    """A `wandb.<key>` setting whose config value is `value` (None, or mode `auto`: not set), and
    where it comes from: `command line` (or `config` for a `run(cfg)` caller), the environment
    variable's name, `preset` (a YAML value: `experiment=offline`, conf/wandb/default.yaml), or
    `default` (value None: W&B's own, or ours where the caller has one)."""
    if key == "mode" and value == "auto":
        value = None  # auto is no choice: WANDB_MODE still applies
    given = command_line_keys(overrides)
    if value is not None and (given is None or f"wandb.{key}" in given):
        return value, "command line" if given is not None else "config"
    var = ENV_VARS[key]
    raw = os.environ.get(var, "").strip()
    if raw:
        return _from_env(key, var, raw), var
    return (value, "preset") if value is not None else (None, "default")


def setting(cfg: DictConfig, key: str, overrides: list[str] | None = None) -> tuple[Any, str]:
    """`choose` for the config's own value of `wandb.<key>`."""
    return choose(key, cfg.wandb.get(key), overrides)


def _from_env(key: str, var: str, raw: str) -> Any:
    if key == "tags":
        return [t.strip() for t in raw.split(",") if t.strip()]
    if key == "mode":
        if raw.lower() not in ENV_MODES:
            raise UserError(f"{var}={raw!r} is not a W&B mode; set it to online, offline or disabled, or unset it")
        return ENV_MODES[raw.lower()]
    return raw


# --- mode ----------------------------------------------------------------------------------------


def _base_url() -> str:
    return os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL


def has_login() -> bool:
    """An API key in the environment, an identity-token file, or a `wandb login` netrc entry."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:  # wandb's own reader knows where `wandb login` writes (NETRC, ~/.netrc, ~/_netrc)
        from wandb.sdk.lib.wbauth import read_netrc_auth

        return read_netrc_auth(host=_base_url()) is not None
    except ImportError:
        pass
    except Exception:  # a malformed key in the netrc: not a usable login
        return False
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(urlparse(_base_url()).netloc) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def service_reachable(timeout: float = 3.0) -> bool:
    """A TCP connect to the W&B host: seconds at most, instead of wandb's own minute of retries."""
    url = urlparse(_base_url())
    if not url.hostname:
        return False
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def chosen_mode(requested: str, overrides: list[str] | None = None) -> str:
    """`auto`, `online`, `offline` or `disabled`: wandb.mode `requested` after the precedence."""
    return choose("mode", requested, overrides)[0] or "auto"


def resolve_mode(requested: str, overrides: list[str] | None = None) -> str:
    """The mode wandb.init gets, for the config's wandb.mode `requested`; an `online` (asked for on
    the command line, by WANDB_MODE or by a preset) without a usable service is a UserError."""
    mode, source = choose("mode", requested, overrides)
    said = f"{source}={os.environ.get(source, '').strip()}" if source == ENV_VARS["mode"] else f"wandb.mode={mode}"
    if mode in ("offline", "disabled"):
        if mode == "offline" and source == ENV_VARS["mode"]:
            print(f"wandb: logging offline ({said}); upload later with "
                  "`wandb sync <run dir>/wandb/offline-run-*`", flush=True)
        return mode
    login = has_login()
    if mode == "online":
        if not login:
            raise UserError(f"{said} but no W&B login found; run `wandb login` or set WANDB_API_KEY, "
                            "or use wandb.mode=offline and `wandb sync` later")
        if not service_reachable():
            raise UserError(f"{said} but the W&B service at {_base_url()} is unreachable; "
                            "check the network or WANDB_BASE_URL, or use wandb.mode=offline and `wandb sync` later")
        return "online"
    reachable = login and service_reachable()  # no probe without a login: offline either way
    if login and reachable:
        return "online"
    why = "no W&B login" if not login else f"{_base_url()} is unreachable"
    print(f"wandb: logging offline ({why}); upload later with `wandb sync <run dir>/wandb/offline-run-*`",
          flush=True)
    return "offline"


# --- placement -----------------------------------------------------------------------------------


def placement(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Where the run goes, each key by `setting`'s precedence, else our default (project
    `softprompt`, the run directory) or W&B's (the login's entity, no group, no tags).

    wandb.init would read the variables itself, but resolving them here lets the run print and
    record the project it really went to, and keeps a preset from hiding what the user exported.
    """
    value = {key: setting(cfg, key, overrides)[0] for key in ("project", "entity", "group", "tags", "dir")}
    return {
        "project": value["project"] or DEFAULT_PROJECT,
        "entity": value["entity"] or None,
        "group": value["group"] or None,
        "tags": list(value["tags"] or []),
        # W&B writes `<dir>/wandb/`; by default that is inside the run directory, beside metrics.json
        "dir": str(Path(value["dir"] or run_dir).expanduser()),
    }


# --- naming --------------------------------------------------------------------------------------

# overridden keys that go into the run name, with their short labels (a sweep's usual axes)
NAME_PARTS = {
    "training.learning_rate": "lr",
    "peft.init": "init-",
    "training.batch_size": "bs",
    "training.max_steps": "steps",
    "training.max_length": "len",
    "dataset.max_samples": "n",
    "seed": "seed",
}


def run_name(cfg: DictConfig, method_tag: str, overrides: list[str] | None = None) -> str:
    """A name a person can read on a dashboard: `vt8-ep6`, `p_tuning-vt8-ep6-lr0.01`, `lora-r8-ep6`, ...

    `method_tag` is the PEFT method's run-name tag from its registry entry
    (`softprompt.models.methods.Method.tag`: tracking sits beside models and cannot import it),
    then epochs always (the seed's sweep axes); other sweep axes only when the overrides set
    them, so the default run stays short.
    """
    name, _ = setting(cfg, "name", overrides)  # wandb.name on the command line > WANDB_NAME > a preset's
    if name:
        return str(name)
    parts = [method_tag, f"ep{cfg.training.epochs}"]
    given = command_line_keys(overrides) or set()
    for key, label in NAME_PARTS.items():
        if key in given:
            value = _get_path(cfg, key)
            parts.append(f"{label}{value:g}" if isinstance(value, float) else f"{label}{value}")
    return "-".join(parts)


# --- sweeps --------------------------------------------------------------------------------------


def sweep_params() -> dict[str, Any]:
    """The parameters a `wandb agent` hands this run, as flat dotted keys (`{}` outside a sweep).

    The agent writes them to WANDB_SWEEP_PARAM_PATH and `wandb.init` puts them into the run's
    config under those flat keys (locked, so the run cannot change them). With
    `${args_no_hyphens}` the same values also arrive as Hydra overrides.
    """
    path = os.environ.get("WANDB_SWEEP_PARAM_PATH")
    if not path or not Path(path).is_file():
        return {}
    from wandb.sdk.lib.config_util import dict_from_config_file

    return dict_from_config_file(path) or {}


def config_for_wandb(cfg: DictConfig, config: dict[str, Any], sweep: dict[str, Any]) -> dict[str, Any]:
    """The run's config with each sweep parameter held once, under the sweep's own spelling.

    W&B's sweep controller finds a run's parameter values under the flat key it proposed
    (`run.config["peft.num_virtual_tokens"]`: grid search skips points already run, bayes fits
    on them), so the flat key must stay. The same leaf is dropped from the nested tree; W&B's
    run table shows nested config as dotted columns, so the column is the same
    `peft.num_virtual_tokens` whether a run came from an agent or from a Hydra multirun.
    A sweep value that the run did not get (a sweep command without `${args_no_hyphens}`) would
    make the dashboard lie about what ran: that is a UserError, raised before any run starts.
    """
    out = copy.deepcopy(config)
    for dotted, value in sweep.items():
        if "." not in dotted:
            continue  # a top-level key (e.g. `seed`) has one spelling already
        try:
            actual = _get_path(cfg, dotted)
        except KeyError:
            raise UserError(f"the W&B sweep sets {dotted}, which is not a config key; "
                            "fix the parameter names in the sweep file") from None
        if actual != value:
            raise UserError(f"the W&B sweep sets {dotted}={value!r} but this run has {dotted}={actual!r}; "
                            "the sweep's command must pass its values as overrides: end it with ${args_no_hyphens}")
        *parents, leaf = dotted.split(".")
        node = out
        for part in parents:
            node = node[part]
        node.pop(leaf, None)
    return out


def _get_path(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        if part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


# --- the run -------------------------------------------------------------------------------------


class Tracker:
    """A thin wrapper so the training code never touches `wandb` directly (and can run without it)."""

    def __init__(self, run, log_model: bool = True):
        self.run = run
        self.log_model = log_model

    @classmethod
    def start(cls, cfg: DictConfig, run_dir: Path, config: dict[str, Any], name: str, mode: str,
              run_id: str | None = None, stop_fn: Callable[[], None] | None = None) -> "Tracker":
        """`run_id`: continue that W&B run (a resumed training run), else start a new one.
        `stop_fn`: called (from W&B's thread) when W&B asks this run to stop; without it, or with a
        wandb older than 0.31 (no `Settings.stop_fn`), W&B interrupts the whole process."""
        if mode == "disabled":
            return cls(None)  # no wandb import, no wandb/ directory
        import wandb

        wandb_config = config_for_wandb(cfg, config, sweep_params())
        os.environ.setdefault("WANDB_SILENT", "true")
        where = placement(cfg, run_dir)
        Path(where["dir"]).mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=where["project"],
            entity=where["entity"],
            group=where["group"],
            # the runs of one grid point (equal but for the seed) share it: W&B groups their seeds
            job_type=f"point-{point_id(config)}",
            tags=where["tags"],
            name=name,
            dir=where["dir"],
            config=wandb_config,
            mode=mode,
            id=run_id,
            resume="allow" if run_id else None,
            # a Hydra multirun calls us once per job in one process: never reuse the last run
            reinit="create_new",
            **_stop_settings(stop_fn),
        )
        try:
            _define_metrics(run)
        except BaseException:
            run.finish(exit_code=1)  # never leave a started run open
            raise
        print(f"wandb: run {run.id} ({name}, {mode}, project {run.project}) in {Path(run.dir).parent}", flush=True)
        return cls(run, log_model=bool(cfg.wandb.log_model))

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    @property
    def active(self) -> bool:
        return self.run is not None

    def log(self, values: dict[str, Any], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(values, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows)})

    def log_adapter(self, adapter_dir: Path, name: str, metadata: dict[str, Any]) -> None:
        """The saved adapter as a `model` artifact (skipped with wandb.log_model=false)."""
        if self.run is not None and self.log_model:
            import wandb

            artifact = wandb.Artifact(name=name, type="model", metadata=metadata)
            artifact.add_dir(str(adapter_dir))
            self.run.log_artifact(artifact)

    def set_summary(self, values: dict[str, Any]) -> None:
        """The final values, key for key as in metrics.json (they override any history-derived value)."""
        if self.run is not None:
            self.run.summary.update(values)

    def mark_preempting(self) -> None:
        """Tell W&B the run is being preempted: with a non-zero exit code it shows as preempted
        (and a W&B sweep requeues it) instead of failed."""
        if self.run is not None:
            self.run.mark_preempting()

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            sync_file = self.run.settings.sync_file
            self.run.finish(exit_code=exit_code)
            self.run = None
            # finish() can return before the run file's last block is on disk; a reader or
            # `wandb sync` right after the job must see the whole run
            if sync_file and not wait_for_exit_record(sync_file, timeout=10.0):
                print(f"wandb: warning: {sync_file} has no exit record yet", flush=True)


def _stop_settings(stop_fn: Callable[[], None] | None) -> dict[str, Any]:
    """`wandb.init(settings=...)` with the run's own stop callback, where wandb has the setting:
    several runs open in one process (a pack) each stop their own job, not the process."""
    import wandb

    if stop_fn is None or "stop_fn" not in getattr(wandb.Settings, "model_fields", {}):
        return {}
    return {"settings": wandb.Settings(stop_fn=stop_fn)}


def _define_metrics(run) -> None:
    """X axes for the curves: optimizer steps for train/*, epochs for eval/*.

    The summary of a curve is its last value: the final tuned evaluation, which is what
    metrics.json holds (a `min` summary would disagree with it whenever a later epoch is worse).
    """
    run.define_metric(keys.TRAIN_STEP)
    run.define_metric("train/*", step_metric=keys.TRAIN_STEP)
    run.define_metric(keys.EPOCH)
    run.define_metric("eval/*", step_metric=keys.EPOCH)
    run.define_metric(keys.EVAL_PERPLEXITY, step_metric=keys.EPOCH, summary="last")
    run.define_metric(keys.EVAL_LOSS, step_metric=keys.EPOCH, summary="last")


# --- the end of the run file ---------------------------------------------------------------------
# A `.wandb` file is a LevelDB-style log (docs/wandb.md): a 7-byte file header, then 32 KiB blocks of
# records `crc32 (4) | length (2) | type (1) | data`, a record too long for the rest of a block split
# into FIRST/MIDDLE/LAST fragments, a block's last < 7 bytes zero padding. wandb-core writes the exit
# record last. It is small, so it lies whole in the last two blocks: reading those is enough to tell
# whether the run file is complete (softprompt.track.records reads whole files; runs do not need it).
_BLOCK_LEN = 32768
_FILE_HEADER_LEN = 7
_RECORD_HEADER = struct.Struct("<IHB")
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def ends_with_exit_record(path: str | Path) -> bool:
    """Whether the last record of a `.wandb` file is the run's exit record (False if unreadable)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            # from the start of the second-to-last block: the exit record's first fragment can lie
            # at the end of the block before the last one
            start = max(0, (size - 1) // _BLOCK_LEN - 1) * _BLOCK_LEN
            f.seek(start)
            tail = f.read()
    except OSError:
        return False
    pos = _FILE_HEADER_LEN if start == 0 else 0
    last: bytes | None = None
    pending: bytearray | None = None  # fragments so far of a record whose FIRST is in the tail
    while True:
        left = _BLOCK_LEN - (start + pos) % _BLOCK_LEN
        if left < _RECORD_HEADER.size:  # block trailer
            pos += left
            continue
        if pos + _RECORD_HEADER.size > len(tail):
            break
        checksum, length, kind = _RECORD_HEADER.unpack_from(tail, pos)
        if (checksum, length, kind) == (0, 0, 0):
            break  # zero-filled: nothing written beyond here
        end = pos + _RECORD_HEADER.size + length
        if end > len(tail):
            return False  # a record still being written
        payload = tail[pos + _RECORD_HEADER.size:end]
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) != checksum:
            return False  # caught mid-write (or corrupt): not finished as far as we can tell
        pos = end
        if kind == _FULL:
            last, pending = payload, None
        elif kind == _FIRST:
            pending = bytearray(payload)
        elif pending is not None:  # MIDDLE or LAST of a record that began in the tail
            pending += payload
            if kind == _LAST:
                last, pending = bytes(pending), None
        else:  # the rest of a long record that began before the tail: never the exit record
            last = None
    if last is None or pending is not None:
        return False
    from wandb.proto import wandb_internal_pb2

    return wandb_internal_pb2.Record.FromString(last).WhichOneof("record_type") == "exit"


def wait_for_exit_record(path: str | Path, timeout: float = 10.0) -> bool:
    """Wait until the run file ends with its exit record; True if it does within `timeout` s.

    wandb 0.31's `run.finish()` can return before wandb-core has flushed the last block of the
    file (seen in about 1 of 5 offline runs: the file stopped at a 32 KiB boundary for a few ms).
    """
    deadline = time.monotonic() + timeout
    while not ends_with_exit_record(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
