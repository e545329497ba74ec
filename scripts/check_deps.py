"""python scripts/check_deps.py: do pyproject's dependencies match what the code imports?

- every third-party package that src/softprompt imports is declared: in `dependencies`, or in
  an extra for the optional features (gradio: `demo`, wandb-workspaces: `dashboard`);
- every package that tests/ and scripts/ import is declared (the `dev` extra included);
- every declared package is imported somewhere, or is in NOT_IMPORTED with the reason it is
  needed anyway (a plugin or file-format backend that another library loads by name).

Imports are read with `ast` (also the ones inside functions); module names map to distributions
through the installed environment (`importlib.metadata.packages_distributions`), so run it in the
set-up venv. Exit status 1 and one line per problem when they disagree.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]

# declared but never imported by our code, and why they are needed
NOT_IMPORTED = {
    "gguf": "transformers reads GGUF files with it (model=smollm2-135m loads a .gguf)",
    "accelerate": "transformers needs it to load models with device placement / low memory use",
    "hydra-submitit-launcher": "a Hydra launcher plugin, loaded by name (hydra/launcher=slurm)",
    "pytest-timeout": "a pytest plugin (--timeout in pyproject's addopts)",
    "import-linter": "the `lint-imports` command the layer test runs",
    "pytest": "the test runner (tests import it too)",
}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    return _norm(re.split(r"[\s<>=!~;\[(]", req.strip(), maxsplit=1)[0])


def declared(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, set[str]]:
    """{'dependencies': {...}, '<extra>': {...}} as normalised distribution names."""
    project = tomllib.loads(pyproject.read_text())["project"]
    out = {"dependencies": {_requirement_name(r) for r in project.get("dependencies", [])}}
    for extra, reqs in project.get("optional-dependencies", {}).items():
        out[extra] = {_requirement_name(r) for r in reqs}
    return out


def imported_modules(paths: list[Path]) -> dict[str, set[Path]]:
    """Top-level module name -> files importing it; absolute imports only, stdlib left out."""
    local = {p.stem for path in paths for p in (path.glob("*.py") if path.is_dir() else [path])}
    found: dict[str, set[Path]] = {}
    for path in paths:
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            for node in ast.walk(ast.parse(file.read_text(), str(file))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in sys.stdlib_module_names or top in ("softprompt", "__future__") or top in local:
                        continue
                    found.setdefault(top, set()).add(file.relative_to(ROOT))
    return found


def problems(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    decl = declared(pyproject)
    core = decl["dependencies"]
    optional = set().union(*(reqs for extra, reqs in decl.items() if extra not in ("dependencies", "dev")))
    everything = set().union(*decl.values())
    to_dist = packages_distributions()
    out: list[str] = []
    used: set[str] = set()

    def dists(module: str, files: set[Path]) -> set[str]:
        if module not in to_dist:
            out.append(f"{module}: imported by {', '.join(map(str, sorted(files)))} but not installed")
            return set()
        return {_norm(d) for d in to_dist[module]}

    for module, files in sorted(imported_modules([ROOT / "src" / "softprompt"]).items()):
        names = dists(module, files)
        used |= names
        if names and not names & (core | optional):
            out.append(f"{module} ({'/'.join(sorted(names))}): imported by {sorted(map(str, files))[0]} "
                       "but not in [project] dependencies or a feature extra")
    for module, files in sorted(imported_modules([ROOT / "tests", ROOT / "scripts", ROOT / "train.py"]).items()):
        names = dists(module, files)
        used |= names
        if names and not names & everything:
            out.append(f"{module} ({'/'.join(sorted(names))}): imported by {sorted(map(str, files))[0]} "
                       "but not declared (tests and scripts: the dev extra)")
    for name in sorted(everything - used - {_norm(n) for n in NOT_IMPORTED}):
        where = [extra for extra, reqs in decl.items() if name in reqs]
        out.append(f"{name}: declared in {', '.join(where)} but nothing imports it; drop it "
                   "(or say in NOT_IMPORTED why it is needed)")
    return out


def main() -> int:
    found = problems()
    for line in found:
        print(line)
    if not found:
        print("dependencies match the imports")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
