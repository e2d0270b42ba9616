"""Print pip constraints that pin the stack's lowest supported versions, for `make test-floors`.

The floors are written once, as `>=` bounds in pyproject.toml's dependencies; this turns the floors of the
packages whose internals the project relies on (`CHECKED`) into `name==floor` lines, so that a venv installed
with them runs the suite on the oldest versions the project claims to support.

    python3 tools/floor_constraints.py [pyproject.toml] > floors.txt
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (pyproject.toml admits it): pip, in every fresh venv, vendors tomli
    from pip._vendor import tomli as tomllib

# DeepSpeed (engine, ZeRO-3 checkpoint layout, op table), Ray (Train V2 results, elastic ranges, token auth)
# and MLflow (runs, nested runs, metric history): the libraries whose behaviour the suite pins down.
CHECKED = ("deepspeed", "mlflow", "ray")
DEFAULT_PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_FLOOR = re.compile(r"\s*[A-Za-z0-9][A-Za-z0-9._-]*\s*(\[[^\]]*\])?\s*>=\s*([0-9][^,;\s]*)\s*")


def floor_constraints(pyproject: Path = DEFAULT_PYPROJECT, names: tuple[str, ...] = CHECKED) -> list[str]:
    """`name==floor` for each of `names`, from its `name>=floor` dependency in `pyproject` (one bound, no
    other specifier); a missing package or another form raises ValueError naming the file and the entry."""
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    found: dict[str, str] = {}
    for entry in dependencies:
        name = _NAME.match(entry).group(1).lower()
        if name not in names:
            continue
        match = _FLOOR.fullmatch(entry)
        if match is None:
            raise ValueError(f"{pyproject}: project.dependencies {entry!r}: a checked package needs exactly one "
                             f"'>=' floor and no other bound")
        found[name] = match.group(2)
    missing = [name for name in names if name not in found]
    if missing:
        raise ValueError(f"{pyproject}: project.dependencies has no floor for {', '.join(missing)}")
    return [f"{name}=={found[name]}" for name in names]


if __name__ == "__main__":
    print("\n".join(floor_constraints(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_PYPROJECT)))
