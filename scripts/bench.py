"""python scripts/bench.py [--model smollm2-135m] [--data CSV] [--steps N] [--precision auto|fp32|bf16] [--out FILE]

Training throughput of softprompt vs the seed notebook's recipe (real tokens/s, ratio), MFU,
peak RSS, eval and generation tokens/s, as JSON. See softprompt.experiments.bench and docs/speed.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's package

from softprompt.experiments.bench import main  # noqa: E402

if __name__ == "__main__":
    main()
