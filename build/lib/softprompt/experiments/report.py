"""Compare finished runs: one table row per run (the values that differ between runs, base and
tuned perplexity, generation metrics, speed) and two plots, written as report.md + PNGs.

A run directory is finished when it holds metrics.json (run.py writes it last); others are
listed as skipped. The swept values are read from each run's config.json, so the report works
for Hydra multiruns, `scripts/sweep.py` sweeps and hand-picked run dirs alike.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from softprompt.core import keys
from softprompt.core.errors import UserError, report_and_exit
from softprompt.core.rundir import RunDir

# config keys that differ between runs without being a setting worth a column
# (provenance: the code commit and package versions that run.py records beside the config)
IGNORED_PREFIXES = ("data.", "wandb.", "output_dir", "eval.prompts", "provenance.")
GEN_PREFIX = "gen/"
PLOT_TOKENS = "ppl_vs_virtual_tokens.png"
PLOT_CURVES = "eval_curves.png"


@dataclass
class RunRecord:
    name: str  # the run dir, relative to the report's first DIR where possible
    path: Path
    metrics: dict[str, Any]
    config: dict[str, Any]  # flattened, dotted keys
    history: list[dict[str, Any]] = field(default_factory=list)
    # prompt_tokens.jsonl rows (one per virtual token), None when the run has none (LoRA, ...)
    prompt_tokens: list[dict[str, Any]] | None = None


@dataclass
class Report:
    runs: list[RunRecord]
    skipped: list[Path]
    swept: list[str]  # config keys whose values differ between runs
    gen_keys: list[str]
    best: int | None  # index of the run with the lowest tuned perplexity

    @property
    def has_prompt_tokens(self) -> bool:
        return any(r.prompt_tokens for r in self.runs)

    def rows(self) -> tuple[list[str], list[list[str]]]:
        header = ["run", *self.swept, "base ppl", "tuned ppl", "tuned/base", *self.gen_keys,
                  "train s", "eval s", "tokens/s"]
        header += ["prompt, nearest tokens", "cos to init"] if self.has_prompt_tokens else []
        header += ["best"]
        rows = []
        for i, r in enumerate(self.runs):
            m = r.metrics
            row = [r.name, *(_fmt(r.config.get(k)) for k in self.swept),
                   _fmt(m.get(keys.EVAL_BASE_PERPLEXITY)), _fmt(m.get(keys.EVAL_PERPLEXITY)),
                   _fmt(_ratio(m)), *(_fmt(m.get(k)) for k in self.gen_keys),
                   _fmt(m.get(keys.TRAIN_RUNTIME_S), 1), _fmt(m.get(keys.EVAL_RUNTIME_S), 1),
                   _fmt(m.get(keys.TRAIN_TOKENS_PER_SECOND), 1)]
            if self.has_prompt_tokens:
                row += [nearest_summary(r.prompt_tokens), _fmt(mean_cosine_to_init(r.prompt_tokens), 3)]
            rows.append(row + ["**best**" if i == self.best else ""])
        return header, rows

    def table(self) -> str:
        header, rows = self.rows()
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)


def find_run_dirs(dirs: list[str | Path]) -> list[Path]:
    """Run dirs in DIRS: each DIR itself if it is one, else the run dirs below it (a multirun)."""
    found: list[Path] = []
    for d in map(Path, dirs):
        if not d.is_dir():
            raise UserError(f"{d} is not a directory; give run dirs or a multirun/sweep dir")
        if RunDir.is_run_dir(d):
            found.append(d)
            continue
        below = sorted((p for p in d.rglob("*") if p.is_dir() and RunDir.is_run_dir(p) and not _inside_run(p, d)),
                       key=_natural_key)
        found.extend(below)
    return list(dict.fromkeys(p.resolve() for p in found))


def _inside_run(path: Path, top: Path) -> bool:
    return any(RunDir.is_run_dir(parent) for parent in path.parents if parent != top and top in parent.parents)


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
        name = str(path.relative_to(top)) if top in path.parents else path.name
        runs.append(RunRecord(name=name, path=path, metrics=run.read_metrics(), config=_read_config(run),
                              history=run.read_history(), prompt_tokens=run.read_prompt_tokens()))
    return runs, skipped


def _read_config(run: RunDir) -> dict[str, Any]:
    config = run.read_config()
    if config is not None:
        return flatten(config)
    if run.hydra_config.is_file():  # a run that stopped before writing its own config
        import yaml

        return flatten(yaml.safe_load(run.hydra_config.read_text()) or {})
    return {}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def swept_keys(runs: list[RunRecord]) -> list[str]:
    """Config keys whose values differ between runs, the seed's two axes first."""
    all_keys = sorted({k for r in runs for k in r.config})
    differ = [k for k in all_keys if not k.startswith(IGNORED_PREFIXES)
              and len({json.dumps(r.config.get(k), sort_keys=True) for r in runs}) > 1]
    first = [k for k in (keys.CFG_NUM_VIRTUAL_TOKENS, keys.CFG_EPOCHS) if k in differ]
    return first + [k for k in differ if k not in first]


def build_report(dirs: list[str | Path]) -> Report:
    runs, skipped = load_runs(dirs)
    if not runs:
        raise UserError(f"no finished runs (with {RunDir.METRICS}) in {', '.join(map(str, dirs))}"
                        + (f"; {len(skipped)} unfinished" if skipped else ""))
    gen_keys = sorted({k for r in runs for k in r.metrics if k.startswith(GEN_PREFIX)
                       and isinstance(r.metrics[k], (int, float)) and not isinstance(r.metrics[k], bool)})
    scored = [(r.metrics.get(keys.EVAL_PERPLEXITY), i) for i, r in enumerate(runs)]
    scored = [(v, i) for v, i in scored if isinstance(v, (int, float)) and math.isfinite(v)]
    best = min(scored)[1] if scored else None
    return Report(runs=runs, skipped=skipped, swept=swept_keys(runs), gen_keys=gen_keys, best=best)


def write_report(report: Report, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    plots = [p for p in (plot_ppl_vs_tokens(report, out / PLOT_TOKENS), plot_curves(report, out / PLOT_CURVES)) if p]
    lines = [f"# Sweep report: {len(report.runs)} runs", ""]
    lines.append(f"Held-out perplexity of the base model and of the prompt-tuned model; tuned/base < 1 means the "
                 f"soft prompt helped. Best run (lowest tuned perplexity): "
                 f"`{report.runs[report.best].name}`." if report.best is not None else "No run has a finite perplexity.")
    lines += ["", report.table(), ""]
    if report.skipped:
        lines += [f"Skipped (unfinished, no {RunDir.METRICS}): {', '.join(f'`{p}`' for p in report.skipped)}", ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    lines += ["", *prompt_tokens_section(report)]
    (out / "report.md").write_text("\n".join(lines).rstrip() + "\n")
    return out / "report.md"


def prompt_tokens_section(report: Report) -> list[str]:
    """The learned prompt of the best run (else the first that has one), read as tokens: per
    virtual token its nearest vocabulary tokens (cosine) and how far it moved from its init."""
    with_tokens = [i for i, r in enumerate(report.runs) if r.prompt_tokens]
    if not with_tokens:
        return []
    i = report.best if report.best in with_tokens else with_tokens[0]
    run = report.runs[i]
    which = "best run" if i == report.best else "first run with a soft prompt"
    lines = ["## The learned prompt, read as tokens", "",
             f"Run `{run.name}` ({which}), from its `{RunDir.PROMPT_TOKENS}`: each virtual token's nearest "
             "vocabulary tokens by cosine similarity in the input-embedding space, and its cosine "
             "similarity and L2 distance to its initial value (Lester et al. 2021). The table's "
             "`prompt, nearest tokens` column gives every run's nearest token per position.", "",
             "| position | nearest tokens (cosine) | cosine to init | L2 to init | L2 norm |",
             "| ---: | --- | ---: | ---: | ---: |"]
    for row in run.prompt_tokens:
        neighbours = ", ".join(f"{_neighbour_markdown(n)} {n['cosine']:.2f}" for n in row["neighbours"])
        lines.append(f"| {row['position']} | {neighbours} | {_fmt(row.get('cosine_to_init'), 3)} | "
                     f"{_fmt(row.get('l2_to_init'), 3)} | {_fmt(row.get('l2_norm'), 3)} |")
    return lines + [""]


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


def _series_label(report: Report, config: dict[str, Any], exclude: str) -> str:
    parts = [f"{_short(k)}={_fmt(config.get(k))}" for k in report.swept if k != exclude]
    return ", ".join(parts) or "runs"


def plot_ppl_vs_tokens(report: Report, path: Path) -> Path | None:
    """Tuned perplexity against prompt length, one line per epoch count (and other swept values)."""
    plt = _pyplot()
    points = [r for r in report.runs if isinstance(r.metrics.get(keys.EVAL_PERPLEXITY), (int, float))]
    if not points:
        return None
    series: dict[str, list[tuple[int, float]]] = {}
    for r in points:
        label = _series_label(report, r.config, keys.CFG_NUM_VIRTUAL_TOKENS)
        tokens = r.metrics.get(keys.PEFT_NUM_VIRTUAL_TOKENS, r.config.get(keys.CFG_NUM_VIRTUAL_TOKENS))
        series.setdefault(label, []).append((tokens, r.metrics[keys.EVAL_PERPLEXITY]))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, pts in sorted(series.items(), key=lambda kv: _natural_label(kv[0])):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    for i, base in enumerate(sorted({round(r.metrics[keys.EVAL_BASE_PERPLEXITY], 6) for r in points
                                     if keys.EVAL_BASE_PERPLEXITY in r.metrics})):
        ax.axhline(base, color="gray", linestyle="--", linewidth=1, label="base model" if i == 0 else None)
    ax.set_xscale("log", base=2)
    ticks = sorted({p[0] for pts in series.values() for p in pts})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("num_virtual_tokens")
    ax.set_ylabel("held-out perplexity (tuned)")
    ax.set_title("Tuned perplexity vs soft-prompt length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curves(report: Report, path: Path) -> Path | None:
    """Held-out perplexity after each epoch, one line per run (from history.jsonl)."""
    plt = _pyplot()
    runs = [r for r in report.runs if any(keys.EVAL_PERPLEXITY in h for h in r.history)]
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    base_values = set()
    for r in runs:
        rows = [h for h in r.history if keys.EVAL_PERPLEXITY in h]
        base = r.metrics.get(keys.EVAL_BASE_PERPLEXITY)
        # no point at epoch 0: the untrained soft prompt is not the base model (it already changes
        # the perplexity), so the base model is the dashed reference line instead
        xs = [h.get(keys.EPOCH, i + 1) for i, h in enumerate(rows)]
        ys = [h[keys.EVAL_PERPLEXITY] for h in rows]
        ax.plot(xs, ys, marker=".", label=_series_label(report, r.config, "") if report.swept else r.name)
        if base:
            base_values.add(round(base, 6))
    for i, base in enumerate(sorted(base_values)):
        ax.axhline(base, color="gray", linestyle="--", linewidth=1, label="base model" if i == 0 else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("Held-out perplexity per epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(runs) > 8 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _pyplot():
    import matplotlib

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

# --- command line: python scripts/report.py DIR... (console script softprompt-report) -------------

CLI_DOC = """Compare finished runs (a multirun/sweep dir or run dirs).

Writes DIR/report.md (one row per run: the swept values, base and tuned held-out perplexity, their
ratio, gen/ metrics, runtime, tokens/s; best run marked) and PNG plots into the first DIR, and
prints the table. Unfinished runs are skipped and listed.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=CLI_DOC.splitlines()[0])
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="a multirun/sweep dir, or run dirs")
    args = parser.parse_args(argv)
    try:
        report = build_report(args.dirs)
        path = write_report(report, args.dirs[0])
    except UserError as exc:
        report_and_exit(str(exc))
    for skipped in report.skipped:
        print(f"skipped {skipped}: unfinished (no {RunDir.METRICS})")
    print(report.table())
    print(f"wrote {path} and its plots")
    return 0

