"""`python scripts/demo.py ADAPTER_DIR|RUNS_DIR`: a Gradio page, base vs tuned, side by side.

Given a directory of runs (a multirun or sweep dir), it offers every finished adapter under it in
a dropdown. Adapters on the same base model (and PEFT method) load together onto one copy of it,
so the dropdown switches between them without loading anything; other bases load on first use
and the two most recent stay in memory. The generate
button is also an API endpoint (`api_name="generate"`) for `gradio_client`.
Serves on 127.0.0.1:7860 by default; `--host 0.0.0.0` exposes it to the network. Like every Gradio
app it honours GRADIO_SERVER_NAME / GRADIO_SERVER_PORT; `--host` / `--port` win over them.
`GRADIO_SHARE=true` also asks Gradio for a public share link (default: none).
"""

from __future__ import annotations

import argparse
import os
import threading
from collections import OrderedDict

from softprompt.core import keys
from softprompt.core.errors import UserError, import_extra, report_and_exit
from softprompt.core.quiet import quiet_third_party
from softprompt.core.rundir import RunDir
from softprompt.serve.adapters import AdapterInfo, discover

# what the page shows of a run's metrics.json, in this order
_SHOWN = [
    (keys.EVAL_PERPLEXITY, "held-out perplexity, tuned"),
    (keys.EVAL_BASE_PERPLEXITY, "held-out perplexity, base"),
    (keys.EVAL_PPL_RATIO, "perplexity ratio (tuned / base)"),
    (keys.TRAIN_LOSS, "train loss"),
    (keys.TRAIN_EPOCHS, "epochs"),
    (keys.TRAIN_STEPS, "optimizer steps"),
    (keys.PEFT_NUM_VIRTUAL_TOKENS, "virtual tokens"),
    (keys.TRAIN_TRAINABLE_PARAMS, "trainable parameters"),
    (keys.TRAIN_RUNTIME_S, "training time (s)"),
]


def metrics_markdown(info: AdapterInfo) -> str:
    from softprompt.models.methods import by_peft_type

    method = by_peft_type(info.peft_type, where=f"the adapter in {info.adapter_dir}")
    lines = ["| run | |", "| --- | --- |",
             f"| method | {method.name} (`{method.peft_type}`) |", f"| tuned model | {method.description} |",
             f"| base model | `{info.recorded_base or '?'}` |"]
    for key, label in _SHOWN:
        if key == keys.PEFT_NUM_VIRTUAL_TOKENS and not method.uses_virtual_tokens:
            continue  # recorded for every run, meaningless for LoRA
        if key in info.metrics:
            lines.append(f"| {label} | {_fmt(info.metrics[key])} |")
    if not info.metrics:
        lines.append(f"| metrics | none recorded (no {RunDir.METRICS}) |")
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


class AdapterPool:
    """Loaded adapters by key. Adapters that can share a base model (same base, tokenizer and PEFT
    method: `inference.base_key`) are loaded together onto one copy of it, so switching between
    them in the dropdown loads nothing; adapters on other bases load on first use, and beyond
    `keep` base models the least recently used one is dropped."""

    def __init__(self, adapters: dict[str, AdapterInfo], base: str | None, keep: int = 2, device: str = "auto"):
        from softprompt.serve.inference import base_key

        self.adapters, self.base, self.keep, self.device = adapters, base, keep, device
        self.groups: dict[tuple, list[str]] = {}
        for key, info in adapters.items():
            self.groups.setdefault(base_key(info, base), []).append(key)
        self._group_of = {key: group for group, members in self.groups.items() for key in members}
        self._loaded: OrderedDict = OrderedDict()  # group -> {key: LoadedAdapter}
        self._lock = threading.Lock()

    def get(self, key: str):
        from softprompt.serve.inference import load, load_shared

        if key not in self.adapters:
            raise UserError(f"unknown adapter {key!r}; choose one of {', '.join(self.adapters)}")
        group = self._group_of[key]
        with self._lock:
            if group not in self._loaded:
                members = self.groups[group]
                self._loaded[group] = (
                    {key: load(self.adapters[key], base=self.base, device=self.device)} if len(members) == 1
                    else load_shared({k: self.adapters[k] for k in members}, base=self.base, device=self.device))
                while len(self._loaded) > self.keep:
                    self._loaded.popitem(last=False)
            self._loaded.move_to_end(group)
            return self._loaded[group][key]


def make_generate(pool: AdapterPool):
    from softprompt.models.generation import GenerationSettings
    from softprompt.serve.generate_cli import validate_settings

    def generate(adapter: str, prompt: str, max_new_tokens: float, repetition_penalty: float,
                 temperature: float, top_p: float, seed: float) -> tuple[str, str]:
        import gradio as gr

        if not (prompt or "").strip():
            raise gr.Error("type a prompt first")
        settings = GenerationSettings(max_new_tokens=int(max_new_tokens), repetition_penalty=float(repetition_penalty),
                                      do_sample=float(temperature) > 0, temperature=float(temperature) or 1.0,
                                      top_p=float(top_p), seed=int(seed))
        try:
            validate_settings(settings)
            row = pool.get(adapter).compare([prompt.strip()], settings)[0]
        except UserError as exc:
            raise gr.Error(str(exc)) from exc
        return row["base"], row["tuned"]

    return generate


def build(adapters: dict[str, AdapterInfo], base: str | None = None, prompt: str | None = None,
          prerun: bool = False, device: str = "auto"):
    """The Gradio Blocks app. `prompt` pre-fills the prompt box (default: the run's first eval
    prompt); with `prerun` the page opens with it already answered (generated once at start-up;
    handy for screenshots and for sharing a finding)."""
    gr = import_extra("gradio", "demo", "the demo needs it")

    pool = AdapterPool(adapters, base, device=device)
    generate = make_generate(pool)
    first = next(iter(adapters))
    info = adapters[first]
    prompt = prompt if prompt is not None else (info.eval_prompts[:1] or [""])[0]
    defaults = dict(max_new_tokens=int(info.eval_setting("max_new_tokens", 100)),
                    repetition_penalty=float(info.eval_setting("repetition_penalty", 1.5)))
    base_text = tuned_text = ""
    if prompt and prerun:
        base_text, tuned_text = generate(first, prompt, defaults["max_new_tokens"], defaults["repetition_penalty"],
                                         0.0, 1.0, 0)

    with gr.Blocks(title="softprompt: base vs tuned") as demo:
        gr.Markdown("## softprompt: base model vs tuned model\n"
                    "The same prompt and settings go to the frozen base model and to the tuned model "
                    "(for each run's method, see its table).")
        with gr.Row():
            with gr.Column(scale=3):
                picker = gr.Dropdown(choices=list(adapters), value=first, label="adapter",
                                     interactive=len(adapters) > 1)
                box = gr.Textbox(value=prompt, label="prompt", lines=3)
                with gr.Row():
                    new_tokens = gr.Slider(1, 512, value=defaults["max_new_tokens"], step=1, label="max_new_tokens")
                    penalty = gr.Slider(1.0, 3.0, value=defaults["repetition_penalty"], step=0.05,
                                        label="repetition_penalty")
                with gr.Row():
                    temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top_p (sampling only)")
                    seed = gr.Number(value=0, precision=0, label="seed")
                button = gr.Button("Generate", variant="primary")
            with gr.Column(scale=2):
                metrics = gr.Markdown(metrics_markdown(info), label="run metrics")
        with gr.Row():
            base_out = gr.Textbox(value=base_text, label="base model", lines=8)
            tuned_out = gr.Textbox(value=tuned_text, label="tuned", lines=8)

        inputs = [picker, box, new_tokens, penalty, temperature, top_p, seed]
        button.click(generate, inputs, [base_out, tuned_out], api_name="generate")
        box.submit(generate, inputs, [base_out, tuned_out], api_name=False)
        picker.change(lambda key: metrics_markdown(adapters[key]), picker, metrics, api_name="metrics")
    return demo


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/demo.py", description=__doc__.splitlines()[0])
    p.add_argument("path", help="a run directory, its adapter/ folder, or a directory of runs")
    p.add_argument("--base", help="base model for every adapter instead of the recorded one")
    p.add_argument("--host", help="interface to serve on (0.0.0.0: every interface); "
                                   "default: GRADIO_SERVER_NAME, else 127.0.0.1")
    p.add_argument("--port", type=int, help="default: GRADIO_SERVER_PORT, else 7860")
    p.add_argument("--prompt", help="pre-fill this prompt and open the page with its answers")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                   help="where the models generate (auto: the GPU where there is one)")
    return p


def server_address(host: str | None, port: int | None) -> tuple[str, int]:
    """The command line, else the variables Gradio users set, else Gradio's own defaults."""
    host = host or os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1"
    if port is None:
        raw = os.environ.get("GRADIO_SERVER_PORT") or "7860"
        if not raw.isdigit() or not 0 < int(raw) < 65536:
            raise UserError(f"GRADIO_SERVER_PORT={raw!r} is not a port number; set it to e.g. 7860 or pass --port")
        port = int(raw)
    return host, port


def share_link() -> bool:
    """GRADIO_SHARE, as Gradio users set it (`true`/`1`): a public *.gradio.live link; default no."""
    raw = os.environ.get("GRADIO_SHARE", "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise UserError(f"GRADIO_SHARE={raw!r} is not true or false; set it to true for a public link, or unset it")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    quiet_third_party()  # before PEFT is imported: with bitsandbytes installed, its import talks
    # no phoning home from a research box: no analytics, no update check
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        host, port = server_address(args.host, args.port)
        share = share_link()
        adapters = discover(args.path)  # before gradio and torch load: a wrong path fails at once
        demo = build(adapters, base=args.base, prompt=args.prompt, prerun=bool(args.prompt), device=args.device)
    except UserError as exc:
        report_and_exit(str(exc))
    print(f"serving {len(adapters)} adapter(s) from {args.path} on http://{host}:{port}", flush=True)
    demo.launch(server_name=host, server_port=port, share=share, show_error=True)
    return 0
