"""Weights & Biases: one run per training job, in the run directory, always finished.

`wandb.mode=auto` logs online when there is a login and the service answers, else offline (and
says so in one line); it never fails a run. `online` fails early with an `error:` line when the
service is not usable. Offline runs write the same records and can be uploaded with `wandb sync`.
"""

from __future__ import annotations

import netrc
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from omegaconf import DictConfig

from softprompt.errors import UserError


def _base_url() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")


def has_login() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(_base_url()).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def service_reachable(timeout: float = 3.0) -> bool:
    url = urlparse(_base_url())
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def resolve_mode(requested: str) -> str:
    """The mode wandb.init gets; `online` without a usable service is a UserError."""
    env_mode = os.environ.get("WANDB_MODE")
    if requested == "auto" and env_mode in ("offline", "disabled", "dryrun"):
        return "offline" if env_mode == "dryrun" else env_mode
    if requested in ("offline", "disabled"):
        return requested
    login, reachable = has_login(), service_reachable()
    if requested == "online":
        if not login:
            raise UserError("wandb.mode=online but no W&B login found; run `wandb login` or set WANDB_API_KEY, "
                            "or use wandb.mode=offline")
        if not reachable:
            raise UserError(f"wandb.mode=online but the W&B service at {_base_url()} is unreachable; "
                            "use wandb.mode=offline and `wandb sync` later")
        return "online"
    if login and reachable:
        return "online"
    why = "no W&B login" if not login else f"{_base_url()} is unreachable"
    print(f"wandb: logging offline ({why}); upload later with `wandb sync <run dir>/wandb/offline-run-*`",
          flush=True)
    return "offline"


class Tracker:
    """A thin wrapper so the training code never touches `wandb` directly (and can run without it)."""

    def __init__(self, run):
        self.run = run

    @classmethod
    def start(cls, cfg: DictConfig, run_dir: Path, config: dict[str, Any], name: str, mode: str,
              run_id: str | None = None) -> "Tracker":
        """`run_id`: continue that W&B run (a resumed training run), else start a new one."""
        import wandb

        if mode == "disabled":
            return cls(None)
        os.environ.setdefault("WANDB_SILENT", "true")
        run = wandb.init(
            project=cfg.wandb.project,
            entity=cfg.wandb.entity,
            group=cfg.wandb.group,
            tags=list(cfg.wandb.tags or []),
            name=name,
            dir=str(run_dir),
            config=config,
            mode=mode,
            id=run_id,
            resume="allow" if run_id else None,
            # a Hydra multirun calls us once per job in one process: never reuse the last run
            reinit="create_new",
        )
        return cls(run)

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
        if self.run is not None:
            import wandb

            artifact = wandb.Artifact(name=name, type="model", metadata=metadata)
            artifact.add_dir(str(adapter_dir))
            self.run.log_artifact(artifact)

    def set_summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            for key, value in values.items():
                self.run.summary[key] = value

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None
