"""Create or update the W&B report for a softprompt sweep; `--dry-run` writes its spec offline.

    python scripts/dashboard.py --entity E --project P --sweep SWEEP_ID
    python scripts/dashboard.py --entity E --project P --group G --dry-run --out dashboard.md
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs from a plain checkout too

from softprompt.core.errors import UserError, report_and_exit  # noqa: E402
from softprompt.experiments.dashboard import main  # noqa: E402

if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as exc:
        report_and_exit(str(exc))
