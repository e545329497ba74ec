"""python train.py [hydra overrides...]: prompt-tune a causal LM (see README and conf/)."""

from softprompt.cli import main

if __name__ == "__main__":
    main()
