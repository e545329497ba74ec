"""A small byte-level BPE tokenizer trained offline on the bundled samples, for the tiny models.

A tiny model that uses a real 49k-token vocabulary barely moves in a few steps of prompt tuning;
with a few hundred tokens it learns visibly, which makes smoke runs informative and tests sharp.
"""

from __future__ import annotations

import hashlib

from softprompt.core import cache
from softprompt.data.bundled import bundled_files, bundled_texts

EOS, PAD = "<|endoftext|>", "<pad>"


def tiny_tokenizer(vocab_size: int):
    """Return (tokenizer, directory it is saved in); trained once per vocab size and sample set."""
    from transformers import PreTrainedTokenizerFast

    digest = hashlib.sha256(str(vocab_size).encode())
    for file in bundled_files():
        digest.update(file.read_bytes())
    name = f"tiny-bpe-{vocab_size}-{digest.hexdigest()[:10]}"
    target, _ = cache.entry("tokenizers", name, lambda staging: _train(vocab_size).save_pretrained(staging))
    return PreTrainedTokenizerFast.from_pretrained(target), str(target)


def _train(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(bundled_texts(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=EOS, eos_token=EOS, pad_token=PAD)
