"""The sweep report reads each run's learned prompt (prompt_tokens.jsonl) back as tokens."""

from __future__ import annotations

import json
import shutil

from softprompt.core.rundir import RunDir
from softprompt.experiments.report import build_report, token_markdown, write_report


def test_report_has_the_best_runs_prompt_tokens_and_a_column_per_run(tiny_run, tmp_path):
    run_dir, metrics = tiny_run
    sweep = tmp_path / "sweep"
    for name in ("0", "1"):
        shutil.copytree(run_dir, sweep / name, ignore=shutil.ignore_patterns(RunDir.WANDB, RunDir.CHECKPOINTS, RunDir.ADAPTER))
    # run 1: worse perplexity and no soft prompt to read (as a LoRA run would be)
    worse = dict(metrics, **{"eval/perplexity": metrics["eval/perplexity"] * 2})
    (sweep / "1" / RunDir.METRICS).write_text(json.dumps(worse))
    (sweep / "1" / RunDir.PROMPT_TOKENS).unlink()

    rows = RunDir(run_dir).read_prompt_tokens()
    assert len(rows) == 4  # TINY's num_virtual_tokens
    report = build_report([sweep])
    assert report.best == 0
    text = write_report(report, sweep).read_text()

    section = text[text.index("## The learned prompt, read as tokens"):]
    assert "Run `0` (best run)" in section
    table = [line for line in section.splitlines() if line.startswith("| ")][2:]
    assert len(table) == 4
    for line, row in zip(table, rows):
        cells = [c.strip() for c in line.strip("| ").split(" | ")]
        assert cells[0] == str(row["position"])
        assert cells[1] == ", ".join(f"{token_markdown(n['token'])}{' (id %d)' % n['id'] if chr(0xFFFD) in n['token'] else ''}"
                                     f" {n['cosine']:.2f}" for n in row["neighbours"])
        assert cells[2] == f"{row['cosine_to_init']:.3g}" and cells[3] == f"{row['l2_to_init']:.3g}"
    # the token strings are the tokenizer's own: decode(id) of each neighbour
    from transformers import AutoTokenizer

    record = json.loads((run_dir / RunDir.ADAPTER / RunDir.ADAPTER_RECORD).read_text())
    tokenizer = AutoTokenizer.from_pretrained(record["tokenizer"], local_files_only=True)
    assert all(n["token"] == tokenizer.decode([n["id"]]) for r in rows for n in r["neighbours"])
    assert token_markdown(rows[0]["neighbours"][0]["token"]) in table[0]

    # the compact column: every run's nearest token per position, blank where the run has none
    header, body = report.rows()
    col = header.index("prompt, nearest tokens")
    assert header[col + 1] == "cos to init"
    assert body[0][col] == " ".join(token_markdown(r["neighbours"][0]["token"]) for r in rows)
    mean = sum(r["cosine_to_init"] for r in rows) / len(rows)
    assert body[0][col + 1] == f"{mean:.3g}"
    assert body[1][col] == "" and body[1][col + 1] == ""


def test_token_markdown_keeps_spaces_and_the_table_intact():
    assert token_markdown(" want") == "` want`"
    assert token_markdown("a|b") == "`a\\|b`"
    assert token_markdown("\n") == "`\\n`" and token_markdown("\x03") == "`\\x03`"
    assert token_markdown(" ") == "`' '`"
    assert token_markdown("`x") == "`` `x ``"


def test_report_without_prompt_tokens_has_no_section(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    shutil.copytree(run_dir, tmp_path / "r", ignore=shutil.ignore_patterns(RunDir.WANDB, RunDir.CHECKPOINTS, RunDir.ADAPTER))
    (tmp_path / "r" / RunDir.PROMPT_TOKENS).unlink()
    report = build_report([tmp_path / "r"])
    assert "prompt, nearest tokens" not in report.rows()[0]
    assert "read as tokens" not in write_report(report, tmp_path / "r").read_text()
