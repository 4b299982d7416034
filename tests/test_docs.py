"""The README and docs/*.md tell the truth about the code they describe.

What is checked, in README.md and every docs/*.md:

- **make targets**: every `make TARGET` in code (inline or fenced) is a target of the Makefile.
- **flags**: on a command line that runs one of our CLIs (`python -m serving`, `serving.client`
  and its `explain` subcommand, `serving.healthcheck`, `training.*`, `bench`, `tests.*`; a
  repository script `python path/to/script.py`; `make serve|train|train-fast|average|export|cost|
  evaluate ARGS="..."`, `BENCH_ARGS`, `BENCH_SERVER_FLAGS`), every `--flag` must be one that CLI
  takes: the options listed by its `--help` usage (a script's: its `add_argument` literals).
  Anywhere else (prose, inline code, code lines of no CLI of ours), a `--flag` must be an option
  of one of our CLIs, or another tool's flag listed in OTHER_TOOLS' FLAGS with the tool named.
  Code lines that run another tool (docker, podman, kubectl, grpcurl, pip, ...) are not checked.
  A block fenced `bash at=<commit>` documents the commands of an older commit: its flags must
  appear in the module's source at that commit instead.
- **metrics**: every `classifier_*` name is a family the server declares on /metrics (or a
  histogram's `_bucket`/`_sum`/`_count` series; `classifier_shadow_*` is a prefix of some). The
  server declares every family (HELP and TYPE) from its start, before any traffic, including
  those whose series appear only with traffic (requests, shadow comparisons, drift windows): so
  the names are read from a fresh server's declarations. docs/monitoring.md names every family.
- **the configuration table** of docs/configuration.md is what `tools/config_docs.py` generates
  from the argparse definitions.
- **links**: every relative link points at a file of the checkout.
- **the README** is a front door: at most 250 lines, `make serve` and `make test` in its first 15.

**Runnable blocks.** A fenced block whose info string has the word `runnable` is run:
`bash runnable` with `bash -euo pipefail`, `python runnable` with this venv's Python,
`python runnable triton` with `.venv-triton`'s (Triton's client needs protobuf < 7; `make test`
builds that venv; without it those blocks skip, saying so). One server runs for all of them:
`python -m serving` on the shipped models, started by the harness on free loopback ports (the
defaults of `make serve` otherwise, one onnxruntime thread). In each block:

- `localhost:50051` is replaced by that server's `127.0.0.1:PORT`, and `localhost:9090` by its
  metrics address; `CIFAR10_TARGET` and `CIFAR10_METRICS_TARGET` hold the same addresses, for
  blocks that would rather read them;
- the block runs from the repository root (so `docs/explain/cat.png` and the other committed
  files are at hand) with the venv's `bin/` first on PATH (`python`, `grpcurl`), and `TMPDIR`
  a fresh directory: a block writes its files there, never into the checkout;
- it passes when it exits 0 within 60 s.
"""

from __future__ import annotations

import ast
import concurrent.futures
import os
import re
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, ServerProcess
from tools import config_docs

DOC_FILES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
TRITON_PYTHON = REPO_ROOT / ".venv-triton" / "bin" / "python"
BLOCK_TIMEOUT_S = 60

# `make TARGET ARGS="..."`: the CLI the target runs, which the flags in ARGS go to.
MAKE_ARGS_GO_TO = {"serve": "serving", "train": "training.train", "train-fast": "training.train",
                   "average": "training.average", "export": "training.export", "evaluate": "training.evaluate",
                   "cost": "training.cost"}
MAKE_VARIABLES_WITH_FLAGS = {"BENCH_ARGS": "bench", "BENCH_SERVER_FLAGS": "serving"}
CONSOLE_SCRIPTS = {"cifar10-serve": "serving", "cifar10-classify": "serving.client"}  # pyproject.toml
OUR_PACKAGES = ("serving", "training", "bench", "tests", "tools")
OTHER_MODULES = {"pytest", "pip", "venv", "grpc_tools.protoc", "json.tool"}  # python -m of other tools
# Code lines starting with these run another tool: their flags are that tool's business.
OTHER_COMMANDS = {"docker", "podman", "podman-compose", "kubectl", "grpcurl", "curl", "pip", "git", "debootstrap",
                  "tar", "promtool", "apt-get", "kill", "cp", "mkdir", "base64", "head", "ps", "sed", "awk"}
# Other tools' flags that the docs name outside their command lines: flag -> the tool.
OTHER_TOOLS = {
    "format": "podman build (--format docker)",
    "read-only": "podman/docker run",
    "read-only-tmpfs": "podman run",
    "ulimit": "podman/docker run",
    "stop-timeout": "podman/docker run",
    "network": "podman/docker run (--network host)",
    "no-build": "compose up",
    "build-arg": "podman/docker build",
    "rm": "podman/docker run",
}
# Every CLI of ours, whose options the flags outside command lines may name.
OUR_CLIS = ("serving", "serving.client", "serving.healthcheck", "training.train", "training.export",
            "training.quantize", "training.evaluate", "training.average", "training.trust", "bench",
            "tests.faithfulness")

FENCE = re.compile(r"^\s*(`{3,}(?=[^`]*$)|~{3,})(.*)$")  # a backtick fence's info string has no backtick
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)")
METRIC = re.compile(r"\bclassifier_(?!pb2)[a-z0-9_]*[a-z0-9]\b")  # classifier_pb2: the generated stubs
METRIC_PREFIX = re.compile(r"\b(classifier_[a-z0-9_]*)\*")
LINK = re.compile(r"\]\(([^)\s]+)\)")
SEPARATORS = re.compile(r"\s(?:&&|\|\||\||;)\s|;$")
PYTHON_CALL = re.compile(r"(?:^|[\s(`\"'])(?:[\w./-]*/)?python3?(?:\.\d+)?\s+(?:-m\s+([\w.]+)|([\w./-]+\.py))\b(.*)$")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    info: tuple[str, ...]
    text: str

    @property
    def language(self) -> str:
        return self.info[0] if self.info else ""

    @property
    def at_commit(self) -> str | None:
        return next((word.split("=", 1)[1] for word in self.info if word.startswith("at=")), None)

    def __str__(self) -> str:
        return f"{self.path.relative_to(REPO_ROOT)}:{self.line}"


@dataclass(frozen=True)
class Code:
    """A piece of code the docs show: a logical line of a shell block, or an inline code span."""
    where: str
    text: str
    at_commit: str | None = None


@dataclass
class Doc:
    path: Path
    blocks: list[Block]
    prose: list[tuple[int, str]]  # (line number, text outside fenced blocks)

    def paragraphs(self) -> list[tuple[int, str]]:
        """(first line number, text) of each run of non-blank prose lines: an inline code span may
        wrap onto the next line."""
        found, start, lines, previous = [], 0, [], -1
        for number, line in self.prose:
            if not line.strip() or number != previous + 1 or line.lstrip().startswith("|"):
                if lines:
                    found.append((start, " ".join(lines)))
                start, lines = number, []
            if line.strip():
                if not lines:
                    start = number
                lines.append(line.strip())
            previous = number
        if lines:
            found.append((start, " ".join(lines)))
        return found


@cache
def read_doc(path: Path) -> Doc:
    blocks, prose, lines = [], [], path.read_text().splitlines()
    index = 0
    while index < len(lines):
        opened = FENCE.match(lines[index])
        if not opened:
            prose.append((index + 1, lines[index]))
            index += 1
            continue
        fence, info = opened.group(1), opened.group(2).split()
        body, index = [], index + 1
        while index < len(lines) and not lines[index].strip().startswith(fence):
            body.append(lines[index])
            index += 1
        blocks.append(Block(path, index - len(body), tuple(info), "\n".join(body)))
        index += 1
    return Doc(path, blocks, prose)


def docs() -> list[Doc]:
    return [read_doc(path) for path in DOC_FILES]


def code_pieces() -> list[Code]:
    """Every logical line of the shell blocks and every inline code span."""
    pieces = []
    for doc in docs():
        for block in doc.blocks:
            if block.language not in ("", "bash", "sh", "shell", "console"):
                continue
            logical = re.sub(r"\\\n\s*", " ", block.text)
            for offset, line in enumerate(logical.splitlines()):
                pieces.append(Code(f"{block}+{offset}", line, block.at_commit))
        for number, paragraph in doc.paragraphs():
            for span in INLINE_CODE.finditer(paragraph):
                pieces.append(Code(f"{doc.path.relative_to(REPO_ROOT)}:{number}", span.group(2)))
    return pieces


def without_comment(line: str) -> str:
    return re.split(r"(?:^|\s)#\s", line, maxsplit=1)[0]


# ---- what our CLIs take ---------------------------------------------------------------------

def help_options(argv: list[str]) -> set[str]:
    """The options in the usage block of `argv --help` (the usage lists every option; the
    description may name other programs' flags, so it is not read)."""
    done = subprocess.run(argv + ["--help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0, f"{' '.join(argv)} --help failed:\n{done.stderr[-2000:]}"
    usage = done.stdout.split("\n\n", 1)[0]
    return set(FLAG.findall(usage)) | {"help"}  # it just answered --help (the usage says -h)


def module_help_argvs(module: str) -> list[list[str]]:
    argvs = [[sys.executable, "-m", module]]
    if module == "serving.client":
        argvs.append([sys.executable, "-m", module, "explain"])
    return argvs


@cache
def options_of_modules(modules: frozenset[str]) -> dict[str, set[str]]:
    """{module: its options}, the --help runs in parallel (training's import TensorFlow)."""
    jobs = {(module, i): argv for module in modules for i, argv in enumerate(module_help_argvs(module))}
    found: dict[str, set[str]] = {module: set() for module in modules}
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        for (module, _), options in zip(jobs, pool.map(help_options, jobs.values())):
            found[module] |= options
    return found


def script_options(source: str) -> set[str]:
    """The `--flags` of a script's argparse definitions (string literals given to add_argument)."""
    options = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("--"):
                    options.add(arg.value[2:])
    return options


def source_at(commit: str, module: str) -> str:
    relative = module.replace(".", "/")
    for candidate in (f"{relative}.py", f"{relative}/__main__.py"):
        shown = subprocess.run(["git", "show", f"{commit}:{candidate}"], cwd=REPO_ROOT, capture_output=True, text=True)
        if shown.returncode == 0:
            return shown.stdout
    raise AssertionError(f"{module} is not in commit {commit}")


@dataclass(frozen=True)
class Invocation:
    where: str
    cli: str  # a module ("serving"), or a script path ("examples/x.py")
    flags: tuple[str, ...]
    at_commit: str | None


def invocations_and_loose_flags() -> tuple[list[Invocation], list[tuple[str, str]], list[tuple[str, str]]]:
    """(our CLIs' command lines, flags outside them, make targets), from every code piece."""
    calls, loose, targets = [], [], []
    for piece in code_pieces():
        for segment in SEPARATORS.split(without_comment(piece.text)):
            words = segment.split()
            first = next((w for w in words if not re.match(r"^[A-Z_][A-Z0-9_]*=", w)), "")
            python = PYTHON_CALL.search(segment)
            make = re.search(r"(?:^|\s)make((?:\s+(?:[A-Z_][A-Z0-9_]*=(?:\"[^\"]*\"|'[^']*'|\S*)|[a-z][\w-]*))*)", segment)
            if python:
                module, script, rest = python.groups()
                if module and module.split(".")[0] not in OUR_PACKAGES:
                    assert module in OTHER_MODULES, f"{piece.where}: python -m {module}: not ours, not a known tool"
                    continue
                calls.append(Invocation(piece.where, module or script, tuple(FLAG.findall(rest)), piece.at_commit))
            elif first in CONSOLE_SCRIPTS:
                calls.append(Invocation(piece.where, CONSOLE_SCRIPTS[first], tuple(FLAG.findall(segment)), piece.at_commit))
            elif make:
                words_after = re.findall(r"([A-Z_][A-Z0-9_]*)=(\"[^\"]*\"|'[^']*'|\S*)|([a-z][\w-]*)", make.group(1))
                made = [target for _, _, target in words_after if target]
                targets.extend((piece.where, target) for target in made)
                for name, value, _ in words_after:
                    if name == "ARGS":
                        for target in made:
                            assert target in MAKE_ARGS_GO_TO, f"{piece.where}: make {target} takes no ARGS"
                            calls.append(Invocation(piece.where, MAKE_ARGS_GO_TO[target], tuple(FLAG.findall(value)),
                                                    piece.at_commit))
                    elif name in MAKE_VARIABLES_WITH_FLAGS:
                        calls.append(Invocation(piece.where, MAKE_VARIABLES_WITH_FLAGS[name],
                                                tuple(FLAG.findall(value)), piece.at_commit))
            elif first.rsplit("/", 1)[-1] not in OTHER_COMMANDS:
                loose.extend((piece.where, flag) for flag in FLAG.findall(segment))
    return calls, loose, targets


def prose_flags() -> list[tuple[str, str]]:
    found = []
    for doc in docs():
        for number, paragraph in doc.paragraphs():
            outside_code = INLINE_CODE.sub(" ", paragraph)
            found.extend((f"{doc.path.relative_to(REPO_ROOT)}:{number}", flag) for flag in FLAG.findall(outside_code))
    return found


def our_modules_options() -> dict[str, set[str]]:
    calls, _, _ = invocations_and_loose_flags()
    modules = {call.cli for call in calls if not call.cli.endswith(".py") and call.at_commit is None}
    return options_of_modules(frozenset(modules | set(OUR_CLIS)))


# ---- the tests --------------------------------------------------------------------------------

def test_every_make_target_named_in_the_docs_exists():
    makefile = (REPO_ROOT / "Makefile").read_text()
    defined = set(re.findall(r"^([a-z][\w-]*)\s*:(?!=)", makefile, re.MULTILINE))
    _, _, targets = invocations_and_loose_flags()
    assert targets, "no make target found in the docs: the parser is broken"
    missing = sorted({f"{where}: make {target}" for where, target in targets if target not in defined})
    assert not missing, "make targets that do not exist:\n" + "\n".join(missing)


def test_every_flag_on_a_command_line_of_ours_is_one_that_command_takes():
    calls, _, _ = invocations_and_loose_flags()
    options = our_modules_options()
    wrong = []
    for call in calls:
        if call.at_commit:
            source = source_at(call.at_commit, call.cli) if not call.cli.endswith(".py") else ""
            known = {flag for flag in call.flags if f'"--{flag}"' in source}
        elif call.cli.endswith(".py"):
            path = REPO_ROOT / call.cli
            assert path.is_file(), f"{call.where}: {call.cli} is not in the checkout"
            known = script_options(path.read_text())
        else:
            known = options[call.cli]
        wrong += [f"{call.where}: {call.cli} --{flag}" for flag in call.flags if flag not in known]
    assert len(calls) > 20, f"only {len(calls)} command lines found: the parser is broken"
    assert not wrong, "flags the command does not take:\n" + "\n".join(wrong)


def test_every_other_flag_the_docs_name_is_ours_or_a_named_tools():
    _, loose, _ = invocations_and_loose_flags()
    ours = set().union(*our_modules_options().values())
    wrong = sorted({f"{where}: --{flag}" for where, flag in loose + prose_flags()
                    if flag not in ours and flag not in OTHER_TOOLS})
    assert not wrong, "flags that no CLI of ours takes (and no listed tool):\n" + "\n".join(wrong)


@pytest.fixture(scope="module")
def docs_server():
    proc = ServerProcess()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def declared_families(docs_server) -> dict[str, str]:
    """{family: type} from the HELP/TYPE declarations of a server that has had no traffic."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{docs_server.metrics_port}/metrics", timeout=5).read().decode()
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))


def test_every_metric_the_docs_name_exists(declared_families):
    names = set(declared_families)
    names |= {family + suffix for family, kind in declared_families.items() if kind == "histogram"
              for suffix in HISTOGRAM_SUFFIXES}
    wrong, seen = [], 0
    for doc in docs():
        text = doc.path.read_text()
        for match in METRIC.finditer(text):
            seen += 1
            if match.group(0) not in names:
                wrong.append(f"{doc.path.name}: {match.group(0)}")
        for match in METRIC_PREFIX.finditer(text):
            if not any(name.startswith(match.group(1)) for name in names):
                wrong.append(f"{doc.path.name}: {match.group(1)}*")
    assert seen > 50, "hardly any metric found in the docs: the pattern is broken"
    assert not wrong, "metrics the server does not have:\n" + "\n".join(sorted(set(wrong)))


def test_the_monitoring_page_names_every_metric_family(declared_families):
    page = (REPO_ROOT / "docs" / "monitoring.md").read_text()
    assert len(declared_families) > 20
    missing = sorted(family for family in declared_families if f"`{family}`" not in page)
    assert not missing, "families docs/monitoring.md does not describe: " + ", ".join(missing)


def test_the_configuration_table_is_generated_from_the_flags():
    page = (REPO_ROOT / "docs" / "configuration.md").read_text()
    assert config_docs.generated_section(page) == config_docs.table(), \
        "docs/configuration.md is out of date: run .venv/bin/python tools/config_docs.py --write"


def test_the_configuration_page_documents_exactly_the_flags_of_python_m_serving():
    page = (REPO_ROOT / "docs" / "configuration.md").read_text()
    documented = set(re.findall(r"^\| `--([a-z0-9-]+)` \|", page, re.MULTILINE))
    served = help_options([sys.executable, "-m", "serving"]) - {"help"}
    assert len(served) > 30
    assert documented == served


def test_every_relative_link_points_at_a_file():
    broken = []
    for doc in docs():
        for number, line in doc.prose:
            for target in LINK.findall(line):
                if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                    continue
                path = (doc.path.parent / target.split("#", 1)[0]).resolve()
                if not path.exists():
                    broken.append(f"{doc.path.relative_to(REPO_ROOT)}:{number}: {target}")
    assert not broken, "links to files that are not there:\n" + "\n".join(broken)


def test_the_readme_is_a_front_door():
    lines = (REPO_ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250
    opening = "\n".join(lines[:15])
    assert "make serve" in opening and "make test" in opening


def runnable_blocks() -> list[Block]:
    return [block for doc in docs() for block in doc.blocks if "runnable" in block.info]


@pytest.mark.parametrize("block", runnable_blocks(), ids=str)
def test_a_runnable_block_runs_against_a_real_server(block, docs_server, tmp_path):
    metrics = f"127.0.0.1:{docs_server.metrics_port}"
    text = block.text.replace("localhost:50051", docs_server.target).replace("localhost:9090", metrics)
    env = {**os.environ, "CIFAR10_TARGET": docs_server.target, "CIFAR10_METRICS_TARGET": metrics,
           "TMPDIR": str(tmp_path), "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
    if block.language == "bash":
        argv = ["bash", "-euo", "pipefail", "-c", text]
    elif block.language == "python":
        python = sys.executable
        if "triton" in block.info:
            if not TRITON_PYTHON.exists():
                pytest.skip(f"{TRITON_PYTHON.relative_to(REPO_ROOT)} is missing: make test (or make test-v2) builds it")
            python = str(TRITON_PYTHON)
        script = tmp_path / "block.py"
        script.write_text(text)
        argv = [python, str(script)]
    else:
        raise AssertionError(f"{block}: runnable blocks are bash or python, not {block.language!r}")
    done = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    assert done.returncode == 0, f"{block} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
