"""python scripts/floors.py --installed | --check: the floors of pyproject.toml in this environment.

`--installed`: the names of the packages pyproject.toml names (dependencies and every extra) that
are installed already, one a line (scripts/test_lowest.sh reinstalls them at their floor).
`--check`: every named package with a floor (`>=X` or `==X`) is installed at exactly X; exit status
1 and one line per package that is not. torch is left out: CI keeps its CPU build by an override.
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEPT = {"torch"}  # installed before the others, from the wheel on disk (scripts/setup.sh)


def floors() -> dict[str, str | None]:
    """Normalised name -> floor (None: no floor) of every requirement but softprompt's own extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [*project["dependencies"], *(r for rs in project["optional-dependencies"].values() for r in rs)]
    out: dict[str, str | None] = {}
    for req in reqs:
        name = re.split(r"[\s<>=!~;\[(]", req.strip(), maxsplit=1)[0]
        if name.lower() == project["name"]:
            continue
        found = re.search(r"(?:>=|==)\s*([^,;\s]+)", req)
        out[re.sub(r"[-_.]+", "-", name).lower()] = found.group(1) if found else None
    return out


def _installed(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _same(installed: str, floor: str) -> bool:
    """5.24 == 5.24.0; a local build tag (+cpu) is not part of the version."""
    def parts(v: str) -> list[int | str]:
        out = [int(p) if p.isdigit() else p for p in v.split("+")[0].split(".")]
        while out and out[-1] == 0:
            out.pop()
        return out
    return parts(installed) == parts(floor)


def main(argv: list[str]) -> int:
    if argv == ["--installed"]:
        print("\n".join(n for n in floors() if n not in KEPT and _installed(n)))
        return 0
    if argv != ["--check"]:
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    wrong = [f"{name}: installed {_installed(name)}, floor {floor}" for name, floor in floors().items()
             if floor and name not in KEPT and not (_installed(name) and _same(_installed(name), floor))]
    print("\n".join(wrong) if wrong else f"every floor installed ({sum(1 for f in floors().values() if f)} packages)")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
