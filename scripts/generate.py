"""python scripts/generate.py ADAPTER_DIR "prompt" ...: base vs tuned continuations (see --help)."""

import sys

from softprompt.serve.generate_cli import main

if __name__ == "__main__":
    sys.exit(main())
