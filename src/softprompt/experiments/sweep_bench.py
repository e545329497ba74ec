"""`scripts/bench.py --sweep SWEEP.yaml`: the same sweep trained alone-per-job and shared, timed in
one invocation, with the largest difference between the two modes' results. With `--halving`: the
sweep file's early termination (hyperband) against its full grid, both shared: wall time, training
lane-steps (a step of each lane; a trunk's step counts once) and whether the best point is the same.

Each mode runs in a fresh child process (as `scripts/sweep.py` would: imports and first calls paid
in both). Both read the same softprompt cache, so whichever ran first would pay the base model's
evaluation and the tokenisation of each data split and the other would find them cached; an
untimed warm-up child fills the cache first (`warmup_s`), so that the two modes start equal and
the ratio compares what they do differently: training and each job's evaluation. The wall time of
a mode is the child's, from start to exit.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import softprompt
from softprompt.core import keys
from softprompt.core.errors import UserError
from softprompt.core.quiet import quiet_third_party
from softprompt.core.rundir import RunDir

MODES = (("shared", True), ("alone", False))
# --halving: the sweep file's early_terminate against the same grid trained to its end, both shared
HALVING_MODES = (("full", True), ("hyperband", True))
WARM = "warm"


def bench_sweep(sweep_file: str, overrides: list[str], root: str | Path | None = None, count: int | None = None,
                log=print, halving: bool = False) -> dict[str, Any]:
    from softprompt.experiments.sweep import check_halving, load_sweep

    sweep = load_sweep(sweep_file)  # a bad file fails here, before any child starts
    if halving:
        if not sweep.early_terminate:
            raise UserError(f"--halving compares a sweep's early_terminate with its full grid, and {sweep_file} "
                            "has no early_terminate block (e.g. sweeps/lr_x_tokens_hyperband.yaml)")
        check_halving(sweep, overrides)
    pairs = HALVING_MODES if halving else MODES
    root = Path(root or tempfile.mkdtemp(prefix="softprompt-sweep-bench-"))
    src = str(Path(softprompt.__file__).resolve().parents[1])
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    modes: dict[str, dict[str, Any]] = {}
    warmup_s = 0.0
    for mode in (WARM, *(m for m, _ in pairs)):
        command = [sys.executable, "-m", "softprompt.experiments.sweep_bench", "--mode", mode, "--sweep",
                   str(sweep_file), "--root", str(root / mode), *(["--count", str(count)] if count else []),
                   *overrides]
        t0 = time.perf_counter()
        done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)
        seconds = time.perf_counter() - t0
        if done.returncode != 0:
            what = "the warm-up" if mode == WARM else f"the {mode} sweep"
            raise UserError(f"{what} failed (exit {done.returncode}); its output is above")
        if mode == WARM:
            warmup_s = seconds
            log(f"[bench] warm-up (base evaluations and tokenisation into the cache): {seconds:.1f} s")
            continue
        sweep_dir = Path(done.stdout.strip().splitlines()[-1])
        state = json.loads((sweep_dir / "sweep.json").read_text())
        jobs = {}
        for job in state["jobs"]:
            run = RunDir(sweep_dir / job["dir"])
            metrics = run.read_metrics() if run.finished else {}
            jobs[json.dumps(job["values"], sort_keys=True)] = job | {"metrics": metrics}
        modes[mode] = {"wall_s": seconds, "dir": str(sweep_dir), "jobs": jobs, "lane_steps": state.get("lane_steps")}
        log(f"[bench] {mode}: {len(jobs)} jobs in {seconds:.1f} s, {state.get('lane_steps')} lane-steps ({sweep_dir})")
    if halving:
        return _halving_result(sweep.name, overrides, modes, warmup_s)

    diffs, per_job = [], []
    for point, alone in modes["alone"]["jobs"].items():
        shared = modes["shared"]["jobs"].get(point, {})
        a = alone["metrics"].get(keys.EVAL_PERPLEXITY)
        s = shared.get("metrics", {}).get(keys.EVAL_PERPLEXITY)
        rel = abs(s - a) / abs(a) if a is not None and s is not None else None
        if rel is not None:
            diffs.append(rel)
        per_job.append({"values": alone["values"], "alone": a, "shared": s, "rel_diff": rel,
                        "alone_state": alone["state"], "shared_state": shared.get("state")})
    alone_s, shared_s = modes["alone"]["wall_s"], modes["shared"]["wall_s"]
    return {
        "sweep": sweep.name, "jobs": len(per_job), "overrides": list(overrides),
        "warmup_s": round(warmup_s, 2), "alone_wall_s": round(alone_s, 2), "shared_wall_s": round(shared_s, 2),
        "ratio": alone_s / shared_s if shared_s else math.nan,
        "max_rel_diff_eval_perplexity": max(diffs) if diffs else None,
        "compared": len(diffs), "per_job": per_job,
        "dirs": {"alone": modes["alone"]["dir"], "shared": modes["shared"]["dir"]},
        "load_average_after": list(os.getloadavg()),
    }


def best_point(jobs: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The values of the job with the lowest held-out perplexity among those that trained to their
    end (a job that hyperband stopped is not compared with them)."""
    scored = [(j["metrics"][keys.EVAL_PERPLEXITY], point) for point, j in jobs.items()
              if j["state"] == "finished" and keys.SWEEP_TERMINATED_AT_EPOCH not in j["metrics"]
              and isinstance(j["metrics"].get(keys.EVAL_PERPLEXITY), (int, float))
              and math.isfinite(j["metrics"][keys.EVAL_PERPLEXITY])]
    return json.loads(min(scored)[1]) if scored else None


def _halving_result(name: str, overrides: list[str], modes: dict[str, dict[str, Any]], warmup_s: float) -> dict[str, Any]:
    full, cut = modes["full"], modes["hyperband"]
    best_full, best_cut = best_point(full["jobs"]), best_point(cut["jobs"])
    return {
        "sweep": name, "jobs": len(full["jobs"]), "overrides": list(overrides), "warmup_s": round(warmup_s, 2),
        "full_wall_s": round(full["wall_s"], 2), "hyperband_wall_s": round(cut["wall_s"], 2),
        "full_lane_steps": full["lane_steps"], "hyperband_lane_steps": cut["lane_steps"],
        "lane_steps_ratio": cut["lane_steps"] / full["lane_steps"] if full["lane_steps"] else math.nan,
        "wall_ratio": cut["wall_s"] / full["wall_s"] if full["wall_s"] else math.nan,
        "stopped": sorted(j["index"] for j in cut["jobs"].values() if j.get("terminated_at_epoch") is not None),
        "best_full": best_full, "best_hyperband": best_cut, "same_best": best_full == best_cut,
        "dirs": {"full": full["dir"], "hyperband": cut["dir"]},
        "load_average_after": list(os.getloadavg()),
    }


def _warm(sweep_file: str, count: int | None, overrides: list[str]) -> None:
    """The warm-up child: what each pack of the shared mode computes before training, for each of
    its data splits (tokenisation, the base model's evaluation), into the cache both modes read."""
    from omegaconf import OmegaConf

    from softprompt.experiments.sweep import (
        Job,
        compose,
        job_overrides,
        load_sweep,
        merge_overrides,
        planned_count,
        propose,
    )
    from softprompt.models.loading import load_model
    from softprompt.train.pack import load_data
    from softprompt.train.planner import plan

    sweep = load_sweep(sweep_file)
    limit, jobs = planned_count(sweep, count), []
    while limit is None or len(jobs) < limit:
        values = propose(sweep, jobs)
        if values is None:
            break
        jobs.append(Job(index=len(jobs), values=values, run_dir=Path()))
    configs = [compose(merge_overrides(job_overrides(j.values), overrides)) for j in jobs]
    models: dict[str, Any] = {}
    for pack in plan(configs):  # a pack's jobs share everything a split depends on but the seed
        first_of_seed = {configs[i].seed: configs[i] for i in reversed(pack.jobs)}
        for cfg in first_of_seed.values():
            key = json.dumps(OmegaConf.to_container(cfg.model, resolve=True), sort_keys=True)
            if key not in models:
                models[key] = load_model(cfg.model)
            load_data(cfg, models[key])  # a split another pack already evaluated is a cache hit


def _one_mode(mode: str, sweep_file: str, root: str, count: int | None, overrides: list[str]) -> None:
    """The child: one mode of the bench, in its own process; prints the sweep dir last."""
    from softprompt.experiments.sweep import load_sweep, run_sweep

    share = dict(MODES + HALVING_MODES)[mode]
    sweep = load_sweep(sweep_file)
    if mode == "full":  # the same grid, every point to its end
        sweep.config.pop("early_terminate", None)
    sweep_dir, _ = run_sweep(sweep, overrides, count=count, root=root, share=share,
                             log=lambda line: print(line, file=sys.stderr, flush=True))
    print(sweep_dir, flush=True)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from softprompt.core.errors import report_and_exit

    parser = argparse.ArgumentParser(description="time a sweep alone-per-job and shared, in one invocation")
    parser.add_argument("--sweep", required=True, help="a W&B sweep YAML, e.g. sweeps/pack_small.yaml")
    parser.add_argument("--count", type=int, default=None, help="at most N jobs per mode")
    parser.add_argument("--root", default=None, help="where both sweeps' run dirs go (default: a temp dir)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--halving", action="store_true",
                        help="compare the file's early_terminate (hyperband) with its full grid, both shared")
    parser.add_argument("--mode", choices=[WARM, *(m for m, _ in MODES + HALVING_MODES)], default=None,
                        help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every job, e.g. dataset.path=FILE")
    args = parser.parse_intermixed_args(argv)
    os.environ.setdefault("SOFTPROMPT_QUIET", "1")
    quiet_third_party()  # each child imports PEFT: where bitsandbytes is installed, its import talks
    try:
        if args.mode == WARM:
            _warm(args.sweep, args.count, args.overrides)
            return 0
        if args.mode:
            _one_mode(args.mode, args.sweep, args.root, args.count, args.overrides)
            return 0
        result = bench_sweep(args.sweep, args.overrides, root=args.root, count=args.count,
                             log=lambda line: print(line, flush=True), halving=args.halving)
    except UserError as exc:
        report_and_exit(str(exc))
    text = json.dumps(result, indent=2)
    print(text, flush=True)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.halving:
        print(f"full {result['full_wall_s']:.1f} s, {result['full_lane_steps']} lane-steps; hyperband "
              f"{result['hyperband_wall_s']:.1f} s, {result['hyperband_lane_steps']} lane-steps "
              f"({result['lane_steps_ratio']:.0%}); same best point: {result['same_best']}", flush=True)
        return 0
    print(f"alone {result['alone_wall_s']:.1f} s, shared {result['shared_wall_s']:.1f} s: "
          f"{result['ratio']:.2f}x; largest relative difference of {keys.EVAL_PERPLEXITY}: "
          f"{result['max_rel_diff_eval_perplexity']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
