"""`python scripts/generate.py ADAPTER_DIR "prompt" ...`: base and tuned continuations, side by side.

Several adapters: `--adapter DIR` (or `--adapter NAME=DIR`) once per adapter; then every
positional argument is a prompt. Adapters that share a base model are loaded onto it once and
switched per prompt batch; the output has the base column plus one column per adapter (named after
its run directory unless NAME= is given). With `--json`, `tuned` is then an object {name: text}
(a string, as before, when there is one adapter).

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
from pathlib import Path
from typing import TYPE_CHECKING

from softprompt.core.errors import UserError, report_and_exit
from softprompt.core.quiet import quiet_third_party

if TYPE_CHECKING:
    from softprompt.serve.adapters import AdapterInfo


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/generate.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("prompts", nargs="*", metavar="[ADAPTER_DIR] PROMPT",
                   help="without --adapter: a run directory or its adapter/ folder, then the prompts; "
                        "'-' reads one prompt per line from stdin")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                   help="an adapter (run directory or adapter/ folder); repeat to compare several on one base")
    p.add_argument("--file", action="append", default=[], help="a file with one prompt per line ('-': stdin)")
    p.add_argument("--base", help="base model (Hub id or directory) instead of the one recorded with the adapter")
    p.add_argument("--max-new-tokens", type=int, help="default: the run's eval.max_new_tokens, else 100")
    p.add_argument("--repetition-penalty", type=float, help="default: the run's eval.repetition_penalty, else 1.5")
    p.add_argument("--temperature", type=float, help="sample at this temperature (default: greedy)")
    p.add_argument("--top-p", type=float, help="nucleus sampling (implies sampling; temperature 1 if not given)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                   help="where the model generates (auto: the GPU where there is one)")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt: prompt, base, tuned (with several adapters: {name: text})")
    return p


def adapter_args(args: argparse.Namespace) -> list[tuple[str | None, str]]:
    """[(name or None, dir)]: from --adapter, else the first positional (which then is no prompt)."""
    if not args.adapter:
        if not args.prompts:
            raise UserError("no adapter given; usage: scripts/generate.py ADAPTER_DIR PROMPT... "
                            "or --adapter DIR [--adapter DIR2 ...] PROMPT...")
        return [(None, args.prompts.pop(0))]
    out: list[tuple[str | None, str]] = []
    for item in args.adapter:
        name, sep, path = item.partition("=")
        # a directory may contain "=", so NAME= counts only when NAME is a plain word
        if sep and name and "/" not in name and not Path(item).exists():
            out.append((name, path))
        else:
            out.append((None, item))
    return out


def resolve_adapters(pairs: list[tuple[str | None, str]]) -> dict[str, "AdapterInfo"]:
    """{name: AdapterInfo}; unnamed adapters are named after their run directory, made unique."""
    from softprompt.serve.adapters import resolve
    from softprompt.serve.multi_adapter import default_name

    named: dict[str, AdapterInfo] = {}
    for name, path in pairs:
        info = resolve(path)  # before any model loads: a wrong path fails in a second
        if name is not None and name in named:
            raise UserError(f"two adapters are named {name!r}; give each --adapter NAME=DIR a different NAME")
        stem = name or default_name(info.adapter_dir)
        unique, n = stem, 2
        while unique in named:
            unique, n = f"{stem}-{n}", n + 1
        named[unique] = info
    return named


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
    from softprompt.models.generation import GenerationSettings

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


def side_by_side(rows: list[dict], width: int) -> str:
    """Each prompt, then its base and tuned continuations in wrapped columns: one tuned column
    (`tuned` a string) or one per adapter (`tuned` a {name: text} dict)."""
    out: list[str] = []
    for n, row in enumerate(rows, 1):
        tuned = row["tuned"] if isinstance(row["tuned"], dict) else {"tuned": row["tuned"]}
        columns = [("base", row["base"]), *tuned.items()]
        col = max(20, (width - 3 * (len(columns) - 1)) // len(columns))
        out.append(f"[{n}/{len(rows)}] {row['prompt']}")
        wrapped = [_wrap(text, col) for _, text in columns]
        out.append(" | ".join(f" {label} ".center(col, "-") for label, _ in columns))
        for i in range(max(map(len, wrapped))):
            cells = [lines[i] if i < len(lines) else "" for lines in wrapped]
            out.append(" | ".join(cell.ljust(col) for cell in cells).rstrip())
        out.append("")
    return "\n".join(out)


def _wrap(text: str, width: int) -> list[str]:
    lines: list[str] = []
    for para in (text or "(empty)").splitlines() or [""]:
        lines.extend(textwrap.wrap(para, width) or [""])
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    quiet_third_party()  # before PEFT is imported: with bitsandbytes installed, its import talks
    # PEFT calls a transformers method that warns about its own deprecation on every load
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    try:
        adapters = resolve_adapters(adapter_args(args))
        info = next(iter(adapters.values()))
        prompts = read_prompts(args)
        settings = settings_from(args, info)
        if args.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
        from softprompt.serve.inference import load, load_shared

        if len(adapters) == 1:
            loaded = load(info, base=args.base, batch_size=args.batch_size, device=args.device)
            rows = loaded.compare(prompts, settings)
        else:
            shared = load_shared(adapters, base=args.base, batch_size=args.batch_size, device=args.device)
            loaded = next(iter(shared.values()))
            base = loaded.generate_base(prompts, settings)
            tuned = {name: one.generate_tuned(prompts, settings) for name, one in shared.items()}
            rows = [{"prompt": p, "base": b, "tuned": {name: texts[i] for name, texts in tuned.items()}}
                    for i, (p, b) in enumerate(zip(prompts, base))]
    except UserError as exc:
        report_and_exit(str(exc))
    if args.json:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
    else:
        base = loaded.base_model
        if not args.base and info.recorded_base and info.recorded_base != base:
            base = f"{info.recorded_base} (loaded from {base})"
        if len(adapters) == 1:
            print(f"adapter {info.adapter_dir} ({info.peft_type}) on base {base}")
        else:
            print(f"{len(adapters)} adapters ({info.peft_type}) on base {base}, loaded once:")
            for name, one in adapters.items():
                print(f"  {name}: {one.adapter_dir}")
        mode = (f"sampling, temperature {settings.temperature}, top_p {settings.top_p}, seed {settings.seed}"
                if settings.do_sample else "greedy")
        print(f"{mode}, max_new_tokens {settings.max_new_tokens}, repetition_penalty {settings.repetition_penalty}\n")
        print(side_by_side(rows, shutil.get_terminal_size((120, 24)).columns))
    return 0
