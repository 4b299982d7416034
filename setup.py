"""The build hook: `pip install .` (and `pip install -e .`) generates the gRPC stubs.

The stubs (serving/proto) are never committed, so a wheel built from a clean tree would lack
them; this build_py runs tools/generate_protos.py with the grpcio-tools that
[build-system] requires pins. A wheel gets them in its build directory; an editable install
gets them in place, in serving/proto, where `make proto` puts them too. Everything else about
the project is in pyproject.toml.
"""

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tools"))
from generate_protos import generate  # noqa: E402 - tools/ is not a package


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        super().run()
        package_root = ROOT if self.editable_mode else Path(self.build_lib)
        generate(package_root / "serving" / "proto")


setup(cmdclass={"build_py": BuildPyWithStubs})
