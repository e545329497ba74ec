"""python scripts/bench.py [--model M] [--data CSV] [--steps N] [--out FILE]: training/eval
throughput, ratio to the seed recipe, MFU, as JSON (console script: softprompt-bench)."""

import sys
from pathlib import Path

# a plain checkout works without installing: this checkout's src/ comes first
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from softprompt.experiments.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
