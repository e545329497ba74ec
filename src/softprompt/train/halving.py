"""Hyperband early termination offline: the decisions W&B's sweep controller makes, made by the
`sweeps` package (the controller's own code, `sweeps.stop_runs`) at every epoch boundary.

The iteration is the epoch: a job's history is the sweep metric of the base model (iteration 0,
the same value for every job of a data split) followed by its held-out value after each epoch, so
iteration `i` is epoch `i` and a band of `min_iter: 2` judges the jobs after their second epoch.

Jobs share what the decisions need through a folder beside their run dirs (`hyperband/` in the
sweep dir): one JSON file per job with its state and history, written atomically when a pack ends
an epoch, and read back whole before each decision, so that packs running as separate processes
see each other's progress. A decision to stop a job is written into its file; a pack resumed
after SIGKILL finds it there and stops the job at the same epoch again, whatever the others did
since, and a job written as stopped before the kill is not trained again (softprompt.train.pack).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from softprompt.core import atomic, keys
from softprompt.core.errors import UserError, import_extra

FOLDER = "hyperband"
# the metrics a run logs at every epoch's end (softprompt.train.pack._epoch_eval), and where the
# base model's value (iteration 0) comes from
PER_EPOCH = {keys.EVAL_PERPLEXITY: "perplexity", keys.EVAL_LOSS: "loss"}


def _sweeps():
    with warnings.catch_warnings():  # the package's pydantic-v1-style models (see experiments.sweep)
        warnings.filterwarnings("ignore", message=r"Support for class-based `config` is deprecated")
        warnings.filterwarnings("ignore", message=r"Valid config keys have changed in V2")
        return import_extra("sweeps", "sweeps", "hyperband early termination needs it")


def schema_violations(config: dict[str, Any]) -> list[str]:
    """What the `sweeps` package's schema says against a sweep config (an unknown `type`, a
    hyperband block without its iterations)."""
    return list(_sweeps().schema_violations_from_proposed_config(config))


def bands(early_terminate: dict[str, Any], budget: int) -> list[int]:
    """The iterations (epochs) at which the `sweeps` release judges jobs, up to `budget` epochs
    (its own arithmetic: min_iter * eta^k, or max_iter / eta^k for k < s)."""
    eta = early_terminate.get("eta", 3)
    if "min_iter" in early_terminate:
        out, band = [], early_terminate["min_iter"]
        while band < budget:
            out.append(int(band))
            band *= eta
        return out
    band, out = early_terminate["max_iter"], []
    for _ in range(early_terminate.get("s", 0)):
        band /= eta
        if band < 1:
            break
        out.append(int(band))
    return sorted(b for b in out if b < budget)


def check(config: dict[str, Any], epochs: int, per_epoch: bool, max_steps: int | None, where: str) -> None:
    """The sweep's `early_terminate` against the runs it will judge: UserErrors before any job."""
    et = config["early_terminate"]
    metric = (config.get("metric") or {}).get("name")
    if metric is None:
        raise UserError(f"{where}: early_terminate needs a `metric` (e.g. name: eval/perplexity, goal: minimize)")
    if metric not in PER_EPOCH:
        raise UserError(f"{where}: early_terminate judges a metric logged at every epoch ({', '.join(PER_EPOCH)}); "
                        f"{metric} is not")
    if not per_epoch:
        raise UserError(f"{where}: early_terminate judges {metric} at every epoch, but eval.per_epoch=false "
                        "logs it only at the end; set eval.per_epoch=true")
    if max_steps:
        raise UserError(f"{where}: early_terminate counts epochs, but training.max_steps={max_steps} ends runs "
                        "by steps; drop training.max_steps")
    if "min_iter" in et and et["min_iter"] >= epochs:
        raise UserError(f"{where}: early_terminate min_iter {et['min_iter']} is not below the epoch budget "
                        f"({epochs} epochs): no job could be stopped before its end; lower min_iter or raise training.epochs")
    if "max_iter" in et and et["max_iter"] > epochs:
        raise UserError(f"{where}: early_terminate max_iter {et['max_iter']} exceeds the epoch budget "
                        f"({epochs} epochs); an iteration is an epoch")
    if not bands(et, epochs):
        raise UserError(f"{where}: early_terminate has no band below the epoch budget ({epochs} epochs)")


def decide(config: dict[str, Any], records: dict[str, dict[str, Any]]) -> list[str]:
    """The running jobs that `sweeps.stop_runs` stops, given every job's record
    ({"state": running|finished|stopped, "history": [iteration 0, epoch 1, ...]})."""
    sweeps = _sweeps()
    metric = config["metric"]["name"]
    runs = [sweeps.SweepRun(name=name, state=sweeps.RunState.running if r["state"] == "running" else sweeps.RunState.finished,
                            # `history=` is not the field's alias and would be dropped silently
                            sampledHistory=[{metric: v} for v in r["history"]])
            for name, r in sorted(records.items())]
    return sorted(run.name for run in sweeps.stop_runs(config, runs))


@dataclass
class Halving:
    """The decisions of one sweep, shared through `folder` (one file per job, by run dir name)."""

    config: dict[str, Any]  # the sweep's config: metric and early_terminate
    folder: Path

    @property
    def metric(self) -> str:
        return self.config["metric"]["name"]

    def _path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def records(self) -> dict[str, dict[str, Any]]:
        out = {}
        for path in sorted(self.folder.glob("*.json")) if self.folder.is_dir() else []:
            try:
                out[path.stem] = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):  # atomic writes: only a foreign file can be unreadable
                continue
        return out

    def stopped_at(self, name: str) -> int | None:
        record = self.records().get(name)
        return record.get("stopped_at") if record else None

    def record(self, name: str, state: str, history: list[float], stopped_at: int | None = None) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic.write_json(self._path(name), {"state": state, "history": history, "stopped_at": stopped_at})

    def failed(self, name: str) -> None:
        """A job whose loss became NaN/inf: no longer running (it is never stopped), its values
        so far still count, as the controller counts a failed run's history."""
        record = self.records().get(name, {"history": [], "stopped_at": None})
        self.record(name, "failed", record["history"], record.get("stopped_at"))

    def epoch_end(self, epoch: int, jobs: dict[str, tuple[str, list[float]]]) -> list[str]:
        """This pack's jobs at the end of `epoch` ({name: (running|finished, history)}): records them,
        and returns the running ones to stop now: those stopped here before (a resume), else those
        that `sweeps.stop_runs` names given every job of the sweep."""
        known = self.records()
        again = [n for n, (state, _) in jobs.items() if state == "running" and known.get(n, {}).get("stopped_at") == epoch]
        for name, (state, history) in jobs.items():
            self.record(name, state, history)
        if again:
            for name in again:
                self.record(name, "stopped", jobs[name][1], stopped_at=epoch)
            return sorted(again)
        stop = [n for n in decide(self.config, self.records()) if n in jobs and jobs[n][0] == "running"]
        for name in stop:
            self.record(name, "stopped", jobs[name][1], stopped_at=epoch)
        return stop
