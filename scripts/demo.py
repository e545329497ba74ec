"""python scripts/demo.py ADAPTER_DIR|RUNS_DIR [--port N] [--host H]: Gradio page, base vs tuned."""

import sys

from softprompt.serve.demo import main

if __name__ == "__main__":
    sys.exit(main())
