"""python scripts/sweep.py SWEEP.yaml [--count N] [--root DIR] [overrides...]: a W&B sweep file, run
offline (console script: softprompt-sweep)."""

import sys
from pathlib import Path

# a plain checkout works without installing: this checkout's src/ comes first
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from softprompt.experiments.sweep import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
