"""python scripts/report.py DIR...: compare finished runs (console script: softprompt-report)."""

import sys
from pathlib import Path

# a plain checkout works without installing: this checkout's src/ comes first
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from softprompt.experiments.report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
