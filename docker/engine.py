#!/usr/bin/env python3
"""Builds and starts this project's images with whichever container engine works on this machine.

    python3 docker/engine.py probe              the engine that works here (exit 1, and why, if none)
    python3 docker/engine.py build              the CPU image cifar10-serving:cpu (`make image`)
    python3 docker/engine.py compose up|down    docker/compose.yaml (`make compose-up` / `compose-down`)

The engine is docker where its daemon answers (`docker info`), else podman (CONTAINER_ENGINE
chooses one). A CLI alone proves nothing: some machines have a docker client and no daemon.

Bases are the official images wherever they can be pulled. Where no registry can be reached,
local stand-ins are built from Debian packages, each once per machine and found by its tag
afterwards: the Python base with debootstrap (from the Debian mirror that apt already uses,
read from the apt sources) and Prometheus from Debian's package on that base. No image of
Grafana can be made from Debian packages, so compose starts without it and says why.
docs/deploy.md tells the whole story. Standard library only: the host's python3 runs it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

DOCKER_DIR = Path(__file__).resolve().parent
REPO_ROOT = DOCKER_DIR.parent
DOCKERFILE = DOCKER_DIR / "Dockerfile"
COMPOSE_FILE = DOCKER_DIR / "compose.yaml"
PROMETHEUS_DOCKERFILE = DOCKER_DIR / "prometheus" / "Dockerfile.debian"
CPU_IMAGE = "cifar10-serving:cpu"

# The local stand-ins. Bump a tag's revision when its recipe changes, so machines rebuild it.
LOCAL_PYTHON_BASE = "cifar10-serving-base:bookworm-python3.11-r1"
LOCAL_PROMETHEUS = "cifar10-serving-prometheus:bookworm-r1"
DEBIAN_SUITE = "bookworm"  # its python3 is 3.11, as pyproject.toml requires
BASE_PACKAGES = "python3,python3-venv,python3-pip,python-is-python3,ca-certificates"
BASE_CA_BUNDLE = "/etc/ssl/host-ca-bundle.pem"  # the build host's CAs, for pip inside builds
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
# Each container's open files and processes. Podman asks for a million open files by default,
# which runc cannot set in some sandboxes ("error setting rlimits"); compose.yaml sets the same.
ULIMITS = ("nofile=4096:4096", "nproc=4096:4096")
# Where registries are out of reach a pull usually fails at once (no DNS); where they are
# firewalled it hangs, and a build should fall back to the local stand-ins instead of waiting.
PULL_TIMEOUT_S = 300


def logged(argv: list[str], out: TextIO, **options) -> subprocess.CompletedProcess:
    """Runs `argv` with its stdout and stderr in `out`, after what `out` already holds."""
    out.flush()
    return subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, text=True, **options)


def last_words(finished: subprocess.CompletedProcess) -> str:
    """What a failed command said last (its last non-empty line of stderr), or its exit code."""
    said = [line.strip() for line in (finished.stderr or "").splitlines() if line.strip()]
    return said[-1] if said else f"exit {finished.returncode}"


class NoEngine(RuntimeError):
    """No container engine answers on this machine."""


class BuildError(RuntimeError):
    """An image could not be built (or pulled)."""


@dataclass(frozen=True)
class Engine:
    command: str  # "docker" or "podman"

    @property
    def is_podman(self) -> bool:
        return self.command == "podman"

    def argv(self, *args: str) -> list[str]:
        return [self.command, *args]

    def call(self, *args: str, out: TextIO | None = None, timeout: float | None = None
             ) -> subprocess.CompletedProcess:
        """Runs the engine; output goes to `out` (a log) or is captured when `out` is None."""
        if out is None:
            return subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout)
        return logged(self.argv(*args), out, timeout=timeout)

    @property
    def run_flags(self) -> list[str]:
        """Flags every `run` needs on this engine."""
        return [flag for limit in ULIMITS for flag in ("--ulimit", limit)] if self.is_podman else []

    @property
    def read_only_flags(self) -> list[str]:
        # Podman's --read-only also mounts tmpfs on /tmp, /run and /var/tmp unless told not to.
        return ["--read-only", "--read-only-tmpfs=false"] if self.is_podman else ["--read-only"]

    @property
    def build_flags(self) -> list[str]:
        # Podman's docker format keeps HEALTHCHECK (its OCI format drops it, with a warning).
        # Both engines read <Dockerfile>.dockerignore beside the Dockerfile by themselves.
        return ["--format", "docker"] if self.is_podman else []

    def has_image(self, ref: str) -> bool:
        return self.call("image", "inspect", ref).returncode == 0

    def pull(self, ref: str) -> str | None:
        """None when `ref` is here now; else what went wrong."""
        try:
            pulled = self.call("pull", ref, timeout=PULL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return f"no answer in {PULL_TIMEOUT_S} s"
        return None if pulled.returncode == 0 else last_words(pulled)


def probe() -> Engine:
    """The first engine whose `info` answers; NoEngine says what each candidate said."""
    chosen = os.environ.get("CONTAINER_ENGINE")
    failures = []
    for command in [chosen] if chosen else ["docker", "podman"]:
        if shutil.which(command) is None:
            failures.append(f"{command}: not installed")
            continue
        try:
            info = subprocess.run([command, "info"], capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            failures.append(f"{command}: `{command} info` gave no answer in 60 s")
            continue
        if info.returncode == 0:
            return Engine(command)
        failures.append(f"{command}: `{command} info` failed: {last_words(info)}")
    raise NoEngine("; ".join(failures))


# ---- bases: the official image, else the local stand-in ----------------------------------------

def official_or_local(engine: Engine, official: str, build_local: Callable[[Engine, TextIO], str],
                      out: TextIO) -> str:
    if engine.has_image(official):
        return official
    failure = engine.pull(official)
    if failure is None:
        return official
    print(f"cannot pull {official} ({failure}): using the local stand-in", file=out, flush=True)
    return build_local(engine, out)


def dockerfile_default(dockerfile: Path, arg: str) -> str:
    match = re.search(rf"^ARG {arg}=(\S+)$", dockerfile.read_text(), re.M)
    assert match, f"{dockerfile.name} declares no default for ARG {arg}"
    return match.group(1)


def compose_default(variable: str) -> str:
    """The default of `${VARIABLE:-default}` in compose.yaml."""
    match = re.search(rf"\$\{{{variable}:-([^}}]+)\}}", COMPOSE_FILE.read_text())
    assert match, f"{COMPOSE_FILE.name} has no ${{{variable}:-...}}"
    return match.group(1)


def python_base(engine: Engine, out: TextIO) -> str:
    """PYTHON_IMAGE if set; else the Dockerfile's default where it can be pulled; else the local base."""
    chosen = os.environ.get("PYTHON_IMAGE")
    if chosen:
        return chosen
    return official_or_local(engine, dockerfile_default(DOCKERFILE, "PYTHON_IMAGE"), local_python_base, out)


def apt_sources(files: tuple[Path, ...] = APT_SOURCES) -> list[tuple[str, str, str]]:
    """(uri, suite, components) of every enabled `deb` source, one-line and deb822 alike."""
    found: list[tuple[str, str, str]] = []
    paths = [p for f in files for p in ([f] if f.is_file() else sorted(f.glob("*")) if f.is_dir() else [])]
    for path in paths:
        text = path.read_text()
        if path.suffix == ".list":
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", "", line.split("#")[0]).split()
                if len(words) >= 3 and words[0] == "deb":
                    found.append((words[1], words[2], " ".join(words[3:])))
        elif path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^([\w-]+):[ \t]*(.*)$", stanza, re.M))
                if "deb" in fields.get("Types", "").split() and fields.get("Enabled", "yes") != "no":
                    found += [(uri, suite, fields.get("Components", ""))
                              for uri in fields.get("URIs", "").split() for suite in fields.get("Suites", "").split()]
    return found


def debian_sources(files: tuple[Path, ...] = APT_SOURCES) -> list[tuple[str, str, str]]:
    """The apt sources of DEBIAN_SUITE and its -updates/-security suites; the main suite first."""
    family = [s for s in apt_sources(files) if s[1] == DEBIAN_SUITE or s[1].startswith(f"{DEBIAN_SUITE}-")]
    return sorted(family, key=lambda source: source[1] != DEBIAN_SUITE)


def local_python_base(engine: Engine, out: TextIO) -> str:
    """Debian bookworm's python3 as a base image, pip usable as in the official image (once per machine)."""
    if engine.has_image(LOCAL_PYTHON_BASE):
        return LOCAL_PYTHON_BASE
    sources = debian_sources()
    if not sources or sources[0][1] != DEBIAN_SUITE:
        raise BuildError(f"no apt source of this machine serves Debian {DEBIAN_SUITE}: cannot debootstrap a base")
    if shutil.which("debootstrap") is None or os.geteuid() != 0:
        raise BuildError("building the local base needs root and debootstrap (apt-get install debootstrap)")
    mirror = sources[0][0]
    print(f"building {LOCAL_PYTHON_BASE} with debootstrap from {mirror}", file=out, flush=True)
    with tempfile.TemporaryDirectory(prefix="cifar10-base-", dir="/var/tmp") as scratch:
        root = Path(scratch) / "root"
        bootstrap = ["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", DEBIAN_SUITE, str(root), mirror]
        if logged(bootstrap, out).returncode != 0:
            raise BuildError(f"{' '.join(bootstrap)} failed (log above)")
        # Security and point-release updates too, from the same apt sources as this machine.
        (root / "etc/apt/sources.list").write_text("".join(f"deb {uri} {suite} {components}\n"
                                                           for uri, suite, components in sources))
        upgrade = ["chroot", str(root), "sh", "-c",
                   "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get upgrade -y -qq"
                   " && apt-get clean && rm -rf /var/lib/apt/lists/*"]
        if logged(upgrade, out).returncode != 0:
            raise BuildError("apt-get upgrade in the new base failed (log above)")
        # pip installs into the system interpreter, as in the official image (PEP 668's marker off).
        for marker in root.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
            marker.unlink()
        # Package downloads inside builds take the same TLS path as this machine's own pip.
        paths = ssl.get_default_verify_paths()
        host_bundle = Path(paths.cafile or paths.openssl_cafile)
        shutil.copyfile(host_bundle, root / BASE_CA_BUNDLE.lstrip("/"))
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        imported = logged(engine.argv("import", "--change", f"ENV PIP_CERT={BASE_CA_BUNDLE}",
                                      "--change", 'CMD ["python3"]', "-", LOCAL_PYTHON_BASE), out, stdin=tar.stdout)
        tar.stdout.close()
        if tar.wait() != 0 or imported.returncode != 0:
            raise BuildError(f"importing {LOCAL_PYTHON_BASE} failed (log above)")
    return LOCAL_PYTHON_BASE


def local_prometheus(engine: Engine, out: TextIO) -> str:
    """Debian's prometheus package on the local base, with the official image's interface (once per machine)."""
    if not engine.has_image(LOCAL_PROMETHEUS):
        base = local_python_base(engine, out)
        build(engine, PROMETHEUS_DOCKERFILE, LOCAL_PROMETHEUS, {"BASE_IMAGE": base}, out, PROMETHEUS_DOCKERFILE.parent)
    return LOCAL_PROMETHEUS


# ---- images -----------------------------------------------------------------------------------

def build(engine: Engine, dockerfile: Path, tag: str, build_args: dict[str, str], out: TextIO,
          context: Path = REPO_ROOT) -> None:
    args = [f"--build-arg={name}={value}" for name, value in build_args.items()]
    built = engine.call("build", *engine.build_flags, "-f", str(dockerfile), "-t", tag, *args,
                        str(context), out=out)
    if built.returncode != 0:
        raise BuildError(f"{engine.command} build of {tag} failed (exit {built.returncode}; log above)")


def build_cpu_image(engine: Engine, out: TextIO, tag: str = CPU_IMAGE) -> str:
    build(engine, DOCKERFILE, tag, {"PYTHON_IMAGE": python_base(engine, out)}, out)
    return tag


# ---- compose ----------------------------------------------------------------------------------

def compose_command(engine: Engine) -> list[str]:
    if not engine.is_podman:
        return ["docker", "compose"]
    # Podman 4.3 has no `podman compose`: podman-compose (pinned in pyproject.toml's dev extra),
    # beside this interpreter when a venv runs this script.
    beside = Path(sys.executable).parent / "podman-compose"
    found = str(beside) if beside.exists() else shutil.which("podman-compose")
    if found is None:
        raise NoEngine("podman-compose is not installed (make install puts it in .venv)")
    return [found]


@dataclass
class ComposeStack:
    """What `compose up` needs: the image variables to set, the services to start, and why any were left out."""
    env: dict[str, str]
    services: list[str]
    skipped: dict[str, str]


def compose_stack(engine: Engine, out: TextIO) -> ComposeStack:
    env = {"PROMETHEUS_IMAGE": os.environ.get("PROMETHEUS_IMAGE")
           or official_or_local(engine, compose_default("PROMETHEUS_IMAGE"), local_prometheus, out)}
    services, skipped = ["classifier", "prometheus"], {}
    grafana = os.environ.get("GRAFANA_IMAGE") or compose_default("GRAFANA_IMAGE")
    failure = None if engine.has_image(grafana) else engine.pull(grafana)
    if failure is None:
        env["GRAFANA_IMAGE"] = grafana
        services.append("grafana")
    else:
        skipped["grafana"] = (f"cannot pull {grafana} ({failure}), and no stand-in can be built: Debian has "
                              "no Grafana package; set GRAFANA_IMAGE to an image you have")
    return ComposeStack(env, services, skipped)


def compose(engine: Engine, action: str, out: TextIO, project: str | None = None,
            env: dict[str, str] | None = None, build_image: bool = True) -> ComposeStack | None:
    """`up`: builds the CPU image (unless told not to), then starts what can be started; `down`
    removes the stack and its volumes."""
    command = compose_command(engine) + ["-f", str(COMPOSE_FILE)] + (["-p", project] if project else [])
    if action == "down":
        logged(command + ["down", "-v"], out, env={**os.environ, **(env or {})})
        return None
    if build_image:
        build_cpu_image(engine, out)
    stack = compose_stack(engine, out)
    for service, reason in stack.skipped.items():
        print(f"not starting {service}: {reason}", file=out, flush=True)
    # The image is built above (compose's own build would take the default base).
    up = logged(command + ["up", "-d", "--no-build", *stack.services], out, env={**os.environ, **(env or {}), **stack.env})
    if up.returncode != 0:
        raise BuildError(f"compose up failed (exit {up.returncode}; log above)")
    return stack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("probe", help="print the engine that works here")
    commands.add_parser("build", help=f"build {CPU_IMAGE}")
    composing = commands.add_parser("compose", help="start or remove the compose stack")
    composing.add_argument("action", choices=["up", "down"])
    args = parser.parse_args(argv)
    try:
        engine = probe()
        if args.command == "probe":
            print(engine.command)
        elif args.command == "build":
            print(f"built {build_cpu_image(engine, sys.stdout)} with {engine.command}")
        else:
            compose(engine, args.action, sys.stdout)
    except (NoEngine, BuildError) as err:
        print(f"{parser.prog}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
