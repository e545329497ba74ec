"""python scripts/demo.py RUN_OR_ADAPTER_DIR: the Gradio page, base vs tuned (console script:
softprompt-demo)."""

import sys
from pathlib import Path

# a plain checkout works without installing: this checkout's src/ comes first
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from softprompt.serve.demo import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
