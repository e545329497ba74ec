"""`python scripts/generate.py ADAPTER_DIR "prompt" ...`: base and tuned continuations, side by side.

Prompts come from the arguments, `--file FILE` (one per line) and `-` (stdin, one per line).
Greedy by default with the run's own eval settings (max_new_tokens, repetition_penalty);
`--temperature` or `--top-p` switch to sampling, seeded by `--seed`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import textwrap
import warnings

from softprompt.errors import UserError, report_and_exit


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/generate.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("adapter", help="a run directory or its adapter/ folder")
    p.add_argument("prompts", nargs="*", help="prompts; '-' reads one prompt per line from stdin")
    p.add_argument("--file", action="append", default=[], help="a file with one prompt per line ('-': stdin)")
    p.add_argument("--base", help="base model (Hub id or directory) instead of the one recorded with the adapter")
    p.add_argument("--max-new-tokens", type=int, help="default: the run's eval.max_new_tokens, else 100")
    p.add_argument("--repetition-penalty", type=float, help="default: the run's eval.repetition_penalty, else 1.5")
    p.add_argument("--temperature", type=float, help="sample at this temperature (default: greedy)")
    p.add_argument("--top-p", type=float, help="nucleus sampling (implies sampling; temperature 1 if not given)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true", help="one JSON object per prompt: prompt, base, tuned")
    return p


def read_prompts(args: argparse.Namespace, stdin=None) -> list[str]:
    stdin = stdin or sys.stdin
    prompts: list[str] = []

    def lines(text: str) -> list[str]:
        return [line.strip() for line in text.splitlines() if line.strip()]

    for item in args.prompts:
        prompts.extend(lines(stdin.read()) if item == "-" else [item])
    for name in args.file:
        if name == "-":
            prompts.extend(lines(stdin.read()))
            continue
        try:
            with open(name, encoding="utf-8") as f:
                prompts.extend(lines(f.read()))
        except OSError as exc:
            raise UserError(f"cannot read prompt file {name}: {exc.strerror}") from exc
    if not prompts:
        raise UserError('no prompts given; pass them as arguments, with --file FILE, or "-" to read stdin')
    return prompts


def settings_from(args: argparse.Namespace, info):
    from softprompt.generation import GenerationSettings

    sample = args.temperature is not None or args.top_p is not None
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens if args.max_new_tokens is not None
        else int(info.eval_setting("max_new_tokens", 100)),
        repetition_penalty=args.repetition_penalty if args.repetition_penalty is not None
        else float(info.eval_setting("repetition_penalty", 1.5)),
        do_sample=sample and (args.temperature is None or args.temperature > 0),
        temperature=1.0 if args.temperature is None else args.temperature,
        top_p=1.0 if args.top_p is None else args.top_p,
        seed=args.seed,
    )
    validate_settings(settings)
    return settings


def validate_settings(s) -> None:
    if s.max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {s.max_new_tokens}")
    if s.repetition_penalty <= 0:
        raise UserError(f"repetition_penalty must be > 0 (1.0 = none), got {s.repetition_penalty}")
    if s.temperature < 0:
        raise UserError(f"temperature must be >= 0 (0 = greedy), got {s.temperature}")
    if not 0 < s.top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], got {s.top_p}")


def side_by_side(rows: list[dict[str, str]], width: int) -> str:
    """Each prompt, then its base and tuned continuations in two wrapped columns."""
    col = max(20, (width - 3) // 2)
    out: list[str] = []
    for n, row in enumerate(rows, 1):
        out.append(f"[{n}/{len(rows)}] {row['prompt']}")
        left = _wrap(row["base"], col)
        right = _wrap(row["tuned"], col)
        out.append(f"{' base '.center(col, '-')} | {' tuned '.center(col, '-')}")
        for i in range(max(len(left), len(right))):
            a = left[i] if i < len(left) else ""
            b = right[i] if i < len(right) else ""
            out.append(f"{a.ljust(col)} | {b}".rstrip())
        out.append("")
    return "\n".join(out)


def _wrap(text: str, width: int) -> list[str]:
    lines: list[str] = []
    for para in (text or "(empty)").splitlines() or [""]:
        lines.extend(textwrap.wrap(para, width) or [""])
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # PEFT calls a transformers method that warns about its own deprecation on every load
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    try:
        from softprompt.adapters import resolve

        info = resolve(args.adapter)  # before any model loads: a wrong path fails in a second
        prompts = read_prompts(args)
        settings = settings_from(args, info)
        if args.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
        from softprompt.inference import load

        loaded = load(info, base=args.base, batch_size=args.batch_size)
        rows = loaded.compare(prompts, settings)
    except UserError as exc:
        report_and_exit(str(exc))
    if args.json:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
    else:
        print(f"adapter {info.adapter_dir} ({info.peft_type}) on base {loaded.base_model}")
        mode = (f"sampling, temperature {settings.temperature}, top_p {settings.top_p}, seed {settings.seed}"
                if settings.do_sample else "greedy")
        print(f"{mode}, max_new_tokens {settings.max_new_tokens}, repetition_penalty {settings.repetition_penalty}\n")
        print(side_by_side(rows, shutil.get_terminal_size((120, 24)).columns))
    return 0
