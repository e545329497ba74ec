"""python scripts/check_deps.py: do pyproject's dependencies match what the code imports?

- every third-party package that src/ (softprompt and its Hydra plugin) imports is declared: in
  `dependencies`, or in a feature extra (sweeps, report, demo, dashboard, slurm);
- a package of a feature extra is imported only inside a function (never at module level), so
  that a plain `pip install softprompt` imports and trains without the extras;
- every package that tests/ and scripts/ import is declared (the `dev` extra included);
- every declared package is imported somewhere, or is in NOT_IMPORTED with the reason it is
  needed anyway (a plugin or file-format backend that another library loads by name).

Imports are read with `ast` (also the ones inside functions, and `import_extra("module", ...)`);
module names map to distributions through the installed environment
(`importlib.metadata.packages_distributions`), so run it in the set-up venv. Exit status 1 and one
line per problem when they disagree.
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
    "hydra-submitit-launcher": "a Hydra launcher plugin, loaded by name (hydra/launcher=submitit_slurm)",
    "pytest-timeout": "a pytest plugin (--timeout in pyproject's addopts)",
    "pytest-xdist": "a pytest plugin (`make test` runs the suite with -n auto)",
    "import-linter": "the `lint-imports` command the layer test runs",
    "pytest": "the test runner (tests import it too)",
}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    return _norm(re.split(r"[\s<>=!~;\[(]", req.strip(), maxsplit=1)[0])


def declared(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, set[str]]:
    """{'dependencies': {...}, '<extra>': {...}} as normalised distribution names; an extra that
    names another (`all = ["softprompt[report,...]"]`) holds that extra's packages."""
    project = tomllib.loads(pyproject.read_text())["project"]
    own = _norm(project["name"])
    raw = {"dependencies": project.get("dependencies", []), **project.get("optional-dependencies", {})}

    def names(extra: str, seen: frozenset[str] = frozenset()) -> set[str]:
        out: set[str] = set()
        for req in raw[extra]:
            if _requirement_name(req) != own:
                out.add(_requirement_name(req))
                continue
            for other in re.search(r"\[([^\]]*)\]", req).group(1).split(","):
                if other.strip() not in seen:
                    out |= names(other.strip(), seen | {extra})
        return out

    return {extra: names(extra) for extra in raw}


def imported_modules(paths: list[Path], module_level: bool = False) -> dict[str, set[Path]]:
    """Top-level module name -> files importing it; absolute imports only, stdlib left out.
    `module_level`: only the imports that run when the module is imported (not inside a function)."""
    local = {p.stem for path in paths for p in (path.glob("*.py") if path.is_dir() else [path])}
    found: dict[str, set[Path]] = {}
    for path in paths:
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            for node in _imports(ast.parse(file.read_text(), str(file)), module_level):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                elif isinstance(node, ast.Call):  # import_extra("matplotlib", "report", ...)
                    names = [node.args[0].value]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in sys.stdlib_module_names or top in ("softprompt", "__future__") or top in local:
                        continue
                    found.setdefault(top, set()).add(file.relative_to(ROOT))
    return found


def _imports(node: ast.AST, module_level: bool):
    for child in ast.iter_child_nodes(node):
        if module_level and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)) or _is_import_extra(child):
            yield child
        yield from _imports(child, module_level)


def _is_import_extra(node: ast.AST) -> bool:
    """A call of softprompt.core.errors.import_extra with the module's name spelled out."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "import_extra"
            and bool(node.args) and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str))


SOURCES = [ROOT / "src" / "softprompt", ROOT / "src" / "hydra_plugins"]


def problems(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    decl = declared(pyproject)
    core = decl["dependencies"]
    optional = set().union(*(reqs for extra, reqs in decl.items() if extra not in ("dependencies", "dev", "all")))
    everything = set().union(*decl.values())
    to_dist = packages_distributions()
    out: list[str] = []
    used: set[str] = set()

    def dists(module: str, files: set[Path]) -> set[str]:
        if module not in to_dist:
            out.append(f"{module}: imported by {', '.join(map(str, sorted(files)))} but not installed")
            return set()
        return {_norm(d) for d in to_dist[module]}

    for module, files in sorted(imported_modules(SOURCES).items()):
        names = dists(module, files)
        used |= names
        if names and not names & (core | optional):
            out.append(f"{module} ({'/'.join(sorted(names))}): imported by {sorted(map(str, files))[0]} "
                       "but not in [project] dependencies or a feature extra")
    for module, files in sorted(imported_modules(SOURCES, module_level=True).items()):
        names = {_norm(d) for d in to_dist.get(module, [])}
        if names and not names & core and names & optional:
            extras = sorted(e for e, reqs in decl.items() if names & reqs and e not in ("dev", "all"))
            out.append(f"{module} ({'/'.join(sorted(names))}): imported at module level by "
                       f"{sorted(map(str, files))[0]}, but it is only in the {', '.join(extras)} extra; "
                       "import it inside the function that needs it")
    for module, files in sorted(imported_modules([ROOT / "tests", ROOT / "scripts", ROOT / "train.py"]).items()):
        names = dists(module, files)
        used |= names
        if names and not names & everything:
            out.append(f"{module} ({'/'.join(sorted(names))}): imported by {sorted(map(str, files))[0]} "
                       "but not declared (tests and scripts: the dev extra)")
    for name in sorted(everything - used - {_norm(n) for n in NOT_IMPORTED}):
        where = [extra for extra, reqs in decl.items() if name in reqs and extra != "all"]
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
