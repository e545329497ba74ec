"""The Hydra entrypoint: a thin wrapper around `softprompt.run.run`.

Expected failures, Hydra's own composition errors included, end as one `error: ...` line and exit
status 2; anything unexpected keeps its traceback.
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from softprompt.config import CONF_DIR, register_schema
from softprompt.errors import UserError, report_and_exit


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    from softprompt.run import run

    try:
        metrics = run(cfg)
    except UserError as exc:
        report_and_exit(str(exc))
    # returned so that Hydra sweepers that optimise a value (e.g. Optuna) can read it
    return metrics.get("eval/perplexity")


def _is_user_error(exc: BaseException) -> bool:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return isinstance(exc, (UserError, HydraException, OmegaConfBaseException))


def main() -> None:
    register_schema()
    # Hydra prints composition errors itself and exits 1; with HYDRA_FULL_ERROR it re-raises
    # them, so we can report them as user errors (exit 2) and keep tracebacks for real bugs.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _hydra_main()
    except Exception as exc:  # noqa: BLE001 - re-raised below unless the user can fix it
        if _is_user_error(exc):
            report_and_exit(_one_line(exc))
        raise


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    first = text.splitlines()[0]
    cause = exc.__cause__
    if cause is not None and str(cause).strip() and str(cause).strip().splitlines()[0] not in first:
        first = f"{first}: {str(cause).strip().splitlines()[0]}"
    return first


if __name__ == "__main__":
    main()
    sys.exit(0)
