"""What softprompt knows about a base model's architecture beyond the transformers API."""

from __future__ import annotations

# decoders whose logits are exactly lm_head(the decoder's last hidden state): no softcapping, no
# logit scale. For these the fast training loss, the perplexity pass and greedy decoding apply the
# lm_head themselves, only where logits are needed.
LM_HEAD_OF_HIDDEN_MODEL_TYPES = ("llama", "bloom", "mistral", "qwen2")


def logits_are_lm_head_of_hidden(model) -> bool:
    """True where `model` (a transformers causal LM) computes logits as lm_head(decoder output)."""
    return getattr(model.config, "model_type", None) in LM_HEAD_OF_HIDDEN_MODEL_TYPES
