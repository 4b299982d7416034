"""The model repository: <root>/<name>/<version>/model.onnx + model_card.json. No gRPC here.

Loads every model the version policy selects, routes (name, version) to a warmed-up version,
and rescans on demand (poller, ReloadModels RPC, SIGHUP): new versions are loaded and warmed
before they take traffic, then swapped in atomically; replaced and removed versions finish
what they have queued and are released. A version that fails to load never replaces one
that works.
"""

from __future__ import annotations

import enum
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from serving.batching import DynamicBatcher
from serving.drift import DriftWindow, DriftReferenceError, read_reference
from serving.errors import InvalidInput, ModelNotFound, ModelNotReady
from serving.memory import release_freed_memory
from serving.metrics import ServingMetrics
from serving.runtime import CARD_FILE, MODEL_FILE, ModelLoadError, OnnxModel, RuntimeOptions
from serving.trust import ScoredRunner, Trust, TrustCardError

log = logging.getLogger(__name__)

MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
REPOSITORY_CONFIG = "repository.json"


class VersionState(enum.Enum):
    LOADING = 1
    AVAILABLE = 2
    UNLOADING = 3
    FAILED = 4


@dataclass(frozen=True)
class VersionPolicy:
    """latest:N | all | specific:V1,V2"""

    kind: str
    count: int = 1
    versions: frozenset[int] = frozenset()

    @classmethod
    def parse(cls, text: str) -> "VersionPolicy":
        text = text.strip().lower()
        try:
            if text == "all":
                return cls("all")
            kind, _, arg = text.partition(":")
            if kind == "latest":
                count = int(arg or 1)
                if count < 1:
                    raise ValueError
                return cls("latest", count=count)
            if kind == "specific":
                return cls("specific", versions=frozenset(int(v) for v in arg.split(",") if v.strip()))
        except ValueError:
            pass
        raise ValueError(f"bad version policy {text!r}: expected latest:N, all or specific:V1,V2")

    def select(self, versions: list[int]) -> list[int]:
        ordered = sorted(versions)
        if self.kind == "all":
            return ordered
        if self.kind == "latest":
            return ordered[-self.count:]
        return [v for v in ordered if v in self.versions]


@dataclass(frozen=True)
class BatchingOptions:
    max_batch_size: int = 64
    max_delay_s: float = 0.0
    max_queue_images: int = 1024


@dataclass(eq=False)
class ServedVersion:
    name: str
    version: int
    directory: Path
    state: VersionState
    fingerprint: tuple = ()
    error: str = ""
    model: OnnxModel | None = None
    batcher: DynamicBatcher | None = None
    trust: Trust | None = None  # calibration and the unsure rule, from the card
    window: DriftWindow | None = None  # what it served lately, for the drift scores
    loaded_at: float = field(default_factory=time.time)


def validate_model_name(name: str) -> str:
    if not MODEL_NAME_PATTERN.match(name):
        raise InvalidInput(
            f"model name {name[:80]!r} is not valid: use 1-64 letters, digits, '_', '-', '.', starting "
            "with a letter or digit",
            reason="bad_model_name",
        )
    return name


def fingerprint(directory: Path) -> tuple:
    """What changes when a version's files are replaced."""
    parts = []
    for name in (MODEL_FILE, CARD_FILE):
        try:
            st = (directory / name).stat()
            parts.append((name, st.st_size, st.st_mtime_ns, st.st_ino))
        except OSError:
            parts.append((name, None))
    return tuple(parts)


class ModelRepository:
    def __init__(
        self,
        root: Path,
        runtime: RuntimeOptions,
        batching: BatchingOptions,
        metrics: ServingMetrics,
        default_model: str,
        version_policy: str = "latest:1",
        drift_window: int = 512,
    ):
        self.root = Path(root)
        self.runtime, self.batching, self.metrics = runtime, batching, metrics
        self.default_model = default_model
        self.default_policy = VersionPolicy.parse(version_policy)
        self.drift_window = drift_window
        # Copy-on-write: readers take a snapshot without a lock; only scan() replaces them.
        self._routes: dict[str, dict[int, ServedVersion]] = {}
        self._versions: dict[tuple[str, int], ServedVersion] = {}
        self._scan_lock = threading.Lock()
        self._closed = False

    # ---- reading (hot path) -------------------------------------------------------------
    def resolve(self, name: str, version: int = 0) -> ServedVersion:
        """The AVAILABLE version to serve: `version` 0 means the newest available."""
        name = name or self.default_model
        routes = self._routes.get(name)
        if routes is None:
            validate_model_name(name)
            known = ", ".join(sorted(self._routes)) or "none"
            if any(key[0] == name for key in self._versions):
                raise ModelNotReady(f"model {name!r} has no available version yet: {self._state_words(name)}")
            raise ModelNotFound(f"model {name!r} is not in the repository (available: {known})")
        if version == 0:
            return routes[max(routes)]
        served = routes.get(version)
        if served is None:
            if version < 0:
                raise InvalidInput(f"model_version must be >= 0 (0: newest), got {version}", reason="bad_version")
            entry = self._versions.get((name, version))
            if entry is not None:
                raise ModelNotReady(f"model {name!r} version {version} is {entry.state.name}: {entry.error or 'not ready'}")
            raise ModelNotFound(
                f"model {name!r} has no version {version} (available: {', '.join(map(str, sorted(routes)))})"
            )
        return served

    def _state_words(self, name: str) -> str:
        return "; ".join(
            f"v{v.version} {v.state.name}" + (f" ({v.error})" if v.error else "")
            for key, v in sorted(self._versions.items()) if key[0] == name
        )

    def statuses(self) -> list[ServedVersion]:
        return [self._versions[key] for key in sorted(self._versions)]

    def ready(self) -> bool:
        """SERVING: the default model has an available version."""
        return bool(self._routes.get(self.default_model))

    # ---- scanning ------------------------------------------------------------------------
    def _policies(self) -> dict[str, VersionPolicy]:
        path = self.root / REPOSITORY_CONFIG
        if not path.exists():
            return {}
        try:
            raw = json.loads(path.read_text())
            return {name: VersionPolicy.parse(spec["version_policy"]) for name, spec in raw.get("models", {}).items()}
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
            log.error("ignoring %s: %s", path, exc)
            return {}

    def discover(self) -> dict[str, dict[int, Path]]:
        """Every valid version directory on disk: {name: {version: directory}}."""
        found: dict[str, dict[int, Path]] = {}
        if not self.root.is_dir():
            log.error("model repository %s is not a directory", self.root)
            return found
        root = self.root.resolve()
        for model_dir in sorted(self.root.iterdir()):
            if not model_dir.is_dir() or model_dir.name.startswith("."):
                continue
            if not MODEL_NAME_PATTERN.match(model_dir.name):
                log.warning("skipping %r: not a valid model name", model_dir.name)
                continue
            versions: dict[int, Path] = {}
            for version_dir in model_dir.iterdir():
                if not version_dir.name.isdigit() or not version_dir.is_dir() or int(version_dir.name) < 1:
                    continue  # temp dirs being published (e.g. ".3.tmp") are ignored
                resolved = version_dir.resolve()
                if not resolved.is_relative_to(root):
                    log.error("skipping %s: it points outside the repository (%s)", version_dir, resolved)
                    continue
                versions[int(version_dir.name)] = version_dir
            if versions:
                found[model_dir.name] = versions
        return found

    def scan(self) -> list[ServedVersion]:
        """Bring the served set in line with the disk; returns the statuses afterwards."""
        with self._scan_lock:
            if self._closed:
                return self.statuses()
            on_disk = self.discover()
            policies = self._policies()
            wanted: dict[tuple[str, int], Path] = {}
            for name, versions in on_disk.items():
                for version in policies.get(name, self.default_policy).select(list(versions)):
                    wanted[(name, version)] = versions[version]
            for key, directory in sorted(wanted.items()):
                current = self._versions.get(key)
                fp = fingerprint(directory)
                if current is not None and current.fingerprint == fp:
                    continue
                self._load(key, directory, fp, replacing=current)
            for key in [k for k in self._versions if k not in wanted]:
                name, version = key
                still_on_disk = version in on_disk.get(name, {})
                if still_on_disk and not self._has_available_wanted(name, wanted):
                    # Out of policy, but nothing newer loaded: a broken new version must not
                    # take down the one that works.
                    continue
                self._unload(self._versions[key])
            return self.statuses()

    def _has_available_wanted(self, name: str, wanted: dict[tuple[str, int], Path]) -> bool:
        return any(
            key[0] == name and key in wanted and served.state is VersionState.AVAILABLE
            for key, served in self._versions.items()
        )

    def _load(self, key: tuple[str, int], directory: Path, fp: tuple, replacing: ServedVersion | None) -> None:
        name, version = key
        serving_old = replacing is not None and replacing.state is VersionState.AVAILABLE
        if not serving_old:
            self._set_version(ServedVersion(name, version, directory, VersionState.LOADING, fp))
        started = time.perf_counter()
        try:
            model = OnnxModel(name, version, directory, self.runtime)
            try:
                trust = Trust.from_card(model.card.raw, model.output_names, model.num_classes)
                window = DriftWindow(read_reference(model.card.raw.get("drift_reference")), self.drift_window)
            except (TrustCardError, DriftReferenceError) as exc:
                raise ModelLoadError(f"{CARD_FILE}: {exc}") from None
            sizes = model.warm_up(self.batching.max_batch_size)
        except ModelLoadError as exc:
            self.metrics.model_load_failures.labels(name).inc()
            if serving_old:
                log.error("reload of %s v%d failed, the loaded version keeps serving: %s", name, version, exc)
                replacing.error = f"reload failed, previous file keeps serving: {exc}"
                replacing.fingerprint = fp  # don't retry until the files change again
            else:
                log.error("model %s v%d failed to load: %s", name, version, exc)
                self._set_version(ServedVersion(name, version, directory, VersionState.FAILED, fp, error=str(exc)))
            return
        seconds = time.perf_counter() - started
        batcher = DynamicBatcher(
            ScoredRunner(model, trust, window), self.batching.max_batch_size, self.batching.max_delay_s, self.batching.max_queue_images,
            observer=self.metrics.observer_for(name, version), name=f"{name}-v{version}",
        )
        served = ServedVersion(name, version, directory, VersionState.AVAILABLE, fp, model=model, batcher=batcher,
                               trust=trust, window=window)
        self.metrics.drift.add(name, version, window)
        self.metrics.queue_capacity.labels(name, str(version)).set(self.batching.max_queue_images)
        self.metrics.model_loads.labels(name).inc()
        self.metrics.model_load_seconds.labels(name).observe(seconds)
        if replacing is not None and replacing.model is not None:
            self.metrics.model_unloaded(name, version, replacing.model.sha256, replacing.model.providers)
        self.metrics.model_loaded(name, version, model.sha256, model.providers, model.on_gpu)
        self._set_version(served)  # the swap: new requests now reach the new session
        log.info(
            "model %s v%d AVAILABLE in %.2fs on %s (sha256 %s, warmed batch sizes %s)",
            name, version, seconds, ", ".join(model.providers), model.sha256[:12], sizes,
        )
        if serving_old:
            self._release(replacing)

    def _set_version(self, served: ServedVersion) -> None:
        key = (served.name, served.version)
        versions = dict(self._versions)
        versions[key] = served
        self._versions = versions
        self._rebuild_routes()

    def _rebuild_routes(self) -> None:
        routes: dict[str, dict[int, ServedVersion]] = {}
        for (name, version), served in self._versions.items():
            if served.state is VersionState.AVAILABLE:
                routes.setdefault(name, {})[version] = served
        self._routes = routes

    def _unload(self, served: ServedVersion) -> None:
        served.state = VersionState.UNLOADING
        versions = dict(self._versions)
        versions.pop((served.name, served.version), None)
        self._versions = versions
        self._rebuild_routes()
        log.info("model %s v%d UNLOADING: removed from the repository", served.name, served.version)
        self._release(served)

    def _release(self, served: ServedVersion) -> None:
        """Drain the queue of a version no longer routed to, then free its session."""
        served.state = VersionState.UNLOADING
        if served.batcher is not None:
            served.batcher.close()
        if served.window is not None:
            self.metrics.drift.remove(served.name, served.version, served.window)
        if served.model is not None:
            if self._versions.get((served.name, served.version)) is None:
                self.metrics.model_unloaded(served.name, served.version, served.model.sha256, served.model.providers)
            served.model.close()  # frees the session; names and card stay for late readers
        served.batcher = None
        release_freed_memory()

    def close(self) -> None:
        """Finish every queued request, then release every session (the last step of shutdown)."""
        with self._scan_lock:
            self._closed = True
            for served in list(self._versions.values()):
                self._release(served)
            self._routes = {}


class RepositoryPoller:
    """Rescans the repository every `interval_s` seconds in a daemon thread."""

    def __init__(self, repository: ModelRepository, interval_s: float):
        self._repository, self._interval = repository, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="repository-poller", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._repository.scan()
            except Exception:  # noqa: BLE001 - the poller must survive anything on disk
                log.exception("repository scan failed")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


