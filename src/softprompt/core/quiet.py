"""Third-party log lines that say nothing to a softprompt user, filtered by name.

Each entry is one specific message (or one library's INFO chatter), matched narrowly so that a
new warning from the same library still shows. Called by the CLI and by `run()`.
"""

from __future__ import annotations

import logging
import re
import warnings

# (category, message regex): deprecation notices about library internals we do not call ourselves
WARNINGS = [
    # transformers 5.x: Trainer's own gradient-checkpointing probe calls the deprecated property
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    # bitsandbytes' LLM.int8 (model.quantization=8bit) always quantizes activations from fp16: a
    # property of the method, said on every matmul (docs/large-models.md)
    (UserWarning, r"MatMul8bitLt: inputs will be cast from"),
    # bitsandbytes 0.48's CPU kernels call a torch helper that torch 2.13 deprecates
    (FutureWarning, r"_check_is_size will be removed"),
]

# (logger, message regex): bitsandbytes >= 0.49 on an AVX512-BF16 CPU asks the `kernels` package
# (a transformers dependency) for a faster 4-bit inference kernel from the Hub when it is imported;
# offline it says so in two lines and keeps its own kernel, which softprompt uses for training
# anyway (softprompt.models.quantization.keep_gradients_exact)
LOG_LINES = [
    ("kernels._internals.hf_hub", r"Skipping publisher trust check for 'kernels-community/"),
    ("bitsandbytes.backends.cpu.ops", r"Failed to load CPU gemm_4bit_forward from kernels-community"),
]

# loggers whose INFO lines are chatter: rouge_score logs "Using default tokenizer." through absl
# on every scorer it builds; Hydra's logging setup would print it as `[absl][INFO]`
LOGGERS_AT_WARNING = ["absl"]


class _DropMatching(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_third_party() -> None:
    for category, message in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in LOGGERS_AT_WARNING:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name, message in LOG_LINES:
        logger = logging.getLogger(name)  # a logger's filters see only its own records: the exact name
        if not any(isinstance(f, _DropMatching) and f.pattern.pattern == message for f in logger.filters):
            logger.addFilter(_DropMatching(message))
