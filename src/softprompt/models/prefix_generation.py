"""Batched generation for prefix tuning, equal to one-prompt-at-a-time greedy output.

Prefix tuning keeps its prompt in every layer's key/value cache, not in the input embeddings, so
`softprompt.models.generation`'s `[pads, soft prompt, text]` path does not apply. `PeftModel.generate`
does not work for padded batches here (peft 0.21.2 + transformers 5.24): generate hands PEFT a
4-D mask, which PEFT replaces by all ones, so padded rows attend to their pads (measured: padded
rows generated different text than alone). So we continue from a pre-filled cache ourselves (greedy: `softprompt.models.decode`'s loop; sampling:
`generate` with the cache):

- the cache holds the prefix (`PeftModel.get_prompt`), `num_virtual_tokens` entries per layer;
- `input_ids` are `[nv placeholder ids, pads, text]` with mask `[1.., 0.., 1..]`: generate skips
  the positions already in the cache, the pads are masked out, and the text's position ids
  (counted from the mask) start at `num_virtual_tokens`, as in training, where the text follows
  the cached prefix;
- the repetition penalty sees each row's text ids plus what it generated (not the pads or the
  placeholders, which would otherwise be penalised in padded rows only).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from softprompt.core.progress import progress
from softprompt.models.decode import greedy_decode, supports_lean_decode
from softprompt.models.generation import (
    GenerationSettings,
    PromptAwareRepetitionPenalty,
    generate_kwargs,
)


class _GeneratedOnly(LogitsProcessor):
    """Hands a processor only the generated ids (generate's input_ids also hold the padded prompt)."""

    def __init__(self, inner: LogitsProcessor, prompt_width: int):
        self.inner, self.prompt_width = inner, prompt_width

    def __call__(self, input_ids, scores):
        return self.inner(input_ids[:, self.prompt_width :], scores)


def prefix_cache(peft_model, batch_size: int) -> DynamicCache:
    """The learned prefix as a fresh cache (generate extends it in place)."""
    cache = peft_model.get_prompt(batch_size=batch_size)
    if isinstance(cache, DynamicCache):
        return cache
    # some architectures (Bloom) come back as per-layer (key, value) tuples
    return DynamicCache(cache)


@torch.no_grad()
def generate_with_prefix(peft_model, tokenizer, prompts: list[str], settings: GenerationSettings,
                         batch_size: int = 8, desc: str = "generating") -> list[str]:
    """Continuations for `prompts` from a prefix-tuning `PeftModel`."""
    was_training = peft_model.training
    peft_model.eval()
    device = next(peft_model.parameters()).device
    n_virtual = peft_model.active_peft_config.num_virtual_tokens
    base = peft_model.get_base_model()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    outputs: dict[int, str] = {}
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in progress(batches, desc=desc):
        ids = [encoded[i] or [pad_id] for i in batch]  # an empty prompt still needs one position
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(batch), width), dtype=torch.long, device=device)
        for row, x in enumerate(ids):
            input_ids[row, width - len(x) :] = torch.tensor(x, device=device)
            mask[row, width - len(x) :] = 1
        # [placeholders for the cached prefix, pads, text]; the placeholders are never embedded
        full_ids = torch.cat([input_ids.new_full((len(batch), n_virtual), pad_id), input_ids], dim=1)
        full_mask = torch.cat([mask.new_ones((len(batch), n_virtual)), mask], dim=1)
        cache = prefix_cache(peft_model, len(batch))
        if not settings.do_sample and supports_lean_decode(base):
            # the cache holds the prefix: only the text is fed; positions count from the full mask
            new = greedy_decode(base, full_mask, [encoded[i] for i in batch], settings.max_new_tokens,
                                settings.repetition_penalty, tokenizer.eos_token_id, pad_id, input_ids=input_ids,
                                cache=cache)
            for row, i in enumerate(batch):
                outputs[i] = tokenizer.decode(new[row], skip_special_tokens=True).strip()
            continue
        processors = LogitsProcessorList()
        if settings.repetition_penalty != 1.0:
            penalty = PromptAwareRepetitionPenalty([encoded[i] for i in batch], settings.repetition_penalty, device)
            processors.append(_GeneratedOnly(penalty, n_virtual + width))
        out = base.generate(input_ids=full_ids, attention_mask=full_mask, cache=cache,
                            **generate_kwargs(settings, processors, tokenizer.eos_token_id, pad_id))
        width += n_virtual
        for row, i in enumerate(batch):
            outputs[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
    peft_model.train(was_training)
    return [outputs[i] for i in range(len(prompts))]
