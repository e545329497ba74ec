"""Public checkpoints' architectures with random weights (`model.source=shape`): Llama-3.2-1B and
Llama-3-8B at their real size, to measure memory and speed without downloading them.

Building an 8B model the ordinary way initialises 8 billion fp32 parameters (32 GB, minutes on two
cores) before any cast. Here the model is built on the meta device (no memory, no init),
materialised empty in the target dtype, and filled once: linear and embedding weights normal with
the config's standard deviation, norms at 1. Non-persistent buffers
(the rotary embedding's `inv_freq`) are not in any checkpoint and come out of `to_empty` as
garbage: the rotary module is built again, on the CPU, from the config.

The weights depend only on the config and a fixed seed, so a saved adapter's base is rebuilt
exactly (softprompt.serve) without storing 16 GB of random numbers. Their perplexities mean nothing.
"""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig, OmegaConf

SEED = 0


def shape_config(cfg: DictConfig, tokenizer):
    """The transformers config of `model.shape`, with the tokenizer's special ids."""
    from transformers import LlamaConfig

    fields = OmegaConf.to_container(cfg.shape.config, resolve=True)
    return LlamaConfig(**fields, initializer_range=cfg.shape.initializer_range,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, attn_implementation=cfg.attn_implementation or "sdpa")


def build_shape(config, dtype: torch.dtype) -> torch.nn.Module:
    """A randomly initialised model of `config` in `dtype` on the CPU, never materialised in fp32."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to(dtype)  # on meta: only the recorded dtypes change
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives every module its own tensor: tie the shared ones again
    _fill(model, config.initializer_range)
    _rebuild_rotary(model, config)
    return model


# Drawing 8 billion normal values takes 40-90 s on two cores (the CPU generator is serial, about
# 200 M values/s); copying is ~8x faster. So each weight is filled with windows of a pool of normal
# values, each window at a random offset: every row differs, and an 8B shape is filled in seconds.
POOL = 1 << 24
WINDOW = 1 << 20


@torch.no_grad()
def _fill(model: torch.nn.Module, std: float) -> None:
    """Weights ~ N(0, std) as transformers initialises them (from windows of one pool), norms at 1."""
    pools: dict[torch.dtype, torch.Tensor] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        for param in model.parameters():  # a tied weight comes once
            if param.ndim == 1:  # RMSNorm weights
                param.fill_(1.0)
                continue
            if param.dtype not in pools:
                pools[param.dtype] = torch.empty(POOL, dtype=param.dtype).normal_(0.0, std)
            pool, flat = pools[param.dtype], param.view(-1)
            starts = torch.randint(0, POOL - WINDOW + 1, (math.ceil(flat.numel() / WINDOW),)).tolist()
            for i, start in enumerate(starts):
                piece = flat[i * WINDOW:(i + 1) * WINDOW]
                piece.copy_(pool[start:start + piece.numel()])


def _rebuild_rotary(model: torch.nn.Module, config) -> None:
    for parent in model.modules():
        for child_name, child in list(parent.named_children()):
            if type(child).__name__.endswith("RotaryEmbedding"):
                setattr(parent, child_name, type(child)(config=config))  # built outside the meta context: on the CPU


def parameter_count(config) -> int:
    """Parameters of `config`'s model, from the meta device (no memory)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return sum(p.numel() for p in model.parameters())
