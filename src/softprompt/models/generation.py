"""Batched generation with or without a soft prompt, equal to one-prompt-at-a-time greedy output.

`PeftModel.generate` fails on Bloom for batches (ALiBi size mismatch) and, because PEFT prepends
the soft prompt *before* the left padding (peft#1093), produces different text for padded rows.
So we build the input embeddings ourselves: `[pads, soft prompt, text]` with attention mask
`[0.., 1.., 1..]`, and decode greedily from them with the base model (`softprompt.models.decode`,
a lean loop equal to `generate()`'s greedy search; `generate(inputs_embeds=...)` itself for
sampling and for architectures the loop does not know). The base model goes
through exactly the same path with no soft prompt, so the comparison differs only in the prompt.

With `inputs_embeds` alone, `generate` does not know the prompt's token ids, so its repetition
penalty would ignore them (and with left padding it would penalise the pad id, often EOS, in
batched runs only). `PromptAwareRepetitionPenalty` applies the penalty over the text's own ids
plus what was generated, the same for every batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from softprompt.core.progress import progress
from softprompt.models.decode import greedy_decode, supports_lean_decode


@dataclass
class GenerationSettings:
    max_new_tokens: int = 100
    repetition_penalty: float = 1.5
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


class PromptAwareRepetitionPenalty(LogitsProcessor):
    """CTRL-style repetition penalty over the prompt's token ids and the tokens generated so far.

    Keeps a per-row "seen" mask over the vocabulary and adds only the ids generated since the last
    call: rebuilding it from every id at every step would be Python-side work growing with the
    prompt and the output. One instance serves one `generate` call (the mask is its state).
    """

    def __init__(self, prompt_ids: list[list[int]], penalty: float, device: torch.device):
        self.penalty = penalty
        self.prompt_ids = prompt_ids
        self.device = device
        self.seen: torch.Tensor | None = None
        self.consumed = 0  # generated columns already in `seen`

    def _start(self, scores: torch.Tensor) -> torch.Tensor:
        seen = torch.zeros_like(scores, dtype=torch.bool)
        for row, ids in enumerate(self.prompt_ids):
            if ids:  # an empty prompt penalises nothing until it generates
                seen[row, torch.tensor(ids, dtype=torch.long, device=scores.device)] = True
        return seen

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.seen is None:
            self.seen = self._start(scores)
        if input_ids.shape[1] > self.consumed:
            self.seen.scatter_(1, input_ids[:, self.consumed :], True)
            self.consumed = input_ids.shape[1]
        penalised = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        return torch.where(self.seen, penalised, scores)


def generate_kwargs(settings: GenerationSettings, processors: LogitsProcessorList, eos_id: int, pad_id: int) -> dict:
    """`generate()` arguments shared by every path that calls it: the length, our repetition penalty
    as a processor (generate's own is off: it cannot see a prompt given as embeddings), EOS and pad,
    greedy or seeded sampling (greedy clears the model's own generation_config defaults, which would
    otherwise warn or sample)."""
    common = dict(max_new_tokens=settings.max_new_tokens, logits_processor=processors, repetition_penalty=None,
                  eos_token_id=eos_id, pad_token_id=pad_id)
    if settings.do_sample:
        torch.manual_seed(settings.seed)
        return common | dict(do_sample=True, temperature=settings.temperature, top_p=settings.top_p)
    return common | dict(do_sample=False, temperature=None, top_p=None, top_k=None)


SoftPrompts = torch.Tensor | None | list[torch.Tensor | None]


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    settings: GenerationSettings,
    soft_prompt: SoftPrompts = None,
    batch_size: int = 8,
    desc: str = "generating",
) -> list[str]:
    """Continuations for `prompts` from a causal LM `model` (a plain transformers model).

    `soft_prompt` is a (num_virtual_tokens, hidden) tensor placed between the padding and the
    text, as the tuned model saw it in training; None generates with the base model alone. A list
    gives each prompt its own (or none): the jobs of a packed sweep, and the base model, decode
    in one batch, each row with its own prompt of its own length.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    embed = model.get_input_embeddings()
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    row_prompts = soft_prompt if isinstance(soft_prompt, list) else [soft_prompt] * len(prompts)
    if len(row_prompts) != len(prompts):
        raise ValueError(f"{len(row_prompts)} soft prompts for {len(prompts)} prompts")
    lengths = [len(x) + (0 if p is None else p.shape[0]) for x, p in zip(encoded, row_prompts)]
    # longest first: less padding per batch; results are put back in the caller's order
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    outputs: dict[int, str] = {}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    lean = not settings.do_sample and supports_lean_decode(model)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in progress(batches, desc=desc):
        ids = [encoded[i] for i in batch]
        width = max(lengths[i] for i in batch)
        # [pads, soft prompt, text]: each row's soft prompt sits right before its first text token
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(batch), width), dtype=torch.long, device=device)
        for row, (i, x) in enumerate(zip(batch, ids)):
            if x:
                input_ids[row, width - len(x) :] = torch.tensor(x, device=device)
            mask[row, width - lengths[i] :] = 1
        embeds = embed(input_ids)
        for row, i in enumerate(batch):
            prompt = row_prompts[i]
            if prompt is not None:
                end = width - len(ids[row])
                embeds[row, end - prompt.shape[0] : end] = prompt.to(device=device, dtype=embeds.dtype)
        if lean:
            out = greedy_decode(model, mask, ids, settings.max_new_tokens, settings.repetition_penalty,
                                tokenizer.eos_token_id, pad_id, inputs_embeds=embeds)
        else:
            processors = LogitsProcessorList()
            if settings.repetition_penalty != 1.0:
                processors.append(PromptAwareRepetitionPenalty(ids, settings.repetition_penalty, device))
            out = model.generate(inputs_embeds=embeds, attention_mask=mask,
                                 **generate_kwargs(settings, processors, tokenizer.eos_token_id, pad_id))
        for row, i in enumerate(batch):
            outputs[i] = tokenizer.decode(out[row], skip_special_tokens=True).strip()
    model.train(was_training)
    return [outputs[i] for i in range(len(prompts))]
