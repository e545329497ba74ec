"""Third-party log lines that say nothing to a softprompt user, filtered by name.

Each entry is one specific message (or one library's INFO chatter), matched narrowly so that a
new warning from the same library still shows. Called by the CLI and by `run()`.
"""

from __future__ import annotations

import logging
import warnings

# (category, message regex): deprecation notices about library internals we do not call ourselves
WARNINGS = [
    # transformers 5.x: Trainer's own gradient-checkpointing probe calls the deprecated property
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
]

# loggers whose INFO lines are chatter: rouge_score logs "Using default tokenizer." through absl
# on every scorer it builds; Hydra's logging setup would print it as `[absl][INFO]`
LOGGERS_AT_WARNING = ["absl"]


def quiet_third_party() -> None:
    for category, message in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in LOGGERS_AT_WARNING:
        logging.getLogger(name).setLevel(logging.WARNING)
