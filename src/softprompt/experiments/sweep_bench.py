"""`scripts/bench.py --sweep SWEEP.yaml`: the same sweep trained alone-per-job and shared, timed in
one invocation, with the largest difference between the two modes' results.

Shared runs first, so that what one process pays once (imports, first calls into torch, files in
the OS cache) is paid by the shared mode: the ratio errs against sharing. Each mode gets its own
empty softprompt cache (tokenisation, base evaluation), as a fresh sweep would.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from softprompt.core import keys


def bench_sweep(sweep_file: str, overrides: list[str], root: str | Path | None = None, count: int | None = None,
                log=print) -> dict[str, Any]:
    from softprompt.experiments.sweep import load_sweep, run_sweep

    sweep = load_sweep(sweep_file)
    root = Path(root or tempfile.mkdtemp(prefix="softprompt-sweep-bench-"))
    modes: dict[str, dict[str, Any]] = {}
    for mode, share in (("shared", True), ("alone", False)):
        previous = os.environ.get("SOFTPROMPT_CACHE")
        os.environ["SOFTPROMPT_CACHE"] = str(root / mode / "cache")
        try:
            t0 = time.perf_counter()
            sweep_dir, jobs = run_sweep(sweep, overrides, count=count, root=root / mode, share=share, log=log)
            seconds = time.perf_counter() - t0
        finally:
            if previous is None:
                os.environ.pop("SOFTPROMPT_CACHE", None)
            else:
                os.environ["SOFTPROMPT_CACHE"] = previous
        modes[mode] = {"wall_s": seconds, "dir": str(sweep_dir),
                       "jobs": {json.dumps(j.values, sort_keys=True): j for j in jobs}}

    diffs, per_job = [], []
    for point, alone in modes["alone"]["jobs"].items():
        shared = modes["shared"]["jobs"].get(point)
        a = alone.metrics.get(keys.EVAL_PERPLEXITY)
        s = shared.metrics.get(keys.EVAL_PERPLEXITY) if shared else None
        rel = abs(s - a) / abs(a) if a is not None and s is not None else None
        if rel is not None:
            diffs.append(rel)
        per_job.append({"values": alone.values, "alone": a, "shared": s, "rel_diff": rel,
                        "alone_state": alone.state, "shared_state": shared.state if shared else None})
    alone_s, shared_s = modes["alone"]["wall_s"], modes["shared"]["wall_s"]
    return {
        "sweep": sweep.name, "jobs": len(per_job), "overrides": list(overrides),
        "alone_wall_s": round(alone_s, 2), "shared_wall_s": round(shared_s, 2),
        "ratio": alone_s / shared_s if shared_s else math.nan,
        "max_rel_diff_eval_perplexity": max(diffs) if diffs else None,
        "compared": len(diffs), "per_job": per_job,
        "dirs": {"alone": modes["alone"]["dir"], "shared": modes["shared"]["dir"]},
        "load_average": list(os.getloadavg()),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import argparse

    from softprompt.core.errors import UserError, report_and_exit

    parser = argparse.ArgumentParser(description="time a sweep alone-per-job and shared, in one invocation")
    parser.add_argument("--sweep", required=True, help="a W&B sweep YAML, e.g. sweeps/pack_small.yaml")
    parser.add_argument("--count", type=int, default=None, help="at most N jobs per mode")
    parser.add_argument("--root", default=None, help="where both sweeps' run dirs go (default: a temp dir)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every job, e.g. dataset.path=FILE")
    args = parser.parse_intermixed_args(argv)
    os.environ.setdefault("SOFTPROMPT_QUIET", "1")
    try:
        result = bench_sweep(args.sweep, args.overrides, root=args.root, count=args.count,
                             log=lambda line: print(line, flush=True))
    except UserError as exc:
        report_and_exit(str(exc))
    text = json.dumps(result, indent=2)
    print(text, flush=True)
    print(f"alone {result['alone_wall_s']:.1f} s, shared {result['shared_wall_s']:.1f} s: "
          f"{result['ratio']:.2f}x; largest relative difference of {keys.EVAL_PERPLEXITY}: "
          f"{result['max_rel_diff_eval_perplexity']}", flush=True)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return result
