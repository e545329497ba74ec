"""python scripts/dashboard.py --entity E --project P --sweep ID [--dry-run --out FILE]: the W&B
report for a sweep (console script: softprompt-dashboard)."""

import sys
from pathlib import Path

# a plain checkout works without installing: this checkout's src/ comes first
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from softprompt.experiments.dashboard import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
