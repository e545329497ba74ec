"""The W&B report a reviewer needs for a sweep, as code.

`build_spec()` describes the report in plain dataclasses: which panels, over which keys, and from
which part of a run each key comes (history, summary, config, table). Every key comes from
`softprompt.core.keys`, which training also uses, so a renamed metric breaks the tests, not the report.
`to_report()` turns the spec into `wandb_workspaces` objects (no network) and `publish()` saves it
(network; creates the report or updates the one with the same title). `--dry-run` writes the spec
as JSON or markdown and never touches the W&B service.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from softprompt.core import keys
from softprompt.core.errors import UserError, import_extra, report_and_exit
from softprompt.core.rundir import RunDir
from softprompt.track.records import config_value

Source = Literal["history", "summary", "config", "table"]

DEFAULT_QUESTION = (
    "How does held-out perplexity of the prompt-tuned model depend on the soft-prompt length "
    f"(`{keys.CFG_NUM_VIRTUAL_TOKENS}`) and the number of epochs (`{keys.CFG_EPOCHS}`), "
    "compared with the base model?"
)
TO_BE_FILLED = "to be filled (run without --dry-run, or pass --runs DIR... to read finished run dirs)"


@dataclass(frozen=True)
class Ref:
    """One key of a run, and where in the run it lives."""

    source: Source
    key: str


def history(key: str) -> Ref:
    return Ref("history", key)


def summary(key: str) -> Ref:
    return Ref("summary", key)


def config(key: str) -> Ref:
    return Ref("config", key)


@dataclass(frozen=True)
class Panel:
    kind: Literal["parallel_coordinates", "scatter", "bar", "line", "table"]
    title: str
    description: str
    x: Ref | None = None
    y: tuple[Ref, ...] = ()
    groupby: Ref | None = None

    def refs(self) -> list[Ref]:
        return [r for r in (self.x, *self.y, self.groupby) if r is not None]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["keys"] = {s: sorted({r.key for r in self.refs() if r.source == s})
                       for s in ("history", "summary", "config", "table")}
        return out


@dataclass(frozen=True)
class Section:
    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class RunFilter:
    """Which runs the report shows: one W&B sweep, one W&B group, or the whole project."""

    kind: Literal["sweep", "group", "project"]
    value: str | None = None

    @property
    def label(self) -> str:
        return {"sweep": f"sweep {self.value}", "group": f"group {self.value}", "project": "all runs"}[self.kind]


@dataclass
class DashboardSpec:
    entity: str
    project: str
    title: str
    runs: RunFilter
    question: str
    best_run: str
    sections: list[Section] = field(default_factory=list)

    def panels(self) -> list[Panel]:
        return [p for s in self.sections for p in s.panels]

    def refs(self) -> list[Ref]:
        return [r for p in self.panels() for r in p.refs()]

    def text(self) -> str:
        return f"**Question.** {self.question}\n\n**Runs.** {self.runs.label}\n\n**Best run.** {self.best_run}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "entity": self.entity, "project": self.project, "title": self.title,
            "runs": asdict(self.runs), "text": self.text(),
            "sections": [{"title": s.title, "panels": [p.to_dict() for p in s.panels]} for s in self.sections],
        }

    def to_markdown(self) -> str:
        lines = [f"# {self.title}", "", f"W&B: `{self.entity}/{self.project}`, {self.runs.label}", "", self.text(), ""]
        for s in self.sections:
            lines += [f"## {s.title}", ""]
            for p in s.panels:
                used = ", ".join(f"{r.source} `{r.key}`" for r in p.refs())
                lines.append(f"- **{p.title}** ({p.kind}): {p.description} Keys: {used}.")
            lines.append("")
        return "\n".join(lines)


# --- the panels ---------------------------------------------------------------------------------


def build_sections() -> list[Section]:
    ppl, base_ppl = summary(keys.EVAL_PERPLEXITY), summary(keys.EVAL_BASE_PERPLEXITY)
    vt, epochs = config(keys.CFG_NUM_VIRTUAL_TOKENS), config(keys.CFG_EPOCHS)
    overview = Section("Hyperparameters -> held-out perplexity", (
        Panel("parallel_coordinates", "Hyperparameters -> tuned perplexity",
              "One line per run through soft-prompt length, epochs, learning rate and init, "
              "ending at the tuned held-out perplexity.",
              y=(vt, epochs, config(keys.CFG_LEARNING_RATE), config(keys.CFG_INIT), ppl)),
    ))
    length = Section("Perplexity vs soft-prompt length, by epochs", (
        Panel("scatter", "Tuned perplexity vs num_virtual_tokens",
              "One point per run (run names read vt<N>-ep<E>); lower is better.", x=vt, y=(ppl,)),
        Panel("scatter", "Tuned / base perplexity vs num_virtual_tokens",
              "The base model as reference: below 1 the soft prompt helped.", x=vt,
              y=(summary(keys.EVAL_PPL_RATIO),)),
        Panel("bar", "Tuned and base perplexity, grouped by epochs",
              "Mean (and min-max) over runs with the same epoch count; the base bar is the reference.",
              y=(ppl, base_ppl), groupby=epochs),
    ))
    curves = Section("Training curves", (
        Panel("line", "Held-out perplexity per epoch",
              "Tuned perplexity after every epoch, with the (constant) base perplexity beside it.",
              x=history(keys.EPOCH), y=(history(keys.EVAL_PERPLEXITY), history(keys.EVAL_BASE_PERPLEXITY))),
        Panel("line", "Train loss", "Training loss per logging step.",
              x=history(keys.TRAIN_STEP), y=(history(keys.TRAIN_LOSS),)),
    ))
    generations = Section("Generations: base vs tuned", (
        Panel("table", "Generation tables",
              "Per run: prompt, reference (held-out examples), base and tuned generations.",
              y=(Ref("table", keys.GENERATIONS_TABLE),)),
    ))
    return [overview, length, curves, generations]


def build_spec(entity: str, project: str, runs: RunFilter, title: str | None = None,
               question: str | None = None, best_run: str | None = None) -> DashboardSpec:
    return DashboardSpec(entity=entity, project=project, title=title or f"softprompt: {runs.label}",
                         runs=runs, question=question or DEFAULT_QUESTION, best_run=best_run or TO_BE_FILLED,
                         sections=build_sections())


# --- best run -----------------------------------------------------------------------------------


def describe_best(name: str, summary_values: dict[str, Any], config_values: dict[str, Any]) -> str:
    def cfg(key: str) -> Any:
        try:
            return config_value(config_values, key)
        except KeyError:
            return "?"

    ppl, base = summary_values[keys.EVAL_PERPLEXITY], summary_values.get(keys.EVAL_BASE_PERPLEXITY)
    text = (f"`{name}`: {keys.EVAL_PERPLEXITY} {ppl:.3f}"
            + (f" (base {base:.3f}, ratio {ppl / base:.3f})" if isinstance(base, (int, float)) else "")
            + f" with {keys.CFG_NUM_VIRTUAL_TOKENS}={cfg(keys.CFG_NUM_VIRTUAL_TOKENS)}, "
              f"{keys.CFG_EPOCHS}={cfg(keys.CFG_EPOCHS)}, {keys.CFG_LEARNING_RATE}={cfg(keys.CFG_LEARNING_RATE)}, "
              f"{keys.CFG_INIT}={cfg(keys.CFG_INIT)}")
    return text


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def best_run_from_dirs(dirs: list[Path]) -> str:
    """The finished run (a dir with metrics.json, searched below each DIR) with the lowest perplexity."""
    found = []
    for d in dirs:
        if not d.exists():
            raise UserError(f"--runs {d}: no such directory")
        for metrics_file in sorted(d.rglob(RunDir.METRICS)):
            run = RunDir(metrics_file.parent)
            metrics, cfg = run.read_metrics(), run.read_config() or {}
            if _finite(metrics.get(keys.EVAL_PERPLEXITY)):
                found.append((metrics[keys.EVAL_PERPLEXITY], str(run.path), metrics, cfg))
    if not found:
        raise UserError(f"--runs {' '.join(map(str, dirs))}: no finished run ({RunDir.METRICS}) found there")
    _, name, metrics, cfg = min(found, key=lambda f: f[0])
    return describe_best(name, metrics, cfg) + f" (best of {len(found)} finished runs)"


def best_run_online(api, spec: DashboardSpec) -> str:
    runs = list(api.runs(f"{spec.entity}/{spec.project}", filters=_mongo_filter(spec.runs)))
    scored = [r for r in runs if _finite(r.summary.get(keys.EVAL_PERPLEXITY))]
    if not scored:
        return f"no finished run with {keys.EVAL_PERPLEXITY} yet ({len(runs)} runs in {spec.runs.label})"
    best = min(scored, key=lambda r: r.summary[keys.EVAL_PERPLEXITY])
    return (describe_best(best.name, dict(best.summary), best.config)
            + f" (best of {len(scored)} runs; {best.url})")


def _mongo_filter(runs: RunFilter) -> dict[str, Any]:
    return {"sweep": runs.value} if runs.kind == "sweep" else {"group": runs.value} if runs.kind == "group" else {}


# --- wandb-workspaces objects -------------------------------------------------------------------


def _wr_metric(wr, ref: Ref):
    # history keys are plain strings in wandb-workspaces; summary/config need their wrappers
    return {"history": lambda k: k, "summary": wr.SummaryMetric, "config": wr.Config}[ref.source](ref.key)


def _wr_panel(wr, panel: Panel, width: int):
    layout = wr.Layout(w=width, h=8)
    if panel.kind == "parallel_coordinates":
        return wr.ParallelCoordinatesPlot(title=panel.title, layout=layout, columns=[
            wr.ParallelCoordinatesPlotColumn(metric=_wr_metric(wr, r)) for r in panel.y])
    if panel.kind == "scatter":
        return wr.ScatterPlot(title=panel.title, layout=layout, x=_wr_metric(wr, panel.x),
                              y=_wr_metric(wr, panel.y[0]))
    if panel.kind == "bar":
        return wr.BarPlot(title=panel.title, layout=layout, orientation="v",
                          # bar charts show each run's summary value of a metric under its plain name
                          metrics=[r.key for r in panel.y], groupby=_wr_metric(wr, panel.groupby),
                          groupby_aggfunc="mean", groupby_rangefunc="minmax")
    if panel.kind == "line":
        return wr.LinePlot(title=panel.title, layout=layout, x=_wr_metric(wr, panel.x),
                           y=[_wr_metric(wr, r) for r in panel.y])
    if panel.kind == "table":
        return wr.WeavePanelSummaryTable(table_name=panel.y[0].key, layout=wr.Layout(w=24, h=12))
    raise ValueError(f"unknown panel kind {panel.kind!r}")


def _wr_runset(wr, spec: DashboardSpec):
    from wandb_workspaces import expr

    # W&B's run attributes "Sweep" and "Group" (its names, not ours)
    filters = {"sweep": expr.And(expr.Metric("Sweep") == spec.runs.value),
               "group": expr.And(expr.Metric("Group") == spec.runs.value), "project": ""}[spec.runs.kind]
    return wr.Runset(entity=spec.entity, project=spec.project, name=spec.runs.label, filters=filters)


def to_report(spec: DashboardSpec):
    """The spec as a `wandb_workspaces` Report; building it needs no network (saving does)."""
    wr = import_extra("wandb_workspaces.reports.v2", "dashboard", "publishing a dashboard needs it")

    blocks = [wr.MarkdownBlock(text=spec.text())]
    for section in spec.sections:
        width = 24 if len(section.panels) == 1 else 24 // len(section.panels)
        blocks += [wr.H2(text=section.title),
                   wr.PanelGrid(runsets=[_wr_runset(wr, spec)],
                                panels=[_wr_panel(wr, p, width) for p in section.panels])]
    return wr.Report(entity=spec.entity, project=spec.project, title=spec.title,
                     description=f"softprompt dashboard for {spec.runs.label} (made by scripts/dashboard.py)",
                     blocks=blocks, width="fluid")


# --- online -------------------------------------------------------------------------------------


def publish(spec: DashboardSpec, question_given: bool) -> str:
    """Create the report, or update the one in the project with the same title; returns its URL."""
    from softprompt.track.wandb_run import _base_url, has_login, service_reachable

    if not has_login():
        raise UserError("no W&B login found; run `wandb login` or set WANDB_API_KEY (or use --dry-run)")
    if not service_reachable():
        raise UserError(f"the W&B service at {_base_url()} is unreachable; try again later (or use --dry-run)")
    import wandb

    try:
        api = wandb.Api(timeout=30)
        if spec.runs.kind == "sweep":
            sweep = api.sweep(f"{spec.entity}/{spec.project}/{spec.runs.value}")
            if not question_given and (sweep.config or {}).get("description"):
                spec.question = sweep.config["description"]
        spec.best_run = best_run_online(api, spec)
        report = to_report(spec)
        existing = [r for r in api.reports(f"{spec.entity}/{spec.project}") if r.display_name == spec.title]
        if existing:
            report.id = existing[0].id  # upsert by id: the same report, new blocks
        report.save()
        return report.url
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the W&B clients raise many types for "not found"/"no access"
        first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise UserError(f"W&B refused the dashboard for {spec.entity}/{spec.project} ({spec.runs.label}): "
                        f"{first}; check --entity/--project/--sweep and your access") from exc


# --- command line -------------------------------------------------------------------------------


def _parser():
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one `error:` line and exit 2, like every softprompt command
            from softprompt.core.errors import report_and_exit

            report_and_exit(f"{message} (see `python scripts/dashboard.py --help`)")

    p = Parser(prog="scripts/dashboard.py",
               description="Create or update the W&B report for a softprompt sweep (or write its spec with --dry-run).")
    p.add_argument("--entity", required=True, help="W&B entity (user or team)")
    p.add_argument("--project", required=True, help="W&B project")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--sweep", help="W&B sweep id (what `wandb sweep` printed): show only its runs")
    which.add_argument("--group", help="W&B run group (wandb.group): show only its runs")
    p.add_argument("--title", help="report title; a report with the same title in the project is updated")
    p.add_argument("--question", help="the question the sweep answers (default: the sweep's description, "
                                      "else a stock question about length and epochs)")
    p.add_argument("--dry-run", action="store_true", help="write the report spec; no W&B service needed")
    p.add_argument("--out", type=Path, help="with --dry-run: write to FILE (.md: markdown, else JSON); default stdout")
    p.add_argument("--runs", type=Path, nargs="+", metavar="DIR",
                   help="with --dry-run: finished run dirs (or multirun dirs) to name the best run from")
    return p


def main(argv: list[str] | None = None) -> int:
    """`python scripts/dashboard.py ...` / the console script softprompt-dashboard."""
    try:
        return _main(argv)
    except UserError as exc:
        report_and_exit(str(exc))


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    if not args.dry_run and (args.out or args.runs):
        raise UserError("--out and --runs only go with --dry-run (online, the best run comes from W&B)")
    runs = (RunFilter("sweep", args.sweep) if args.sweep else RunFilter("group", args.group) if args.group
            else RunFilter("project"))
    spec = build_spec(args.entity, args.project, runs, title=args.title, question=args.question)
    if not args.dry_run:
        print(f"dashboard: {publish(spec, question_given=args.question is not None)}", flush=True)
        return 0
    if args.runs:
        spec.best_run = best_run_from_dirs(args.runs)
    text = spec.to_markdown() if args.out and args.out.suffix == ".md" else json.dumps(spec.to_dict(), indent=2) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
        print(f"dashboard: wrote {args.out} ({len(spec.panels())} panels)", flush=True)
    else:
        print(text, end="", flush=True)
    return 0
