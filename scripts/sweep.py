"""python scripts/sweep.py SWEEP.yaml [--count N] [--seed S] [--root DIR] [--no-share] [--pack N] [overrides...]

Runs a W&B sweep file offline, without the W&B service: the same parameter semantics (grid,
random, bayes; values and distributions; run_cap) through the `sweeps` package that W&B's
controller uses. Each job is one run of `train.py` with the sweep's values plus OVERRIDES, in
multirun/sweep-<name>-<time>/<i>/, with its own offline W&B run, grouped by sweep.
By default jobs that can share train together (epoch trunks, packed prompts: docs/sweeps.md);
--no-share runs each alone. Every grid point leaves its own run directory either way.
Then: python scripts/report.py multirun/sweep-<name>-<time>
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from softprompt.core.errors import UserError, report_and_exit  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_file", help="a W&B sweep YAML, e.g. sweeps/tokens_x_epochs.yaml")
    parser.add_argument("--count", type=int, default=None,
                        help="run at most N jobs (default: the whole grid, or run_cap)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random/bayes search (default 0)")
    parser.add_argument("--root", default="multirun", help="where the sweep dir goes (default multirun/)")
    parser.add_argument("--no-share", action="store_true",
                        help="train every job alone (default: jobs that can share a process and epoch trunks do)")
    parser.add_argument("--pack", type=int, default=1,
                        help="random/bayes: propose and train N jobs at a time as one pack (default 1)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every job, e.g. model=tiny-bloom")
    # overrides may come before or after the options
    args = parser.parse_intermixed_args(argv)
    try:
        if args.count is not None and args.count < 1:
            raise UserError(f"--count must be >= 1 (got {args.count})")
        if args.pack < 1:
            raise UserError(f"--pack must be >= 1 (got {args.pack})")
        from softprompt.experiments.sweep import load_sweep, run_sweep

        sweep = load_sweep(args.sweep_file)
        sweep_dir, jobs = run_sweep(sweep, args.overrides, count=args.count, root=args.root, seed=args.seed,
                                    share=not args.no_share, pack=args.pack)
    except UserError as exc:
        report_and_exit(str(exc))
    finished = sum(j.state == "finished" for j in jobs)
    print(f"sweep {sweep.name}: {finished}/{len(jobs)} jobs finished in {sweep_dir}; "
          f"compare them with: python scripts/report.py {sweep_dir}", flush=True)
    if jobs and not finished:
        report_and_exit(f"every job of sweep {sweep.name} failed (see {sweep_dir}/sweep.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
