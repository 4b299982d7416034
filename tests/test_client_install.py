"""`pip install '.[client]'` into a fresh venv gives a working client: without the server's
packages, and without `make proto` (the build hook, setup.py, generates the stubs)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, encode

# What the build does not need and would only slow the copy down.
LEFT_OUT = ("models/", "bench/results/")


def project_name(requirement: str) -> str:
    return requirement.split("==")[0].lower()


def source_tree(destination: Path) -> Path:
    """The project as a clone has it: git's tracked and unignored files (no stubs, no venv, no build/)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO_ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in listed:
        source = REPO_ROOT / name
        if name and not name.startswith(LEFT_OUT) and source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    assert not (destination / "serving" / "proto").exists()
    return destination


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    """A fresh venv with `pip install '<project>[client]'` and nothing else."""
    work = tmp_path_factory.mktemp("client-install")
    tree = source_tree(work / "src")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    installed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"{tree}[client]"],
                               cwd=work, capture_output=True, text=True, env=env, timeout=600)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return venv


def in_venv(venv: Path, *argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run([str(venv / "bin" / argv[0]), *argv[1:]], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=120)


def test_the_client_extra_brings_the_client_and_not_the_server(client_venv, tmp_path):
    packages = in_venv(client_venv, "python", "-m", "pip", "list", "--format", "json", cwd=tmp_path)
    names = {package["name"].lower() for package in json.loads(packages.stdout)}
    assert {"grpcio", "protobuf", "numpy", "pillow", "tqdm"} <= names
    assert not names & {"onnxruntime", "prometheus-client", "uvloop", "tensorflow-cpu", "grpcio-tools"}
    stubs = in_venv(client_venv, "python", "-c",
                    "import serving.proto.cifar10.classifier.v1.classifier_pb2_grpc as s, pathlib;"
                    "print(pathlib.Path(s.__file__).with_name('classifier_pb2.pyi').exists())", cwd=tmp_path)
    assert stubs.stdout.strip() == "True", stubs.stderr  # generated at build time, type stubs included


def test_the_installed_cli_and_api_classify_against_a_real_server(client_venv, server, test_slice, tmp_path):
    for index in range(3):
        (tmp_path / f"{index}.png").write_bytes(encode(test_slice.images[index]))
    run = in_venv(client_venv, "cifar10-classify", str(tmp_path), "--target", server.target,
                  "--output", str(tmp_path / "rows.jsonl"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [row["model"] for row in rows] == ["cifar10"] * 3
    api = in_venv(client_venv, "python", "-c",
                  f"from serving.client import Classifier\n"
                  f"with Classifier({server.target!r}) as c: print(c.classify({str(tmp_path / '0.png')!r}).label)",
                  cwd=tmp_path)
    assert api.returncode == 0 and api.stdout.strip() == rows[0]["label"], api.stderr


def test_the_client_extra_pins_what_it_shares_with_the_server_at_the_same_versions():
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    serving = {project_name(r): r for r in extras["serving"]}
    constraints = (REPO_ROOT / "constraints.txt").read_text().splitlines()
    for requirement in extras["client"]:
        assert "==" in requirement and requirement in constraints, requirement
        if project_name(requirement) in serving:
            assert serving[project_name(requirement)] == requirement
