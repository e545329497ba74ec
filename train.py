"""python train.py [hydra overrides...]: prompt-tune a causal LM (see README and conf/).

The same entrypoint as `python -m softprompt` and the console script `softprompt-train`."""

import sys
from pathlib import Path

# a plain checkout works without installing: this checkout's src/ comes first
sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from softprompt.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
