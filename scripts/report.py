"""python scripts/report.py DIR...: compare finished runs (a multirun/sweep dir or run dirs).

Writes into the first DIR: report.md (grid points over seeds with mean, std, min-max and n;
neighbouring points within the spread; one row per run: swept values, base and tuned held-out
perplexity, their ratio, gen/ metrics, runtime, tokens/s, FLOPs; the base-vs-tuned generations;
the learned prompt as tokens), a self-contained report.html (the same, plots inline) and the PNG
plots (ppl_vs_virtual_tokens, eval_curves, train_loss, pareto), and prints the run table.
Unfinished runs (no metrics.json) are skipped and listed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from softprompt.core.errors import UserError, report_and_exit  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="a multirun/sweep dir, or run dirs")
    args = parser.parse_args(argv)
    try:
        from softprompt.experiments.report import build_report, write_report

        report = build_report(args.dirs)
        path = write_report(report, args.dirs[0])
    except UserError as exc:
        report_and_exit(str(exc))
    for skipped in report.skipped:
        print(f"skipped {skipped}: unfinished (no metrics.json)")
    print(report.table())
    print(f"wrote {path}, {path.with_name('report.html')} and the plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
