"""A small byte-level BPE tokenizer trained offline on the bundled samples, for the tiny models.

A tiny model that uses a real 49k-token vocabulary barely moves in a few steps of prompt tuning;
with a few hundred tokens it learns visibly, which makes smoke runs informative and tests sharp.

The large shapes (softprompt.models.shapes) need a tokenizer with their model's vocabulary size
(128,256 for Llama 3): the samples cannot teach a BPE that many tokens, so `pad_to` fills the
vocabulary with filler tokens that no text encodes to but that decode to a readable name.
"""

from __future__ import annotations

import hashlib
import json

from softprompt.core import cache
from softprompt.data.bundled import bundled_files, bundled_texts

EOS, PAD = "<|endoftext|>", "<pad>"
FILLER = "<|filler_{}|>"


def tiny_tokenizer(vocab_size: int, pad_to: int | None = None):
    """Return (tokenizer, directory it is saved in); trained once per vocab size and sample set,
    its vocabulary padded with filler tokens to exactly `pad_to` entries when given."""
    from transformers import PreTrainedTokenizerFast

    digest = hashlib.sha256(f"{vocab_size}:{pad_to}".encode())
    for file in bundled_files():
        digest.update(file.read_bytes())
    name = f"tiny-bpe-{vocab_size}{f'-pad{pad_to}' if pad_to else ''}-{digest.hexdigest()[:10]}"

    def build(staging) -> None:
        tokenizer = _train(vocab_size)
        (_padded(tokenizer, pad_to) if pad_to else tokenizer).save_pretrained(staging)

    target, _ = cache.entry("tokenizers", name, build)
    return PreTrainedTokenizerFast.from_pretrained(target), str(target)


def _padded(tokenizer, size: int):
    """`tokenizer` with filler entries in its BPE vocabulary up to `size` ids. They are vocabulary
    entries, not added tokens: no merge produces them, so encoding is unchanged and the tokenizer
    stays as fast to load as the unpadded one."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    data = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = data["model"]["vocab"]
    taken = len(tokenizer)  # the BPE's entries and the special tokens
    if taken > size:
        raise ValueError(f"the trained vocabulary ({taken}) is larger than {size}")
    vocab.update({FILLER.format(i): i for i in range(taken, size)})
    core = Tokenizer.from_str(json.dumps(data))
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=EOS, eos_token=EOS, pad_token=PAD)


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
