"""Print the pinned requirements of pyproject.toml extras, one per line (for image builds).

`python docker/extra_requirements.py serving` is the CPU image's list; the GPU image swaps
onnxruntime for onnxruntime-gpu: `... serving gpu --drop onnxruntime` (both wheels provide
the `onnxruntime` module, so they must never be installed together).
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def project_name(requirement: str) -> str:
    return re.split(r"[=<>!~\[; ]", requirement, maxsplit=1)[0].strip().lower()


def requirements(extras: list[str], drop: list[str], pyproject: Path = PYPROJECT) -> list[str]:
    optional = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        raise SystemExit(f"no such extra in {pyproject.name}: {', '.join(unknown)}")
    dropped = {name.lower() for name in drop}
    return [req for extra in extras for req in optional[extra] if project_name(req) not in dropped]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extras", nargs="+", help="extras of pyproject.toml, e.g. serving")
    parser.add_argument("--drop", action="append", default=[], help="leave this project out (repeatable)")
    args = parser.parse_args(argv)
    print("\n".join(requirements(args.extras, args.drop)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
