"""`python -m softprompt [overrides...]`: the same entrypoint as `python train.py` (see softprompt.cli)."""

from softprompt.cli import main

if __name__ == "__main__":
    main()
