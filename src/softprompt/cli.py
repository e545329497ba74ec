"""The Hydra entrypoint: a thin wrapper around `softprompt.train.run.run`.

Expected failures, Hydra's own composition errors included, end as one `error: ...` line and exit
status 2; anything unexpected keeps its traceback.
"""

from __future__ import annotations

import gc
import os
import sys

import hydra
from omegaconf import DictConfig

from softprompt.core.config import CONF_DIR, register_schema
from softprompt.core.errors import UserError, report_and_exit


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        # the cheap checks first: a bad value fails in about a second, before torch is imported
        from softprompt.train import preflight

        preflight.check(cfg)
        from softprompt.train.preemption import Preempted
        from softprompt.train.run import run

        _freeze_imported()

        try:
            metrics = run(cfg)
        except Preempted as exc:
            _preempted_exit(exc)
    except UserError as exc:
        report_and_exit(str(exc))
    except Exception as exc:
        # an OmegaConf/Hydra exception raised inside the job is a bug in our code (traceback);
        # one raised outside it is Hydra composing the user's command line (an `error:` line)
        exc.softprompt_in_job = True  # type: ignore[attr-defined]
        raise
    # returned so that Hydra sweepers that optimise a value (e.g. Optuna) can read it
    return metrics.get("eval/perplexity")


def _preempted_exit(exc) -> None:
    """Not an error: the run (or pack) stopped with a checkpoint; 128 + signal is what a scheduler
    sees for a process the signal ended (and W&B counts as preempted, not failed). The same line
    and status for a single run and for a pack under hydra/launcher=packed."""
    where = f"; checkpoint {exc.checkpoint}" if exc.checkpoint else ""
    print(f"{exc}{where}; rerun the same command to continue", file=sys.stderr, flush=True)
    raise SystemExit(exc.exit_status) from None


def _freeze_imported() -> None:
    """torch, transformers and peft are imported by now: about a million objects that live as long
    as the process. `main` keeps the garbage collector off while they import (each full collection
    walks everything imported so far: 6 of them, 0.6 s of CPU on the 2-core dev VM under load);
    one collection here, then they are frozen, so later full collections leave them out. Only
    live objects are frozen: a multirun's earlier job leaves nothing behind."""
    gc.collect()
    gc.freeze()
    gc.enable()


def _is_user_error(exc: BaseException) -> bool:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, UserError):
        return True
    in_job = getattr(exc, "softprompt_in_job", False)
    return not in_job and (isinstance(exc, (HydraException, OmegaConfBaseException)) or _null_section(exc))


def _null_section(exc: BaseException) -> bool:
    """OmegaConf asserts (no message a user could act on) when an override sets a key inside a
    section the composed presets leave null, e.g. `model.tiny.hidden_size=32` with bloomz-560m."""
    return isinstance(exc, AssertionError) and "for root: NoneType" in str(exc)


def _check_arguments() -> None:
    """Hydra's own argument parser, but a usage error is one `error:` line like every other."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()

    def error(message: str) -> None:
        report_and_exit(f"{message}; flags such as -m go before the overrides "
                        "(python train.py [-m] key=value ...), see python train.py --help")

    parser.error = error  # type: ignore[method-assign]
    parser.parse_args()


def main() -> None:
    gc.disable()  # until the libraries are imported (_freeze_imported); on again whatever happens
    try:
        _main()
    except BaseException:
        gc.unfreeze()  # a caller in the same process (tests) goes on: its objects collectable again
        raise
    finally:
        gc.enable()
    # The runs are done: every file written and closed, every W&B run finished. What is left is the
    # interpreter's exit, whose garbage collections walk every object that torch, transformers and
    # peft made (~2 s after `make run`, measured on the 2-core dev VM; 0.2 s with them frozen).
    # Frozen objects are not walked; the process's memory goes back to the OS all the same.
    gc.freeze()


def _main() -> None:
    register_schema()
    # Hydra prints composition errors itself and exits 1; with HYDRA_FULL_ERROR it re-raises
    # them, so we can report them as user errors (exit 2) and keep tracebacks for real bugs.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    _check_arguments()
    from softprompt.train.preemption import Preempted

    try:
        _hydra_main()
    except Preempted as exc:  # a pack of a multirun launcher (hydra/launcher=packed) was preempted
        _preempted_exit(exc)
    except Exception as exc:  # noqa: BLE001 - re-raised below unless the user can fix it
        if _null_section(exc):
            report_and_exit("an override sets a key inside a section the chosen presets leave null (e.g. model.tiny.* "
                            "outside model=tiny-llama|tiny-bloom); remove it or choose the preset that has that section")
        if _is_user_error(exc):
            hint = _slurm_hint(exc)
            report_and_exit(_one_line(exc).rstrip(".") + hint if hint else _one_line(exc))
        raise


def _slurm_hint(exc: BaseException) -> str:
    """hydra/launcher=slurm composes Hydra's submitit launcher, which is the `slurm` extra."""
    import importlib.util

    if "submitit" not in f"{exc} {exc.__cause__}" or importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher"):
        return ""
    return "; the submitit launcher is not installed: run pip install 'softprompt[slurm]'"


def _one_line(exc: BaseException) -> str:
    """Hydra/OmegaConf messages span lines ("In 'training/default': ... composing config:" then
    the reason, then `full_key:` details); keep the lines that say what is wrong."""
    parts: list[str] = []
    for source in (exc, exc.__cause__):
        if source is None:
            continue
        for line in str(source).strip().splitlines():
            line = line.strip()
            if line.startswith("Config search path"):
                break  # what follows is Hydra's search path, not the problem
            if not line or line.startswith(("full_key:", "object_type", "reference_type")):
                continue
            if line not in parts:
                parts.append(line)
    return " ".join(parts) or type(exc).__name__


if __name__ == "__main__":
    main()
    sys.exit(0)
