"""python scripts/bench.py [--model smollm2-135m] [--data CSV] [--steps N] [--precision auto|fp32|bf16] [--out FILE]
python scripts/bench.py --sweep SWEEP.yaml [--count N] [--out FILE] [overrides...]

Training throughput of softprompt vs the seed notebook's recipe (real tokens/s, ratio), MFU,
peak RSS, eval and generation tokens/s, as JSON. See softprompt.experiments.bench and docs/speed.md.
With --sweep: the sweep trained alone-per-job and shared (packs, epoch trunks), both wall times,
their ratio and the largest relative difference of eval/perplexity (softprompt.experiments.sweep_bench).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's package

if __name__ == "__main__":
    if any(a == "--sweep" or a.startswith("--sweep=") for a in sys.argv[1:]):
        from softprompt.experiments.sweep_bench import main
    else:
        from softprompt.experiments.bench import main
    main()
