"""Compare finished runs: grid points (runs equal but for the seed) with mean and spread over
seeds, one row per run, neighbouring points whose difference is within that spread, plots
(perplexity vs prompt length, per-epoch curves, training loss by step, a Pareto view of quality
against cost), the base-vs-tuned generations and the learned prompt read as tokens; written as
report.md + PNGs and as one self-contained report.html (plots inline) for a browser, offline.

A run directory is finished when it holds metrics.json (run.py writes it last); others are
listed as skipped. The swept values are read from each run's config.json, so the report works
for Hydra multiruns, `scripts/sweep.py` sweeps and hand-picked run dirs alike.
"""

from __future__ import annotations

import argparse
import base64
import html
import itertools
import json
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from softprompt.core import keys
from softprompt.core.errors import UserError, import_extra, report_and_exit
from softprompt.core.grid import SEED, flatten, is_setting, point_id
from softprompt.core.rundir import RunDir

GEN_PREFIX = "gen/"
PLOT_TOKENS = "ppl_vs_virtual_tokens.png"
PLOT_CURVES = "eval_curves.png"
PLOT_TRAIN_LOSS = "train_loss.png"
PLOT_PARETO = "pareto.png"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"


@dataclass
class RunRecord:
    name: str  # the run dir, relative to the report's first DIR where possible
    path: Path
    metrics: dict[str, Any]
    config: dict[str, Any]  # flattened, dotted keys
    history: list[dict[str, Any]] = field(default_factory=list)
    # prompt_tokens.jsonl rows (one per virtual token), None when the run has none (LoRA, ...)
    prompt_tokens: list[dict[str, Any]] | None = None
    # (optimizer step, training loss) as logged: from history.jsonl, else from the W&B run file
    train_loss: list[tuple[int, float]] = field(default_factory=list)

    def value(self, key: str) -> float | None:
        return _number(self.metrics.get(key))


@dataclass
class Stat:
    """A metric over the runs (seeds) of one grid point; `std` is the sample std (n - 1), None for n = 1."""

    n: int
    mean: float
    std: float | None
    min: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> Stat | None:
        if not values:
            return None
        std = statistics.stdev(values) if len(values) > 1 else None
        return cls(n=len(values), mean=statistics.fmean(values), std=std, min=min(values), max=max(values))

    @property
    def spread(self) -> float:
        return self.std or 0.0

    def text(self, digits: int = 4) -> str:
        return _fmt(self.mean, digits) + (f" ± {_fmt(self.std, 2)}" if self.std is not None else "")

    def range_text(self, digits: int = 4) -> str:
        return f"{_fmt(self.min, digits)}–{_fmt(self.max, digits)}" if self.n > 1 else ""


@dataclass
class Point:
    """One grid point: the runs whose settings are equal except for the seed."""

    id: str
    settings: dict[str, Any]  # the swept values, seed excluded
    runs: list[RunRecord]

    def stat(self, key: str) -> Stat | None:
        return Stat.of([v for v in (r.value(key) for r in self.runs) if v is not None])

    @property
    def seeds(self) -> list[Any]:
        return [r.config.get(SEED) for r in self.runs]

    def label(self, exclude: tuple[str, ...] = ()) -> str:
        parts = [f"{_short(k)}={_fmt(v)}" for k, v in self.settings.items() if k not in exclude]
        return ", ".join(parts) or "all runs"


@dataclass
class Comparison:
    """Two neighbouring grid points: equal but for one axis, adjacent values on it."""

    axis: str
    low: Point
    high: Point
    delta: float  # mean tuned perplexity of `high` minus that of `low`
    spread: float  # std(low) + std(high)
    seeded: bool  # both points have n >= 2, so there is a spread to compare with
    # high minus low for each seed both points ran (in seed order): a seed fixes the split and the
    # init draw, so a difference of the same sign on every seed is evidence the unpaired test misses
    paired: list[float] = field(default_factory=list)

    @property
    def paired_text(self) -> str:
        return ", ".join(f"{d:+.3g}" for d in self.paired)

    @property
    def lower_on(self) -> str:
        return f"{sum(d < 0 for d in self.paired)}/{len(self.paired)}" if self.paired else ""

    @property
    def within_spread(self) -> bool:
        return self.seeded and abs(self.delta) <= self.spread

    @property
    def verdict(self) -> str:
        if not self.seeded:
            return "no spread (n = 1)"
        return "within spread" if self.within_spread else "beyond spread"


@dataclass
class Report:
    runs: list[RunRecord]
    skipped: list[Path]
    swept: list[str]  # config keys whose values differ between runs (the seed included)
    gen_keys: list[str]
    best: int | None  # index of the run with the lowest tuned perplexity
    points: list[Point] = field(default_factory=list)
    best_point: int | None = None  # index of the point with the lowest mean tuned perplexity
    # runs that a sweep's early termination stopped (sweep/terminated_at_epoch): results at the epoch
    # where they stopped, listed apart and never compared with, grouped with or ranked among `runs`
    stopped: list[RunRecord] = field(default_factory=list)

    @property
    def axes(self) -> list[str]:
        """The swept settings that define grid points (the seed is not one)."""
        return [k for k in self.swept if k != SEED]

    @property
    def seeded(self) -> bool:
        """Some grid point has more than one run: mean and spread are worth a table."""
        return any(len(p.runs) > 1 for p in self.points)

    @property
    def has_prompt_tokens(self) -> bool:
        return any(r.prompt_tokens for r in self.runs)

    def rows(self) -> tuple[list[str], list[list[str]]]:
        header = ["run", *self.swept, "base ppl", "tuned ppl", "tuned/base", *self.gen_keys,
                  "train s", "eval s", "tokens/s", "train FLOPs"]
        header += ["prompt, nearest tokens", "cos to init"] if self.has_prompt_tokens else []
        header += ["best"]
        rows = []
        for i, r in enumerate(self.runs):
            m = r.metrics
            row = [r.name, *(_fmt(r.config.get(k)) for k in self.swept),
                   _fmt(m.get(keys.EVAL_BASE_PERPLEXITY)), _fmt(m.get(keys.EVAL_PERPLEXITY)),
                   _fmt(_ratio(m)), *(_fmt(m.get(k)) for k in self.gen_keys),
                   _fmt(m.get(keys.TRAIN_RUNTIME_S), 1), _fmt(m.get(keys.EVAL_RUNTIME_S), 1),
                   _fmt(m.get(keys.TRAIN_TOKENS_PER_SECOND), 1), _fmt_big(m.get(keys.TRAIN_FLOPS))]
            if self.has_prompt_tokens:
                row += [nearest_summary(r.prompt_tokens), _fmt(mean_cosine_to_init(r.prompt_tokens), 3)]
            rows.append(row + ["**best**" if i == self.best else ""])
        return header, rows

    def point_rows(self) -> tuple[list[str], list[list[str]]]:
        """Per grid point: n, the seeds, tuned perplexity as mean ± std and min–max, and costs."""
        header = [*self.axes, "n", "seeds", "tuned ppl (mean ± std)", "tuned ppl min–max", "base ppl",
                  "tuned/base (mean ± std)", "train FLOPs", "trainable params", "best"]
        rows = []
        for i, p in enumerate(self.points):
            tuned, base, ratio = p.stat(keys.EVAL_PERPLEXITY), p.stat(keys.EVAL_BASE_PERPLEXITY), p.stat(keys.EVAL_PPL_RATIO)
            flops, params = p.stat(keys.TRAIN_FLOPS), p.stat(keys.TRAIN_TRAINABLE_PARAMS)
            rows.append([*(_fmt(p.settings.get(k)) for k in self.axes), str(len(p.runs)),
                         ", ".join(_fmt(s) for s in p.seeds),
                         tuned.text() if tuned else "", tuned.range_text() if tuned else "",
                         base.text() if base else "", ratio.text() if ratio else "",
                         _fmt_big(flops.mean) if flops else "", _fmt_big(params.mean) if params else "",
                         "**best**" if i == self.best_point else ""])
        return header, rows

    def comparisons(self) -> list[Comparison]:
        return neighbour_comparisons(self.points, self.axes)

    def comparison_rows(self) -> tuple[list[str], list[list[str]]]:
        header = ["axis", "from", "to", "at", "Δ tuned ppl (to − from)", "std + std", "verdict",
                  "Δ per seed (paired)", "seeds where lower"]
        rows = [[_short(c.axis), _fmt(c.low.settings.get(c.axis)), _fmt(c.high.settings.get(c.axis)),
                 c.low.label(exclude=(c.axis,)), f"{c.delta:+.4g}", _fmt(c.spread, 3) if c.seeded else "",
                 f"**{c.verdict}**" if c.within_spread else c.verdict, c.paired_text, c.lower_on]
                for c in self.comparisons()]
        return header, rows

    def table(self) -> str:
        return markdown_table(*self.rows())

    def stopped_rows(self) -> tuple[list[str], list[list[str]]]:
        header = ["run", *self.swept, "stopped after epoch", "base ppl", "tuned ppl there", "tuned/base", "train s"]
        rows = [[r.name, *(_fmt(r.config.get(k)) for k in self.swept),
                 _fmt(r.metrics.get(keys.SWEEP_TERMINATED_AT_EPOCH)), _fmt(r.metrics.get(keys.EVAL_BASE_PERPLEXITY)),
                 _fmt(r.metrics.get(keys.EVAL_PERPLEXITY)), _fmt(_ratio(r.metrics)),
                 _fmt(r.metrics.get(keys.TRAIN_RUNTIME_S), 1)] for r in self.stopped]
        return header, rows


def markdown_table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> str:
    """`align`: per column "---:" (right) or "---" (left); default all left."""
    rule = "| " + " | ".join(align) + " |" if align else "|" + "|".join("---" for _ in header) + "|"
    lines = ["| " + " | ".join(header) + " |", rule]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def find_run_dirs(dirs: list[str | Path]) -> list[Path]:
    """Run dirs in DIRS: each DIR itself if it is one, else the run dirs below it (a multirun)."""
    found: list[Path] = []
    for d in map(Path, dirs):
        if not d.is_dir():
            raise UserError(f"{d} is not a directory; give run dirs or a multirun/sweep dir")
        if _is_run_dir(d):
            found.append(d)
            continue
        below = sorted((p for p in d.rglob("*") if p.is_dir() and _is_run_dir(p) and not _inside_run(p, d)),
                       key=_natural_key)
        found.extend(below)
    return list(dict.fromkeys(p.resolve() for p in found))


def _is_run_dir(path: Path) -> bool:
    return RunDir.is_run_dir(path)


def _inside_run(path: Path, top: Path) -> bool:
    return any(_is_run_dir(parent) for parent in path.parents if parent != top and top in parent.parents)


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in path.parts]


def load_runs(dirs: list[str | Path]) -> tuple[list[RunRecord], list[Path]]:
    paths = find_run_dirs(dirs)
    # names relative to what all runs share: "0", "1", ... for one sweep; "<sweep>/0" for several
    top = Path(os.path.commonpath(paths)) if len(paths) > 1 else (paths[0].parent if paths else Path("."))
    runs, skipped = [], []
    for path in paths:
        run = RunDir(path)
        if not run.finished:
            skipped.append(path)
            continue
        history = run.read_history()
        name = str(path.relative_to(top)) if top in path.parents else path.name
        runs.append(RunRecord(name=name, path=path, metrics=run.read_metrics(), config=_read_config(run),
                              history=history, prompt_tokens=run.read_prompt_tokens(),
                              train_loss=_train_loss(history) or _wandb_train_loss(run)))
    return runs, skipped


def _train_loss(rows: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, loss) of the rows that log a training loss, one per step (the last row wins)."""
    by_step = {int(r[keys.TRAIN_STEP]): float(r[keys.TRAIN_LOSS]) for r in rows
               if _number(r.get(keys.TRAIN_LOSS)) is not None and _number(r.get(keys.TRAIN_STEP)) is not None}
    return sorted(by_step.items())


def _wandb_train_loss(run: RunDir) -> list[tuple[int, float]]:
    """The per-step training loss the run logged to W&B, for runs written before history.jsonl held
    every logged step: read from the run's own `.wandb` file(s), offline, no service needed."""
    if not run.wandb.is_dir():
        return []
    from softprompt.track.records import RecordFileError, find_run_files, read_run

    rows: list[dict[str, Any]] = []
    for run_file in find_run_files(run.wandb):  # a resumed run continues in a new file
        try:
            rows += read_run(run_file).history
        except (OSError, RecordFileError):
            continue  # an unreadable W&B file costs the loss curve, not the report
    return _train_loss(rows)


def _read_config(run: RunDir) -> dict[str, Any]:
    config = run.read_config()
    if config is not None:
        return flatten(config)
    if run.hydra_config.is_file():  # a run that stopped before writing its own config
        import yaml

        return flatten(yaml.safe_load(run.hydra_config.read_text()) or {})
    return {}


def swept_keys(runs: list[RunRecord]) -> list[str]:
    """Config keys whose values differ between runs, the seed's two axes first and the seed last."""
    all_keys = sorted({k for r in runs for k in r.config})
    differ = [k for k in all_keys if is_setting(k)
              and len({json.dumps(r.config.get(k), sort_keys=True) for r in runs}) > 1]
    first = [k for k in (keys.CFG_NUM_VIRTUAL_TOKENS, keys.CFG_EPOCHS) if k in differ]
    last = [SEED] if SEED in differ else []
    return first + [k for k in differ if k not in first and k not in last] + last


def group_points(runs: list[RunRecord], axes: list[str]) -> list[Point]:
    """Runs grouped by everything but the seed, in the order their first run appears."""
    points: dict[str, Point] = {}
    for r in runs:
        pid = point_id(r.config)
        if pid not in points:
            points[pid] = Point(id=pid, settings={k: r.config.get(k) for k in axes}, runs=[])
        points[pid].runs.append(r)
    return list(points.values())


def neighbour_comparisons(points: list[Point], axes: list[str], key: str = keys.EVAL_PERPLEXITY) -> list[Comparison]:
    """For each axis, the points equal on every other axis, taken in order of the axis' value:
    each adjacent pair (e.g. 8 vs 16 tokens at the same epochs) and how their means differ.

    A difference is within the spread when |mean_b - mean_a| <= std_a + std_b, i.e. the mean ± std
    error bars overlap: the seeds do not tell the two points apart.
    """
    found = []
    for axis in axes:
        lines: dict[str, list[Point]] = {}
        for p in points:
            rest = json.dumps({k: v for k, v in p.settings.items() if k != axis}, sort_keys=True, default=str)
            lines.setdefault(rest, []).append(p)
        for line in lines.values():
            line.sort(key=lambda p: _value_key(p.settings.get(axis)))
            for low, high in itertools.pairwise(line):
                a, b = low.stat(key), high.stat(key)
                if a is None or b is None:
                    continue
                found.append(Comparison(axis=axis, low=low, high=high, delta=b.mean - a.mean,
                                        spread=a.spread + b.spread, seeded=a.n > 1 and b.n > 1,
                                        paired=_paired(low, high, key)))
    return found


def _paired(low: Point, high: Point, key: str) -> list[float]:
    """`high` minus `low` per seed that both ran once (seed order); empty unless there are >= 2 such seeds."""
    def by_seed(p: Point) -> dict[Any, float]:
        seeds = [r.config.get(SEED) for r in p.runs]
        return {s: v for r, s in zip(p.runs, seeds) if seeds.count(s) == 1 and (v := r.value(key)) is not None}
    a, b = by_seed(low), by_seed(high)
    common = sorted((s for s in a if s in b and s is not None), key=_value_key)
    return [b[s] - a[s] for s in common] if len(common) > 1 else []


def build_report(dirs: list[str | Path]) -> Report:
    runs, skipped = load_runs(dirs)
    stopped = [r for r in runs if r.metrics.get(keys.SWEEP_TERMINATED_AT_EPOCH) is not None]
    swept = swept_keys(runs)  # the stopped runs' values too: they are points of the same grid
    runs = [r for r in runs if r.metrics.get(keys.SWEEP_TERMINATED_AT_EPOCH) is None]
    if not runs:
        raise UserError(f"no finished runs (with {RunDir.METRICS}) in {', '.join(map(str, dirs))}"
                        + (f"; {len(stopped)} stopped early" if stopped else "")
                        + (f"; {len(skipped)} unfinished" if skipped else ""))
    gen_keys = sorted({k for r in runs for k in r.metrics if k.startswith(GEN_PREFIX)
                       and isinstance(r.metrics[k], (int, float)) and not isinstance(r.metrics[k], bool)})
    scored = [(v, i) for i, r in enumerate(runs) if (v := r.value(keys.EVAL_PERPLEXITY)) is not None]
    best = min(scored)[1] if scored else None
    points = group_points(runs, [k for k in swept if k != SEED])
    point_scores = [(s.mean, i) for i, p in enumerate(points) if (s := p.stat(keys.EVAL_PERPLEXITY))]
    return Report(runs=runs, skipped=skipped, swept=swept, gen_keys=gen_keys, best=best, points=points,
                  best_point=min(point_scores)[1] if point_scores else None, stopped=stopped)


def write_report(report: Report, out_dir: str | Path) -> Path:
    """report.md, report.html and the PNG plots into `out_dir`; returns the report.md path."""
    out = Path(out_dir)
    plots = [p for p in (plot_ppl_vs_tokens(report, out / PLOT_TOKENS), plot_curves(report, out / PLOT_CURVES),
                         plot_train_loss(report, out / PLOT_TRAIN_LOSS), plot_pareto(report, out / PLOT_PARETO)) if p]
    (out / REPORT_MD).write_text(report_markdown(report, plots))
    (out / REPORT_HTML).write_text(report_html(report, plots))
    return out / REPORT_MD


def _intro(report: Report) -> str:
    text = ("Held-out perplexity of the base model and of the prompt-tuned model; tuned/base < 1 means the "
            "soft prompt helped.")
    if report.stopped:
        text += (f" {len(report.stopped)} runs stopped early (hyperband) are listed apart, under "
                 "\"Stopped early\".")
    if report.best is None:
        return text + " No run has a finite perplexity."
    text += f" Best run (lowest tuned perplexity): `{report.runs[report.best].name}`."
    if report.seeded and report.best_point is not None:
        text += f" Best grid point (lowest mean over seeds): {report.points[report.best_point].label()}."
    return text


def report_markdown(report: Report, plots: list[Path]) -> str:
    n_points = len(report.points)
    lines = [f"# Sweep report: {len(report.runs)} runs"
             + (f", {n_points} grid points" if report.seeded else ""), "", _intro(report), ""]
    if report.seeded:
        lines += ["## Grid points, over seeds", "", POINTS_NOTE, "", markdown_table(*report.point_rows()), ""]
        header, rows = report.comparison_rows()
        if rows:
            lines += ["## Neighbouring grid points", "", COMPARISONS_NOTE, "", markdown_table(header, rows), ""]
    lines += ["## Runs", "", report.table(), ""]
    if report.stopped:
        lines += ["## Stopped early", "", STOPPED_NOTE, "", markdown_table(*report.stopped_rows()), ""]
    if report.skipped:
        lines += [f"Skipped (unfinished, no {RunDir.METRICS}): {', '.join(f'`{p}`' for p in report.skipped)}", ""]
    lines += ["## Plots", "", *(f"![{p.stem}]({p.name})" for p in plots), ""]
    if PLOT_PARETO in {p.name for p in plots}:
        lines += [PARETO_NOTE, ""]
    lines += generations_section(report)
    lines += prompt_tokens_section(report)
    return "\n".join(lines).rstrip() + "\n"


STOPPED_NOTE = ("Runs that the sweep's early termination (hyperband) stopped, each at the end of the epoch "
                "named here: their perplexity is that epoch's, not their budget's. They are results, kept "
                "apart: the runs table, the grid points, the comparisons, the best run and the plots hold only "
                "the runs that trained to their end, except the per-epoch curves, where each stopped run is a "
                "grey dotted line ending with × at its stop epoch.")
POINTS_NOTE = ("Runs that differ only in `seed` form one grid point. Mean ± sample standard deviation "
               "(n − 1) over its runs, min–max and n. Each seed also draws its own train/held-out split, "
               "so the spread covers the data split as well as the initialisation and the batch order.")
COMPARISONS_NOTE = ("Pairs of grid points equal on every other axis, adjacent on this one. **within spread**: "
                    "the means differ by no more than the sum of the two standard deviations (their error "
                    "bars overlap), so these seeds do not show that one beats the other. That test is unpaired; "
                    "**Δ per seed** pairs the runs of each seed (one seed: the same data split and init draw), "
                    "and a difference of one sign on every seed is evidence the unpaired test can miss when most "
                    "of the spread is the splits' difficulty.")
PARETO_NOTE = ("`pareto.png`: held-out perplexity against training FLOPs (`train/flops`: 4N per real "
               "token for prompt tuning, see softprompt.models.flops) and against trainable parameters; "
               "one point per grid point (mean over seeds, std as error bars), the Pareto frontier "
               "(no other point is both cheaper and better) drawn as a line. FLOPs count real tokens only, "
               "so prompt length alone does not move a point right: the virtual positions add about "
               "num_virtual_tokens / sequence length more compute.")


def _best_run_with(report: Report, present) -> RunRecord | None:
    order = ([report.best] if report.best is not None else []) + list(range(len(report.runs)))
    return next((report.runs[i] for i in order if present(report.runs[i])), None)


def _generations(run: RunRecord) -> list[dict[str, Any]]:
    return RunDir(run.path).read_generations()


def generations_section(report: Report) -> list[str]:
    """The best run's generations, base and tuned side by side (from its generations.jsonl)."""
    run = _best_run_with(report, lambda r: RunDir(r.path).generations.is_file())
    rows = _generations(run) if run else []
    if not rows:
        return []
    has_ref = any("reference" in r for r in rows)
    header = ["prompt", *(["reference"] if has_ref else []), "base", "tuned"]
    body = [[_md_text(r.get(k, "")) for k in header] for r in rows]
    return ["## Generations, base vs tuned", "", f"Run `{run.name}`, from its `{RunDir.GENERATIONS}`.", "",
            markdown_table(header, body), ""]


def _md_text(text: str) -> str:
    return html.escape(str(text)).replace("|", "\\|").replace("\n", "<br>")


def prompt_tokens_table(report: Report) -> tuple[str, list[str], list[list[str]]] | None:
    """The learned prompt of the best run (else the first that has one), read as tokens: per
    virtual token its nearest vocabulary tokens (cosine) and how far it moved from its init.
    Returns (note, header, rows), or None when no run has a soft prompt."""
    with_tokens = [i for i, r in enumerate(report.runs) if r.prompt_tokens]
    if not with_tokens:
        return None
    i = report.best if report.best in with_tokens else with_tokens[0]
    run = report.runs[i]
    which = "best run" if i == report.best else "first run with a soft prompt"
    note = (f"Run `{run.name}` ({which}), from its `{RunDir.PROMPT_TOKENS}`: each virtual token's nearest "
            "vocabulary tokens by cosine similarity in the input-embedding space, and its cosine "
            "similarity and L2 distance to its initial value (Lester et al. 2021). The table's "
            "`prompt, nearest tokens` column gives every run's nearest token per position.")
    header = ["position", "nearest tokens (cosine)", "cosine to init", "L2 to init", "L2 norm"]
    rows = [[str(row["position"]), ", ".join(f"{_neighbour_markdown(n)} {n['cosine']:.2f}" for n in row["neighbours"]),
             _fmt(row.get("cosine_to_init"), 3), _fmt(row.get("l2_to_init"), 3), _fmt(row.get("l2_norm"), 3)]
            for row in run.prompt_tokens]
    return note, header, rows


def seed_prompts_table(report: Report) -> tuple[str, list[str], list[list[str]]] | None:
    """Do seeds learn the same words? For each prompt length, the best grid point's seeds side by
    side: each seed's nearest tokens and drift from init, and the positions where all agree."""
    best: dict[int, tuple[float, Point]] = {}
    for p in report.points:
        stat = p.stat(keys.EVAL_PERPLEXITY)
        if len(p.runs) > 1 and stat and all(r.prompt_tokens for r in p.runs):
            length = len(p.runs[0].prompt_tokens)
            if length not in best or stat.mean < best[length][0]:
                best[length] = (stat.mean, p)
    if not best:
        return None
    header = ["tokens", "grid point", "seed", "nearest token per position", "cos to init", "tuned ppl",
              "positions where all seeds agree"]
    rows = []
    for length, (_, p) in sorted(best.items()):
        nearest = [[row["neighbours"][0]["id"] if row["neighbours"] else None for row in r.prompt_tokens] for r in p.runs]
        agree = sum(len(set(col)) == 1 and col[0] is not None for col in zip(*nearest))
        for j, r in enumerate(p.runs):
            rows.append([str(length), p.label(), _fmt(r.config.get(SEED)), nearest_summary(r.prompt_tokens),
                         _fmt(mean_cosine_to_init(r.prompt_tokens), 3), _fmt(r.metrics.get(keys.EVAL_PERPLEXITY)),
                         f"{agree}/{length}" if j == 0 else ""])
    note = ("The best grid point at each prompt length, one row per seed: the nearest vocabulary token of each "
            "virtual token, the mean cosine similarity to its init, and how many positions have the same "
            "nearest token in every seed.")
    return note, header, rows


def prompt_tokens_section(report: Report) -> list[str]:
    lines = []
    table = prompt_tokens_table(report)
    if table:
        note, header, rows = table
        lines += ["## The learned prompt, read as tokens", "", note, "",
                  markdown_table(header, rows, align=["---:", "---", "---:", "---:", "---:"]), ""]
    seeds = seed_prompts_table(report)
    if seeds:
        note, header, rows = seeds
        lines += ["## Learned prompts across seeds", "", note, "", markdown_table(header, rows), ""]
    return lines


def nearest_summary(rows: list[dict[str, Any]] | None) -> str:
    """The nearest vocabulary token of each virtual token, in order (one table cell)."""
    if not rows:
        return ""
    return " ".join(token_markdown(r["neighbours"][0]["token"]) if r["neighbours"] else "?" for r in rows)


def mean_cosine_to_init(rows: list[dict[str, Any]] | None) -> float | None:
    values = [r["cosine_to_init"] for r in rows or [] if isinstance(r.get("cosine_to_init"), (int, float))]
    return sum(values) / len(values) if values else None


def _neighbour_markdown(n: dict[str, Any]) -> str:
    # byte-level pieces of a multi-byte character all decode to U+FFFD: the id tells them apart
    return token_markdown(n["token"]) + (f" (id {n['id']})" if "\ufffd" in n["token"] else "")


def token_markdown(token: str) -> str:
    """A token as a code span that keeps its leading space visible and cannot break the table."""
    # code spans show backslashes literally; only control characters (as Python escapes: \n,
    # \x03, ...) and the table's | change
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in token).replace("|", "\\|")
    if "`" in text:
        return f"`` {text} ``"
    return f"`{text}`" if text.strip() else f"`{text!r}`" if text else "`''`"


# --- plots ---------------------------------------------------------------------------------------


def _colors(n: int) -> list:
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def _base_lines(ax, runs: list[RunRecord]) -> None:
    """The base model's held-out perplexity as a dashed reference line. Seeds draw their own
    held-out split, so the base model scores differently per seed: then the mean, with the
    min-max as a gray band (one line per split would read as several base models)."""
    values = sorted({round(v, 6) for r in runs if (v := r.value(keys.EVAL_BASE_PERPLEXITY)) is not None})
    if not values:
        return
    if len(values) == 1:
        ax.axhline(values[0], color="gray", linestyle="--", linewidth=1, label="base model")
        return
    ax.axhline(statistics.fmean(values), color="gray", linestyle="--", linewidth=1,
               label=f"base model (mean of {len(values)} splits, band: min–max)")
    ax.axhspan(values[0], values[-1], color="gray", alpha=0.12, linewidth=0)


def plot_ppl_vs_tokens(report: Report, path: Path) -> Path | None:
    """Tuned perplexity against prompt length, one line per value of the other axes; over seeds,
    the mean with the std as error bars."""
    plt = _pyplot()
    series: dict[str, list[tuple[int, Stat]]] = {}
    for p in report.points:
        stat = p.stat(keys.EVAL_PERPLEXITY)
        tokens = p.runs[0].metrics.get(keys.PEFT_NUM_VIRTUAL_TOKENS, p.runs[0].config.get(keys.CFG_NUM_VIRTUAL_TOKENS))
        if stat is not None and isinstance(tokens, int):
            label = p.label(exclude=(keys.CFG_NUM_VIRTUAL_TOKENS,)) if len(report.axes) > 1 else "tuned"
            series.setdefault(label, []).append((tokens, stat))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, pts in sorted(series.items(), key=lambda kv: _natural_label(kv[0])):
        pts.sort(key=lambda p: p[0])
        ax.errorbar([p[0] for p in pts], [p[1].mean for p in pts], yerr=[p[1].spread for p in pts],
                    marker="o", capsize=3, label=label)
    _base_lines(ax, report.runs)
    ax.set_xscale("log", base=2)
    ticks = sorted({p[0] for pts in series.values() for p in pts})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("num_virtual_tokens")
    ax.set_ylabel("held-out perplexity (tuned)" + (", mean ± std over seeds" if report.seeded else ""))
    ax.set_title("Tuned perplexity vs soft-prompt length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_curves(report: Report, path: Path) -> Path | None:
    """Held-out perplexity after each epoch (history.jsonl), one line per grid point: the mean
    over its seeds, the std as a band; runs stopped early as grey dotted lines of their own."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    curves = []
    for p in report.points:
        by_epoch: dict[float, list[float]] = {}
        for r in p.runs:
            for i, h in enumerate(h for h in r.history if _number(h.get(keys.EVAL_PERPLEXITY)) is not None):
                by_epoch.setdefault(float(h.get(keys.EPOCH, i + 1)), []).append(h[keys.EVAL_PERPLEXITY])
        if by_epoch:
            curves.append((p, sorted((e, Stat.of(v)) for e, v in by_epoch.items())))
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (p, pts), color in zip(curves, _colors(len(curves))):
        # no point at epoch 0: the untrained soft prompt is not the base model (it already changes
        # the perplexity), so the base model is the dashed reference line instead
        xs, means = [e for e, _ in pts], [s.mean for _, s in pts]
        ax.plot(xs, means, marker=".", color=color, label=p.label() if report.axes else p.runs[0].name)
        if any(s.std for _, s in pts):
            ax.fill_between(xs, [s.mean - s.spread for _, s in pts], [s.mean + s.spread for _, s in pts],
                            color=color, alpha=0.2, linewidth=0)
    # runs stopped early (hyperband): apart, grey and dotted, their curve ending with x at their stop epoch
    for k, r in enumerate(report.stopped):
        pts = [(float(h.get(keys.EPOCH, i + 1)), h[keys.EVAL_PERPLEXITY])
               for i, h in enumerate(h for h in r.history if _number(h.get(keys.EVAL_PERPLEXITY)) is not None)]
        if pts:
            ax.plot([e for e, _ in pts], [v for _, v in pts], linestyle=":", color="0.55", marker="x",
                    markevery=[len(pts) - 1], label="stopped early (hyperband)" if k == 0 else None)
    _base_lines(ax, report.runs)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax.set_xlabel("epoch")
    ax.set_ylabel("held-out perplexity" + (" (mean ± std over seeds)" if report.seeded else ""))
    ax.set_title("Held-out perplexity per epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(curves) > 8 else 1)
    return _save(fig, path)


def plot_train_loss(report: Report, path: Path) -> Path | None:
    """Training loss by optimizer step, one line per run; the seeds of a grid point share a colour."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    points = [p for p in report.points if any(r.train_loss for r in p.runs)]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for p, color in zip(points, _colors(len(points))):
        for j, r in enumerate(x for x in p.runs if x.train_loss):
            ax.plot([s for s, _ in r.train_loss], [v for _, v in r.train_loss], color=color, linewidth=1.2,
                    alpha=0.85 if len(p.runs) == 1 else 0.6, marker="." if len(r.train_loss) < 30 else None,
                    label=(p.label() if report.axes else r.name) if j == 0 else None)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("Training loss by step" + (" (one line per seed)" if report.seeded else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(points) > 8 else 1)
    return _save(fig, path)


def pareto_front(xy: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both (lower x and lower y), by x."""
    order = sorted(range(len(xy)), key=lambda i: (xy[i][0], xy[i][1]))
    front, best_y = [], math.inf
    for i in order:
        if xy[i][1] < best_y:
            front.append(i)
            best_y = xy[i][1]
    return front


def plot_pareto(report: Report, path: Path) -> Path | None:
    """Held-out perplexity vs training FLOPs and vs trainable parameters, one marker per grid
    point (mean over seeds, std as error bars), the Pareto frontier as a step line."""
    plt = _pyplot()
    panels = [(keys.TRAIN_FLOPS, "training FLOPs"), (keys.TRAIN_TRAINABLE_PARAMS, "trainable parameters")]
    data = []
    for key, xlabel in panels:
        pts = [(p, x, y) for p in report.points
               if (x := p.stat(key)) is not None and (y := p.stat(keys.EVAL_PERPLEXITY)) is not None and x.mean > 0]
        if pts:
            data.append((key, xlabel, pts))
    if not data:
        return None
    fig, axes = plt.subplots(1, len(data), figsize=(6.0 * len(data), 4.4), squeeze=False)
    colors = dict(zip((p.id for p in report.points), _colors(len(report.points))))
    for ax, (key, xlabel, pts) in zip(axes[0], data):
        for p, x, y in pts:
            ax.errorbar([x.mean], [y.mean], yerr=[y.spread] if y.std else None, marker="o", capsize=3,
                        color=colors[p.id], linestyle="none", label=p.label())
        front = pareto_front([(x.mean, y.mean) for _, x, y in pts])
        fx, fy = [pts[i][1].mean for i in front], [pts[i][2].mean for i in front]
        ax.step(fx, fy, where="post", color="black", linewidth=1, alpha=0.7, label="Pareto frontier")
        _base_lines(ax, report.runs)
        xs = [x.mean for _, x, _ in pts]
        if max(xs) > 20 * min(xs):  # a log axis only where the costs span orders of magnitude
            ax.set_xscale("log")
        ax.set_xlabel(xlabel + (" (mean over seeds)" if report.seeded and key == keys.TRAIN_FLOPS else ""))
        ax.set_ylabel("held-out perplexity (tuned)")
        ax.set_title(f"Perplexity vs {xlabel}")
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    axes[0][-1].legend(handles, labels, fontsize=7, ncol=2 if len(labels) > 10 else 1)
    return _save(fig, path)


# --- report.html ---------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1400px;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 3px 7px; vertical-align: top; }
th { background: #f3f3f3; } tr:nth-child(even) td { background: #fafafa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.text { max-width: 28em; white-space: pre-wrap; } td.tokens { min-width: 22em; }
code { background: #f0f0f0; padding: 0 2px; white-space: pre; }
.within { color: #a15c00; font-weight: 600; } .best { color: #0a6b2d; font-weight: 600; }
.scroll { overflow-x: auto; max-width: 100%; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 0.8em; }
.plots img { width: 100%; border: 1px solid #eee; }
.plots img.wide { grid-column: 1 / -1; max-width: 1100px; }
.note { color: #555; font-size: 0.9em; max-width: 60em; }
"""

_SPAN = re.compile(r"``\s(.+?)\s``|`([^`]+)`|\*\*(.+?)\*\*")


def _cell_html(text: str) -> str:
    """A markdown table cell (code spans, bold, `\\|`, <br>) as HTML."""
    out, pos = [], 0
    for m in _SPAN.finditer(text):
        out.append(html.escape(text[pos:m.start()].replace("\\|", "|")))
        code = m.group(1) if m.group(1) is not None else m.group(2)
        if code is not None:
            out.append(f"<code>{html.escape(code.replace(chr(92) + '|', '|'))}</code>")
        else:
            cls = "within" if m.group(3) == "within spread" else "best"
            out.append(f'<span class="{cls}">{html.escape(m.group(3))}</span>')
        pos = m.end()
    out.append(html.escape(text[pos:].replace("\\|", "|")))
    return "".join(out)


_NUMERIC = re.compile(r"^[-+]?[\d.,]+(e[-+]?\d+)?( ± [\d.e+-]+)?[kMGTPE]?$|^[\d.e+-]+–[\d.e+-]+$")


def _html_table(header: list[str], rows: list[list[str]], raw: bool = False) -> str:
    """`raw`: the cells are plain text (generations), escaped as they are."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for cell in row:
            if raw:
                cells.append(f'<td class="text">{html.escape(cell)}</td>')
            else:
                # the nearest-token column: wide enough to stay on a few lines
                cls = ' class="num"' if _NUMERIC.match(cell) else ' class="tokens"' if cell.count("`") >= 8 else ""
                cells.append(f"<td{cls}>{_cell_html(cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    # wide tables (many swept keys and gen/ metrics) scroll inside the page instead of widening it
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def report_html(report: Report, plots: list[Path]) -> str:
    """The report as one HTML file with everything inline (plots as base64 PNG): it opens offline,
    attached to a mail or copied off a cluster, without the files beside it."""
    title = f"Sweep report: {len(report.runs)} runs" + (f", {len(report.points)} grid points" if report.seeded else "")
    parts = [f"<h1>{html.escape(title)}</h1>", f'<p class="note">{_cell_html(_intro(report))}</p>']
    if report.seeded:
        parts += ["<h2>Grid points, over seeds</h2>", f'<p class="note">{_cell_html(POINTS_NOTE)}</p>',
                  _html_table(*report.point_rows())]
        header, rows = report.comparison_rows()
        if rows:
            parts += ["<h2>Neighbouring grid points</h2>", f'<p class="note">{_cell_html(COMPARISONS_NOTE)}</p>',
                      _html_table(header, rows)]
    parts += ["<h2>Runs</h2>", _html_table(*report.rows())]
    if report.stopped:
        parts += ["<h2>Stopped early</h2>", f'<p class="note">{_cell_html(STOPPED_NOTE)}</p>',
                  _html_table(*report.stopped_rows())]
    if report.skipped:
        parts.append(f'<p class="note">Skipped (unfinished, no {RunDir.METRICS}): '
                     f'{", ".join(html.escape(str(p)) for p in report.skipped)}</p>')
    if plots:
        parts.append('<h2>Plots</h2><div class="plots">')
        for p in plots:
            data = base64.b64encode(p.read_bytes()).decode("ascii")
            wide = ' class="wide"' if p.name == PLOT_PARETO else ""  # two panels side by side
            parts.append(f'<img{wide} alt="{html.escape(p.stem)}" title="{html.escape(p.name)}" '
                         f'src="data:image/png;base64,{data}">')
        parts.append("</div>")
        if PLOT_PARETO in {p.name for p in plots}:
            parts.append(f'<p class="note">{_cell_html(PARETO_NOTE)}</p>')
    run = _best_run_with(report, lambda r: RunDir(r.path).generations.is_file())
    generations = _generations(run) if run else []
    if generations:
        has_ref = any("reference" in g for g in generations)
        header = ["prompt", *(["reference"] if has_ref else []), "base", "tuned"]
        parts += ["<h2>Generations, base vs tuned</h2>",
                  f'<p class="note">Run <code>{html.escape(run.name)}</code>, from its {RunDir.GENERATIONS}.</p>',
                  _html_table(header, [[str(g.get(k, "")) for k in header] for g in generations], raw=True)]
    for title, table in (("The learned prompt, read as tokens", prompt_tokens_table(report)),
                         ("Learned prompts across seeds", seed_prompts_table(report))):
        if table:
            note, header, rows = table
            parts += [f"<h2>{title}</h2>", f'<p class="note">{_cell_html(note)}</p>', _html_table(header, rows)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def _pyplot():
    matplotlib = import_extra("matplotlib", "report", "the report's plots need it")
    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    return plt


def _short(key: str) -> str:
    return {keys.CFG_NUM_VIRTUAL_TOKENS: "tokens", keys.CFG_EPOCHS: "epochs",
            keys.CFG_LEARNING_RATE: "lr", keys.CFG_INIT: "init"}.get(key, key)


def _natural_label(label: str) -> list:
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", label)]


def _ratio(m: dict[str, Any]) -> float | None:
    if keys.EVAL_PPL_RATIO in m:
        return m[keys.EVAL_PPL_RATIO]
    tuned, base = m.get(keys.EVAL_PERPLEXITY), m.get(keys.EVAL_BASE_PERPLEXITY)
    return tuned / base if tuned is not None and base else None


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}" if digits != 1 else f"{value:.1f}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value).replace("|", "\\|")


def _fmt_big(value: Any) -> str:
    """Counts such as FLOPs and parameters: 3 significant digits with an SI suffix (1.23G)."""
    v = _number(value)
    if v is None:
        return ""
    for factor, suffix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= factor:
            return f"{v / factor:.3g}{suffix}"
    return f"{v:.3g}"


def _number(value: Any) -> float | None:
    """A finite number, else None (missing keys, bools, strings, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _value_key(value: Any) -> tuple:
    """Axis values in their natural order: numbers by value, before anything else by text."""
    number = _number(value)
    return (0, number, "") if number is not None else (1, 0.0, json.dumps(value, default=str))


CLI_DOC = """Compare finished runs (a multirun/sweep dir or run dirs).

Writes into the first DIR: report.md (grid points over seeds with mean, std, min-max and n;
neighbouring points within the spread; one row per run: swept values, base and tuned held-out
perplexity, their ratio, gen/ metrics, runtime, tokens/s, FLOPs; the base-vs-tuned generations;
the learned prompt as tokens), a self-contained report.html (the same, plots inline) and the PNG
plots (ppl_vs_virtual_tokens, eval_curves, train_loss, pareto), and prints the run table.
Unfinished runs (not finished: no metrics file) are skipped and listed.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=CLI_DOC.splitlines()[0])
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="a multirun/sweep dir, or run dirs")
    args = parser.parse_args(argv)
    try:
        _pyplot()  # a missing extra fails before any run is read
        report = build_report(args.dirs)
        path = write_report(report, args.dirs[0])
    except UserError as exc:
        report_and_exit(str(exc))
    for skipped in report.skipped:
        print(f"skipped {skipped}: unfinished (no {RunDir.METRICS})")
    print(report.table())
    print(f"wrote {path}, {path.with_name(REPORT_HTML)} and the plots")
    return 0
